"""Output folders: finished work is never overwritten without ``--overwrite``, and never by another kind of run.

:func:`check_out` runs before anything loads. A missing or empty ``--out`` is fine. One that holds a run is
refused unless ``overwrite``, and the message says what it holds: a finished stage (its ``summary.json``), a
PPO run stopped at iteration k (then ``--resume`` continues it), data, or an exported model. A folder holding
anything this project does not write (a home folder, a repository) is refused even with ``overwrite``: only
our own files are ever deleted. :func:`clear_out` deletes them just before a stage writes its first file,
after its settings and data have been checked, so stale files of the old run (a ``checkpoint.old`` with a
higher iteration, a second weight shard) cannot mix with the new one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

RUN_FOLDERS = frozenset({
    "model", "pretrained", "sft_adapter", "reward", "policy", "critic", "checkpoint", "checkpoint.tmp",
    "checkpoint.old", "sft", "rm", "vanilla", "ppo_max", "tensorboard", "tb", "wandb"})
"""Folders a stage writes (the pipeline's stage folders included; ``wandb``: W&B's local files, see
:mod:`rlhf_lite.tracking`)."""
RUN_SUFFIXES = (".json", ".jsonl", ".png", ".npz", ".safetensors", ".bin", ".jinja", ".pt")
RUN_FILES = frozenset({"report.md", "README.md", "merges.txt", "tokenizer.model", ".lock", "wandb_run_id"})
"""Files written by a stage, ``data`` (README.md is its data card) or ``export`` (a model folder); a stage's
trackers also write TensorBoard event files and ``wandb_run_id``."""
IGNORED = frozenset({".lock"})  # the notebooks' stage lock: not a run


def is_ours(entry: Path) -> bool:
    """Whether ``entry`` (a child of an output folder) is something this project writes."""
    if entry.is_dir():
        return entry.name in RUN_FOLDERS
    return (entry.name in RUN_FILES or entry.suffix in RUN_SUFFIXES or entry.name.startswith("events.out.tfevents")
            or entry.name.startswith("model-") and entry.suffix == ".safetensors")


def describe(out: Path) -> str:
    """What a non-empty folder holds, for the messages: "a finished sft run", "a PPO run stopped at ..."."""
    from .ppo.checkpoint import find_checkpoint

    summary = out / "summary.json"
    stage = None
    if summary.is_file():
        try:
            stage = json.loads(summary.read_text()).get("stage", "pipeline")
        except (ValueError, AttributeError, OSError):
            stage = "unknown"
    found = find_checkpoint(out / "checkpoint")
    if found is not None and (stage is None or _interrupted(summary)):
        return f"a PPO run stopped at iteration {_iteration(found)} ({found})"
    if stage is not None:
        return f"a finished {stage} run ({summary})"
    stages = [n for n in ("sft", "rm", "vanilla", "ppo_max") if (out / n).is_dir()]
    if stages:
        return f"an unfinished pipeline run ({', '.join(stages)})"
    if (out / "stats.json").is_file():
        return "a data folder (stats.json)"
    if (out / "config.json").is_file():
        return "a model folder (config.json)"
    names = sorted(p.name for p in out.iterdir() if p.name not in IGNORED)
    return f"{len(names)} entries ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''})"


def _iteration(found: Path) -> int | str:
    try:
        return json.loads((found / "meta.json").read_text())["iteration"]
    except (ValueError, KeyError, TypeError, OSError):
        return "?"


def _interrupted(summary: Path) -> bool:
    try:
        return bool(json.loads(summary.read_text()).get("interrupted"))
    except (ValueError, AttributeError, OSError):
        return False


def contents(out: Path) -> list[Path]:
    """The entries of ``out`` that count (the notebooks' lock file does not)."""
    return [p for p in out.iterdir() if p.name not in IGNORED]


def check_out(out: str | Path, overwrite: bool, flag: str = "--out", resumable: bool = False, hint: str = "") -> Path:
    """Refuse an output folder that cannot be used, before anything loads (ValueError naming it).

    ``overwrite``: a folder holding one of this project's runs may be replaced. ``resumable``: the stage can
    continue a stopped run (PPO), so the message points to ``--resume``; ``hint`` adds another way out. A
    folder that does not exist yet is checked to be creatable (its nearest existing parent must be a writable
    folder).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{flag} {out} is a file, not a folder")
    if not out.exists():
        parent = next(p for p in out.absolute().parents if p.exists())
        if not parent.is_dir():
            raise ValueError(f"{flag} {out} cannot be created: {parent} is a file, not a folder")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise PermissionError(f"{flag} {out} cannot be created: {parent} is not writable")
        return out
    if not os.access(out, os.W_OK | os.X_OK):
        raise PermissionError(f"{flag} {out} is not writable")
    entries = contents(out)
    if not entries:
        return out
    foreign = sorted(p.name for p in entries if not is_ours(p))
    if foreign:
        raise ValueError(f"{flag} {out} holds files this project did not write ({', '.join(foreign[:4])}"
                         f"{', ...' if len(foreign) > 4 else ''}): choose a new or empty folder")
    if overwrite:
        return out
    held = describe(out)
    if resumable and held.startswith("a PPO run stopped"):
        hint = f"continue it with `--resume {out}`, or "
    raise ValueError(f"{flag} {out} already holds {held}: {hint}pass --overwrite to replace it, or choose another "
                     f"{flag}")


def clear_out(out: str | Path) -> Path:
    """Delete this project's files from ``out`` (after :func:`check_out` with ``overwrite``) and make sure the
    folder exists. Anything else is left alone."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for entry in contents(out):
        if not is_ours(entry):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    return out


__all__ = ["check_out", "clear_out", "contents", "describe", "is_ours"]
