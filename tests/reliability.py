"""Helpers of the reliability tests (tests/test_reliability_*.py, docs/reliability.md): run the CLI and read
its one-line error, forbid model loading, write small data and run folders.

Each test module lists its cases in ``CASES`` (id -> how the case is handled); docs/reliability.md counts them
and a test checks that the counts there are those of the modules.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from rlhf_lite import cli
from rlhf_lite.models import AdapterStack, build_tiny_model
from rlhf_lite.provenance import rm_provenance
from rlhf_lite.stage import model_fingerprint
from rlhf_lite.tokenizer import load_tokenizer
from tests.conftest import EOS, PAD, SMALL, SMALL_LORA, randomize_adapters

HANDLING = ("error", "warning", "recovery")
"""How a case is handled: a one-line error naming the culprit (before any model loads, unless the culprit is a
loaded weight), a one-line warning naming the setting, or an exact recovery."""


@pytest.fixture(autouse=True)
def quiet_progress(monkeypatch: pytest.MonkeyPatch) -> None:
    """No progress bars on stderr, where the one-line errors are read (import this fixture into a module)."""
    monkeypatch.setenv("RLHF_LITE_PROGRESS", "0")


def boom(*args, **kwargs):
    raise AssertionError("a model was loaded before the inputs were checked")


def no_models(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every model load fail the test: the case must be decided before."""
    for target in ("rlhf_lite.sft_models.build_tiny_model", "rlhf_lite.sft_models.load_base",
                   "rlhf_lite.rm.build_rm_stack", "rlhf_lite.ppo.stage.load_base", "rlhf_lite.policy_setup.load_base",
                   "rlhf_lite.loading.load_causal_lm"):
        monkeypatch.setattr(target, boom)


def cli_error(argv: list[str], capsys) -> tuple[int | str, str]:
    """Run the CLI expecting it to stop; returns (exit code, stderr). A traceback fails the test."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main([str(a) for a in argv])
    return exit_info.value.code, capsys.readouterr().err


def one_line(err: str) -> str:
    """The single ``error: ...`` line of ``err`` (warning lines aside)."""
    lines = [line for line in err.splitlines() if not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def small_world(out: Path, **sizes) -> Path:
    """A small synthetic world data folder (seeded: always the same files)."""
    from rlhf_lite.world import WorldSizes, generate_world

    base = {"sft": 64, "prefs_train": 64, "prefs_test": 32, "prompts_train": 32, "prompts_test": 16}
    generate_world(out, seed=0, sizes=WorldSizes(**{**base, **sizes}))
    return out


def copy_data(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_line(path: Path, lineno: int, change) -> None:
    """Replace line ``lineno`` (1-based) of a JSONL file by ``change(row)`` (a dict, or a raw str)."""
    lines = path.read_text().splitlines()
    new = change(json.loads(lines[lineno - 1]))
    lines[lineno - 1] = new if isinstance(new, str) else json.dumps(new)
    path.write_text("\n".join(lines) + "\n")


def write_sft(folder: Path, data: Path, seed: int = 0, arch=SMALL) -> Path:
    """A tiny random SFT model folder (``folder/model``) with the data's tokenizer."""
    tok = load_tokenizer(data / "tokenizer.json")
    model = build_tiny_model(len(tok), PAD, EOS, arch, seed)
    model.save_pretrained(folder / "model")
    tok.save_pretrained(folder / "model")
    return folder


def write_rm(folder: Path, sft: Path, data: Path, cfg, profile, seed: int = 0) -> Path:
    """An RM folder as the stage writes it (a random reward adapter on the SFT model, its provenance)."""
    from rlhf_lite.utils import write_json

    tok = load_tokenizer(data / "tokenizer.json")
    stack = AdapterStack(build_tiny_model(len(tok), PAD, EOS, SMALL, 0), ["reward"], SMALL_LORA)
    randomize_adapters(stack, seed + 1)  # another seed, another reward model
    stack.save_adapter("reward", folder / "reward")
    write_json(folder / "summary.json", {"stage": "rm", "provenance": rm_provenance(cfg, profile, sft / "model", data),
                                         "sft_model": model_fingerprint(sft / "model")})
    return folder


__all__ = [
    "HANDLING",
    "boom",
    "cli_error",
    "copy_data",
    "edit_line",
    "no_models",
    "one_line",
    "quiet_progress",
    "small_world",
    "write_rm",
    "write_sft",
]
