"""Helpers the notebooks share: reuse earlier stages' outputs, and show samples as compact tables.

The notebooks run in order (00, 01, ...) and pass artifacts along in ``runs/notebooks``: a notebook
reuses a stage that an earlier notebook ran with the same settings and otherwise runs it itself, so
each notebook also works alone.
"""

from __future__ import annotations

import html
import json
import os
from dataclasses import asdict
from pathlib import Path

from .utils import REPO_ROOT, read_json

RUNS = Path(os.environ.get("RLHF_LITE_RUNS", REPO_ROOT / "runs" / "notebooks"))


def _same_config(out: Path, config: dict) -> bool:
    """True when ``out`` holds a finished run made with exactly ``config``."""
    path = out / "summary.json"
    return path.exists() and read_json(path).get("config") == json.loads(json.dumps(config))


def ensure_sft(cfg=None, out: Path | None = None) -> dict:
    """The SFT stage's summary, running the stage unless an identical run exists."""
    from .sft import SFTConfig, train_sft

    cfg = cfg or SFTConfig()
    out = out or RUNS / "sft"
    return read_json(out / "summary.json") if _same_config(out, asdict(cfg)) else train_sft(out, cfg)


def ensure_rm(cfg=None, out: Path | None = None, sft_dir: Path | None = None) -> dict:
    """The RM stage's summary (runs SFT first if needed)."""
    from .rm import RMConfig, train_rm

    cfg = cfg or RMConfig()
    out = out or RUNS / "rm"
    sft_dir = sft_dir or RUNS / "sft"
    if sft_dir == RUNS / "sft":
        ensure_sft()
    return read_json(out / "summary.json") if _same_config(out, asdict(cfg)) else train_rm(out, sft_dir, cfg)


def ensure_ppo(preset: str, cfg=None, out: Path | None = None) -> dict:
    """A PPO run's summary for ``preset`` (or an explicit config), reusing an identical finished run."""
    from .ppo.config import get_preset
    from .ppo.trainer import run_ppo

    cfg = cfg or get_preset(preset)
    out = out or RUNS / "ppo" / f"{preset}_seed{cfg.seed}"
    ensure_rm()
    if _same_config(out, cfg.to_dict()):
        return read_json(out / "summary.json")
    return run_ppo(out, RUNS / "sft", RUNS / "rm", cfg, preset=preset)


def ppo_dir(preset: str, seed: int = 0) -> Path:
    """Folder of the run that :func:`ensure_ppo` makes for ``preset`` and ``seed``."""
    return RUNS / "ppo" / f"{preset}_seed{seed}"


def samples_table(rows: list[dict], columns: tuple[str, ...] = ("prompt", "response", "gold")):
    """An HTML table of sample dicts (what the notebooks show instead of printed walls of text)."""
    from IPython.display import HTML

    head = "".join(f"<th style='text-align:left'>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td style='text-align:left'>{html.escape(str(r.get(c, '')))}</td>" for c in columns) + "</tr>"
        for r in rows
    )
    return HTML(f"<table><tr>{head}</tr>{body}</table>")


def markdown_table(header: list[str], rows: list[list]):
    """A Markdown table for display in a notebook."""
    from IPython.display import Markdown

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return Markdown("\n".join(lines))
