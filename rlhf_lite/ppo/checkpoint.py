"""PPO checkpoints: written aside and swapped in durably, checked before anything loads, resumed exactly.

A checkpoint folder holds the policy and critic adapters (peft folders), ``trainer.pt`` (optimizer states,
running statistics, RNG states, the history and the log state) and ``meta.json`` (the iteration, preset,
config and provenance in plain JSON), written last: a folder with a readable meta.json and a whole
trainer.pt is complete. The new checkpoint is written to ``checkpoint.tmp`` and flushed to disk; the old one
is renamed to ``checkpoint.old``, the new one takes its place, and the old one is retired (its meta.json
removed first, so a half-deleted folder never looks complete) and deleted. A kill at any point leaves a
complete checkpoint under one of the three names: :func:`find_checkpoint` picks the newest, and
:func:`recover` puts it back in place before a resume.

A resume continues the run with the checkpoint's config. Only the fields of :data:`RESUME_CHANGEABLE` may
change on the way (a lower learning rate after the non-finite guard stopped a run, more iterations); the
change is recorded in the run's metrics.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

from ..provenance import differences
from ..utils import read_json, write_json

COMPLETE = "meta.json"  # written last: a folder with it is complete
RESUME_CHANGEABLE = ("iterations", "policy_lr", "critic_lr", "max_grad_norm", "max_nonfinite", "checkpoint_every",
                     "gold_every", "sample_every")
"""PPOConfig fields a resume may change: the budget, the step sizes and what is logged, never the method."""


def read_meta(folder: Path) -> dict | None:
    """The meta.json of a complete checkpoint folder, or None (missing, corrupt, or trainer.pt not whole)."""
    try:
        meta = read_json(folder / COMPLETE)
    except (OSError, ValueError):
        return None
    whole = (folder / "trainer.pt").is_file() and zipfile.is_zipfile(folder / "trainer.pt")
    return meta if whole and isinstance(meta.get("iteration"), int) and isinstance(meta.get("config"), dict) else None


def _fsync(path: Path) -> None:
    """Flush a file or a folder's entries to disk (a power cut after the rename must not leave it empty)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def retire(folder: Path) -> None:
    """Delete a checkpoint folder, its meta.json first: a kill half-way never leaves it looking complete."""
    (folder / COMPLETE).unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)


def swap_steps(tmp: Path, path: Path) -> list[tuple[str, Callable[[], None]]]:
    """The steps of :func:`swap_in`, named, in order: a test kills the swap between any two of them."""
    old = path.with_name(path.name + ".old")
    steps = [("flush the new checkpoint", lambda: [_fsync(f) for f in sorted(tmp.rglob("*")) + [tmp]])]
    if old.exists():
        steps.append(("retire a stale .old", lambda: retire(old)))
    if path.exists():
        steps.append(("move the checkpoint to .old", lambda: path.rename(old)))
    steps += [("move the new one into place", lambda: tmp.rename(path)),
              ("flush the renames", lambda: _fsync(path.parent)),
              ("retire .old", lambda: retire(old))]
    return steps


def swap_in(tmp: Path, path: Path) -> None:
    """Make the complete folder ``tmp`` the checkpoint ``path`` without ever leaving no complete checkpoint."""
    for _, step in swap_steps(tmp, path):
        step()


def _candidates(path: Path) -> list[Path]:
    return [path, path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")]


def no_checkpoint(path: Path) -> str:
    """The message for a run without a complete checkpoint, saying what is wrong with each candidate."""
    def problem(folder: Path) -> str:
        try:
            meta = read_json(folder / COMPLETE)
        except (OSError, ValueError):
            return "meta.json missing or unreadable"
        if not isinstance(meta.get("iteration"), int) or not isinstance(meta.get("config"), dict):
            return "meta.json lacks the iteration or the config"
        return "trainer.pt missing or not whole"

    why = "; ".join(f"{c.name}: {problem(c)}" for c in _candidates(Path(path)) if c.is_dir())
    return f"{path} holds no complete checkpoint{f' ({why})' if why else ''}: nothing to resume"


def find_checkpoint(path: str | Path) -> Path | None:
    """The complete checkpoint at ``path``, else its ``.tmp`` or ``.old`` sibling left by a kill mid-swap
    (the newest complete one, ``path`` first among equals); None when there is none."""
    found = [(meta["iteration"], -i, c) for i, c in enumerate(_candidates(Path(path)))
             if c.is_dir() and (meta := read_meta(c)) is not None]
    return max(found)[2] if found else None


def recover(path: str | Path) -> Path:
    """Put the newest complete checkpoint back at ``path`` (after a kill mid-swap) and return ``path``;
    FileNotFoundError when there is none. Incomplete siblings are deleted: they hold nothing to resume."""
    path = Path(path)
    found = find_checkpoint(path)
    if found is None:
        raise FileNotFoundError(no_checkpoint(path))
    if found != path:
        print(f"{path}: a kill interrupted the last checkpoint swap; resuming from {found.name} (iteration "
              f"{read_meta(found)['iteration']})", file=sys.stderr)
        if found.name.endswith(".tmp"):
            swap_in(found, path)
        else:  # .old is the newest complete one: ``path`` is missing or incomplete
            if path.exists():
                retire(path)
            found.rename(path)
    for sibling in _candidates(path)[1:]:
        if sibling.exists():
            retire(sibling)
    return path


def check_checkpoint(path: str | Path, cfg, provenance: dict | None = None,
                     changeable: tuple[str, ...] = RESUME_CHANGEABLE, processes: int = 1) -> dict:
    """Check that ``path`` holds a checkpoint that a run with config ``cfg`` (and ``provenance``) on
    ``processes`` processes can continue; return its meta.json. Every setting must match except the
    ``changeable`` ones; ``iterations`` may not fall below the iteration reached. Reads only meta.json, so it
    runs before any model loads."""
    found = find_checkpoint(path)
    if found is None:
        raise FileNotFoundError(no_checkpoint(path))
    meta = read_meta(found)
    saved_processes = meta.get("processes", 1)
    if saved_processes != processes:  # every process has its own sampling RNG state in the checkpoint
        raise ValueError(f"cannot resume from {path}: it was written by a run of {saved_processes} process(es), "
                         f"this one has {processes}; resume with `accelerate launch --num_processes "
                         f"{saved_processes}`" + (" or without accelerate" if saved_processes == 1 else ""))
    saved, wanted = meta["config"], json.loads(json.dumps(cfg.to_dict()))
    diff = differences({k: v for k, v in saved.items() if k not in changeable},
                       {k: v for k, v in wanted.items() if k not in changeable}, "in the checkpoint", "requested")
    if diff:
        raise ValueError(f"cannot resume from {path}: its config differs ({'; '.join(diff)}); only "
                         f"{', '.join(changeable)} may change on a resume")
    if provenance is not None and meta.get("provenance") is not None:
        moved = differences(meta["provenance"], provenance, "in the checkpoint", "now")
        if moved:
            raise ValueError(f"cannot resume from {path}: it continues another run ({'; '.join(moved)})")
    if wanted["iterations"] < meta["iteration"]:
        raise ValueError(f"cannot resume from {path}: PPOConfig.iterations ({wanted['iterations']}) is below the "
                         f"iteration it reached ({meta['iteration']})")
    return meta


def changed_fields(meta: dict, cfg) -> dict[str, dict]:
    """The changeable fields whose value ``cfg`` changes from the checkpoint's: ``{field: {"from", "to"}}``."""
    wanted = json.loads(json.dumps(cfg.to_dict()))
    return {k: {"from": meta["config"].get(k), "to": wanted[k]} for k in RESUME_CHANGEABLE
            if k != "iterations" and meta["config"].get(k) != wanted[k]}


def resume_config(path: str | Path, changes: dict):
    """The config to continue the checkpoint at ``path`` with: its own, plus ``changes`` (``{field: value}``,
    typed), each of which must be one of :data:`RESUME_CHANGEABLE` or equal the checkpoint's value. Returns
    ``(config, meta)``; reads only meta.json."""
    from ..settings import SettingError, from_dict, replace_fields
    from .config import PPOConfig

    found = find_checkpoint(path)
    if found is None:
        raise FileNotFoundError(no_checkpoint(path))
    meta = read_meta(found)
    saved = from_dict(PPOConfig, meta["config"])
    cfg = replace_fields(saved, changes, "PPOConfig")
    fixed = differences({k: v for k, v in saved.to_dict().items() if k not in RESUME_CHANGEABLE},
                        {k: v for k, v in cfg.to_dict().items() if k not in RESUME_CHANGEABLE},
                        "in the checkpoint", "requested")
    if fixed:
        raise SettingError(f"--resume {Path(path).parent} continues its run with its own settings; these cannot "
                           f"change: {'; '.join(fixed)} (changeable: {', '.join(RESUME_CHANGEABLE)})")
    return cfg, meta


def write_meta(folder: Path, meta: dict) -> None:
    write_json(folder / COMPLETE, meta)


# ----- a trainer's state ------------------------------------------------------------------------------
def trainer_state(t) -> dict:
    """PPOTrainer ``t``'s ``trainer.pt``: optimizer states, running statistics, RNG states, the iteration and
    the log state."""
    import torch

    return {
        "iteration": t.iteration, "policy_opt": t.policy_opt.state_dict(), "critic_opt": t.critic_opt.state_dict(),
        "reward_moments": t.reward_moments.state_dict(), "rng": t.rng.getstate(), "gen": t.gen.get_state(),
        "torch_rng": torch.get_rng_state(), "history": t.history, "samples": t.samples, "collapse": t.collapse,
        "baseline": t.baseline, "nonfinite_streak": t.nonfinite_streak, "wall_seconds": t.timer(),
    }


def restore_state(t, state: dict) -> None:
    """Put :func:`trainer_state`'s ``state`` back into PPOTrainer ``t`` (the learning rates are set after, by
    :func:`load_trainer`)."""
    import torch

    t.policy_opt.load_state_dict(state["policy_opt"])
    t.critic_opt.load_state_dict(state["critic_opt"])
    t.reward_moments.load_state_dict(state["reward_moments"])
    t.rng.setstate(state["rng"])
    t.gen.set_state(state["gen"])
    torch.set_rng_state(state["torch_rng"])
    t.iteration, t.history, t.samples = state["iteration"], state["history"], state["samples"]
    t.collapse = tuple(state["collapse"]) if state["collapse"] else None
    t.baseline, t.nonfinite_streak = state["baseline"], state["nonfinite_streak"]
    t.timer.start -= state["wall_seconds"]  # wall_seconds keep counting from the first start


def save_trainer(t, path: Path) -> None:
    """Write PPOTrainer ``t``'s adapters and state (``t.state_dict()``) to ``path.tmp`` (meta.json last) and
    swap it in as ``path``."""
    import torch

    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        retire(tmp)
    t.stack.save_adapter("policy", tmp / "policy")
    t.stack.save_adapter("critic", tmp / "critic")
    torch.save(t.state_dict(), tmp / "trainer.pt")
    write_meta(tmp, {"iteration": t.iteration, "preset": t.preset, "config": t.cfg.to_dict(),
                     "provenance": t.setup.provenance, "processes": t.processes})
    swap_in(tmp, path)


def load_trainer(t, path: Path) -> None:
    """Restore PPOTrainer ``t`` from the checkpoint at ``path`` (recovered first after a kill mid-swap) through
    ``t.load_state_dict``. A changed learning rate replaces the saved one; every changed field is logged as an
    ``event: resume`` row."""
    import pickle

    import torch

    meta = check_checkpoint(path, t.cfg, t.setup.provenance or None, processes=t.processes)
    found = recover(path)
    t.stack.load_adapter("policy", found / "policy")
    t.stack.load_adapter("critic", found / "critic")
    try:
        state = torch.load(found / "trainer.pt", map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{found / 'trainer.pt'} is corrupt ({str(e).splitlines()[0]})") from e
    t.load_state_dict(state)
    for opt, lr in ((t.policy_opt, t.cfg.policy_lr), (t.critic_opt, t.cfg.critic_lr)):
        for group in opt.param_groups:
            group["lr"] = lr
    changed = changed_fields(meta, t.cfg)
    if changed:
        t.events.append({"iteration": meta["iteration"], "event": "resume", "changed": changed})


def trim_metrics(path: Path, iteration: int) -> None:
    """Drop metrics rows after ``iteration``: a run killed between checkpoints logged rows a resume repeats.
    A last line cut short by the kill is dropped too."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
        except ValueError as e:
            if i == len(lines):
                break  # the kill cut the row being written
            raise ValueError(f"{path}:{i}: not a JSON row ({e}); the metrics of this run are corrupt") from e
        if isinstance(row, dict) and row.get("iteration", 0) <= iteration:
            rows.append(line)
    path.write_text("".join(line + "\n" for line in rows))


__all__ = [
    "RESUME_CHANGEABLE",
    "changed_fields",
    "check_checkpoint",
    "find_checkpoint",
    "load_trainer",
    "read_meta",
    "recover",
    "restore_state",
    "resume_config",
    "retire",
    "save_trainer",
    "swap_in",
    "swap_steps",
    "trainer_state",
    "trim_metrics",
    "write_meta",
]
