"""What every stage shares: the data folder and its gold judge, the SFT stage's folders, and provenance.

A stage's folder records where its inputs came from (``summary.json["provenance"]``): the fingerprint of the
model it started from, of the data, and the seed and config. Later stages check it: PPO refuses a reward
model trained on another SFT model, since an adapter reads the features of the base it was trained on.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from . import data as data_mod
from .evaluation import GoldJudge
from .text import Prompt, format_prompts
from .utils import Stopwatch, read_json

DATA_FILES = ("sft.jsonl", "prefs_train.jsonl", "prefs_test.jsonl", "prompts_train.jsonl", "prompts_test.jsonl")


def world_judge() -> GoldJudge:
    """The synthetic world's gold judge (:func:`rlhf_lite.world.gold_score`), by category."""
    from . import world

    return GoldJudge(world.gold_score, world.category_of, world.CATEGORIES)


def gold_judge_for(data_dir: str | Path) -> GoldJudge | None:
    """The gold judge of a data folder: the synthetic world's for world data, None for imported HH-RLHF."""
    return world_judge() if data_mod.data_kind(data_dir) == "world" else None


def raw_prompts(data_dir: str | Path, split: str, limit: int | None = None) -> list[str]:
    """The HH prompts of ``prompts_{split}.jsonl``; with ``limit``, that many spread evenly over the file (the
    world's test prompts are grouped by category, so the first ``limit`` would all be of one kind)."""
    rows = data_mod.load_prompts(Path(data_dir) / f"prompts_{split}.jsonl")
    prompts = [r["prompt"] for r in rows]
    if limit is None or limit >= len(prompts):
        return prompts
    return [prompts[i * len(prompts) // limit] for i in range(limit)]


def eval_prompts(tokenizer, data_dir: str | Path, n: int, system_prompt: bool = True) -> list[Prompt]:
    """``n`` test prompts spread over the file (all of them for ``n`` >= 256), formatted for the model: the
    prompts of every gold measurement."""
    return format_prompts(tokenizer, raw_prompts(data_dir, "test", n), system_prompt=system_prompt)[0]


def begin_stage(out_dir: str | Path, cfg, profile, overwrite: bool = True) -> tuple[Path, Stopwatch]:
    """The prologue of a stage: check its config, the profile's model and LoRA settings and its output folder
    (:func:`~rlhf_lite.outdir.check_out`: an earlier run there is replaced only with ``overwrite``), all
    before anything loads; start its clock. The stage clears the folder just before its first write."""
    from .outdir import check_out

    cfg.validate()
    profile.model.validate()
    profile.lora.validate()
    return check_out(out_dir, overwrite), Stopwatch()


# ----- the SFT stage's folders ------------------------------------------------------------------------
@dataclass(frozen=True)
class SFTRun:
    """A finished SFT stage: ``model`` is the SFT model, the base of every later stage and so also the
    reference model."""

    folder: Path
    model: Path

    @classmethod
    def open(cls, sft_dir: str | Path) -> SFTRun:
        """The SFT stage in ``sft_dir``; FileNotFoundError with the command to run when it is missing."""
        folder = Path(sft_dir)
        model = folder / "model"
        if not (model / "config.json").is_file():
            raise FileNotFoundError(f"{model} has no model: run `python -m rlhf_lite sft --out {folder}` first")
        read_json(model / "config.json")  # a corrupt config or weight file fails here, naming itself
        check_weight_files(model)
        return cls(folder, model)

    def context_length(self) -> int:
        """The SFT model's context length (its config.json's ``max_position_embeddings``)."""
        n = read_json(self.model / "config.json").get("max_position_embeddings")
        if not isinstance(n, int) or n < 2:
            raise ValueError(f"{self.model / 'config.json'} has no usable max_position_embeddings ({n!r})")
        return n

    def pretrained(self) -> str:
        """The model before SFT (where ``policy_init="pretrained"`` starts): the tiny model's LM-pretrained
        folder, or the pretrained model a LoRA SFT started from (a folder or hub id)."""
        folder = self.folder / "pretrained"
        if (folder / "config.json").is_file():
            return str(folder)
        return read_json(self.folder / "summary.json")["base_source"]


# ----- file checks ------------------------------------------------------------------------------------
def check_weight_files(folder: Path, names: tuple[str, ...] | None = None) -> None:
    """Read the header of every safetensors file of ``folder`` (or the named ones): ValueError naming a
    truncated or corrupt one before any model loads. Reading a header costs nothing, whatever the model size."""
    from safetensors import SafetensorError, safe_open

    for path in [folder / n for n in names] if names else sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), "pt") as fh:
                fh.keys()
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path} is not a whole safetensors file (truncated or corrupt?): {e}") from e


def check_adapter_files(folder: Path) -> None:
    """The weight files of an adapter folder (``save_adapter``'s) are whole."""
    from .models import ADAPTER_WEIGHTS, HEAD_WEIGHTS

    check_weight_files(folder, tuple(n for n in (ADAPTER_WEIGHTS, HEAD_WEIGHTS) if (folder / n).exists()))


# ----- provenance -------------------------------------------------------------------------------------
def file_digest(*paths: Path, chars: int = 16) -> str:
    """sha256 (first ``chars`` hex digits) of the bytes of ``paths``, in order."""
    digest = hashlib.sha256()
    for path in paths:
        with Path(path).open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:chars]


def model_fingerprint(folder: str | Path) -> dict[str, str]:
    """Identity of a saved model: its absolute folder and the sha256 of its weight files."""
    folder = Path(folder).resolve()
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise FileNotFoundError(f"{folder} holds no model weights (*.safetensors)")
    return {"path": str(folder), "sha256": file_digest(*weights)}


def data_fingerprint(data_dir: str | Path) -> dict[str, str]:
    """Identity of a data folder: its absolute path and the sha256 of its data files."""
    folder = Path(data_dir).resolve()
    files = [folder / n for n in DATA_FILES if (folder / n).is_file()]
    return {"path": str(folder), "sha256": file_digest(*files)}


__all__ = ["SFTRun", "begin_stage", "check_adapter_files", "check_weight_files", "data_fingerprint", "eval_prompts",
           "file_digest", "gold_judge_for", "model_fingerprint", "raw_prompts", "world_judge"]
