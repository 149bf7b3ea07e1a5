"""PPO checkpoints: written aside and swapped in durably, checked before anything loads, resumed exactly.

A checkpoint folder holds the policy and critic adapters (peft folders), ``trainer.pt`` (optimizer states,
running statistics, RNG states, the history and the log state) and ``meta.json`` (the iteration, preset,
config and provenance in plain JSON). The new checkpoint is written to ``checkpoint.tmp``; the old one is
renamed to ``checkpoint.old`` before the new one takes its place, and deleted only after. A kill at any
point leaves a complete checkpoint under one of the three names, and :func:`find_checkpoint` picks it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..utils import read_json, write_json

COMPLETE = "meta.json"  # written last: a folder with it is complete


def _complete(path: Path) -> bool:
    return (path / COMPLETE).is_file() and (path / "trainer.pt").is_file()


def swap_in(tmp: Path, path: Path) -> None:
    """Make the complete folder ``tmp`` the checkpoint ``path`` without ever leaving no complete checkpoint."""
    old = path.with_name(path.name + ".old")
    if path.exists():
        if old.exists():
            shutil.rmtree(old)
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(path: str | Path) -> Path | None:
    """The complete checkpoint at ``path``, else its ``.old`` or ``.tmp`` sibling left by a kill mid-swap
    (the newest complete one first); None when there is none."""
    path = Path(path)
    candidates = [path, path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")]
    complete = [c for c in candidates if c.is_dir() and _complete(c)]
    if not complete:
        return None
    return max(complete, key=lambda c: read_json(c / COMPLETE)["iteration"])


def check_checkpoint(path: str | Path, cfg, provenance: dict | None = None,
                     changeable: tuple[str, ...] = ("iterations",)) -> dict:
    """Check that ``path`` holds a checkpoint that a run with config ``cfg`` (and ``provenance``) can continue;
    return its meta.json. Every setting must match except the ``changeable`` ones; ``iterations`` may not
    fall below the iteration reached. Reads only meta.json, so it runs before any model loads."""
    found = find_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"{path} holds no checkpoint (no complete meta.json): nothing to resume")
    meta = read_json(found / COMPLETE)
    saved, wanted = meta["config"], json.loads(json.dumps(cfg.to_dict()))
    diff = [f"{k}: checkpoint {saved.get(k)!r}, requested {wanted.get(k)!r}"
            for k in sorted(set(saved) | set(wanted)) if k not in changeable and saved.get(k) != wanted.get(k)]
    if diff:
        raise ValueError(f"cannot resume from {path}: its config differs ({'; '.join(diff)}); use the preset "
                         f"({meta['preset']!r}), seed and settings of the original run")
    if provenance is not None and meta.get("provenance") is not None:
        moved = [f"{k}: checkpoint {meta['provenance'].get(k)!r}, now {provenance.get(k)!r}"
                 for k in sorted(provenance) if meta["provenance"].get(k) != provenance.get(k)]
        if moved:
            raise ValueError(f"cannot resume from {path}: it continues another run ({'; '.join(moved)})")
    if wanted["iterations"] < meta["iteration"]:
        raise ValueError(f"cannot resume from {path}: PPOConfig.iterations ({wanted['iterations']}) is below the "
                         f"iteration it reached ({meta['iteration']})")
    return meta


def write_meta(folder: Path, meta: dict) -> None:
    write_json(folder / COMPLETE, meta)


def trim_metrics(path: Path, iteration: int) -> None:
    """Drop metrics rows after ``iteration``: a run killed between checkpoints logged rows a resume repeats."""
    if path.exists():
        rows = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("iteration", 0) <= iteration]
        path.write_text("".join(line + "\n" for line in rows))


__all__ = ["check_checkpoint", "find_checkpoint", "swap_in", "trim_metrics", "write_meta"]
