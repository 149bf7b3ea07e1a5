"""Helpers the notebooks share: reuse earlier stages' outputs, and show samples as compact tables.

The notebooks run in order (00, 01, ...) and pass artifacts along in ``runs/notebooks``: a notebook
reuses a stage that an earlier notebook ran with the same settings and otherwise runs it itself, so
each notebook also works alone.
"""

from __future__ import annotations

import contextlib
import html
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

from .utils import REPO_ROOT, read_json

RUNS = Path(os.environ.get("RLHF_LITE_RUNS", REPO_ROOT / "runs" / "notebooks"))


@contextlib.contextmanager
def _stage_lock(out: Path):
    """Hold ``out/.lock`` while a stage runs, waiting for another live process that holds it.

    Two notebooks executed at the same time would otherwise train the same stage into one folder.
    """
    out.mkdir(parents=True, exist_ok=True)
    lock = out / ".lock"
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            try:
                pid = int(lock.read_text() or 0)
                os.kill(pid, 0)  # raises if that process is gone
            except (ValueError, ProcessLookupError, FileNotFoundError):
                lock.unlink(missing_ok=True)  # a stale lock from a dead process
                continue
            time.sleep(5)
    try:
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        yield
    finally:
        lock.unlink(missing_ok=True)


def _run_once(out: Path, config: dict, run):
    """The summary of a finished run in ``out`` made with ``config``, else run it (one process at a time)."""
    with _stage_lock(out):
        return read_json(out / "summary.json") if _same_config(out, config) else run()


def _same_config(out: Path, config: dict) -> bool:
    """True when ``out`` holds a finished run made with exactly ``config``."""
    path = out / "summary.json"
    return path.exists() and read_json(path).get("config") == json.loads(json.dumps(config))


def ensure_sft(cfg=None, out: Path | None = None) -> dict:
    """The SFT stage's summary, running the stage unless an identical run exists."""
    from .sft import SFTConfig, train_sft

    cfg = cfg or SFTConfig()
    out = out or RUNS / "sft"
    return _run_once(out, asdict(cfg), lambda: train_sft(out, cfg))


def ensure_rm(cfg=None, out: Path | None = None, sft_dir: Path | None = None) -> dict:
    """The RM stage's summary (runs SFT first if needed)."""
    from .rm import RMConfig, train_rm

    cfg = cfg or RMConfig()
    out = out or RUNS / "rm"
    sft_dir = sft_dir or RUNS / "sft"
    if sft_dir == RUNS / "sft":
        ensure_sft()
    return _run_once(out, asdict(cfg), lambda: train_rm(out, sft_dir, cfg))


def ensure_ppo(preset: str, cfg=None, out: Path | None = None) -> dict:
    """A PPO run's summary for ``preset`` (or an explicit config), reusing an identical finished run."""
    from .ppo.config import get_preset
    from .ppo.stage import run_ppo

    cfg = cfg or get_preset(preset)
    out = out or RUNS / "ppo" / f"{preset}_seed{cfg.seed}"
    ensure_rm()
    return _run_once(out, cfg.to_dict(), lambda: run_ppo(out, RUNS / "sft", RUNS / "rm", cfg, preset=preset))


def _ppo_job(preset: str, cfg, out: str, threads: int) -> dict:
    """One PPO run in a worker process (a top-level function, so that a spawned process can import it)."""
    import torch

    torch.set_num_threads(threads)
    return ensure_ppo(preset, cfg=cfg, out=Path(out))


def ensure_ppo_many(jobs: dict, workers: int = 2, threads: int = 1) -> dict[str, dict]:
    """Summaries of several PPO runs, ``{key: (preset, cfg, out)}``; missing runs go to ``workers``
    processes of ``threads`` torch threads each, identical finished runs are read back.

    A second thread speeds a small PPO run up by far less than 2x: at 32 rollouts a PPO-max iteration takes
    0.57 s on one thread and 0.41-0.45 s on two (2-core machine), and two one-thread runs side by side do
    not slow each other (0.57 and 0.51 s per iteration), so they finish about 1.6x sooner than one
    two-thread run after another. The thread count is fixed rather than taken from the machine, so
    results repeat on any number of cores.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ensure_rm()  # once, here, rather than racing in the workers
    results = {key: read_json(out / "summary.json") for key, (_, cfg, out) in jobs.items()
               if _same_config(out, cfg.to_dict())}
    todo = {key: job for key, job in jobs.items() if key not in results}
    if todo:
        ctx = multiprocessing.get_context("spawn")  # forking a process with live OpenMP threads can hang
        with ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=ctx) as pool:
            futures = {key: pool.submit(_ppo_job, preset, cfg, str(out), threads)
                       for key, (preset, cfg, out) in todo.items()}
            results.update({key: f.result() for key, f in futures.items()})
    return {key: results[key] for key in jobs}


def ppo_dir(preset: str, seed: int = 0) -> Path:
    """Folder of the run that :func:`ensure_ppo` makes for ``preset`` and ``seed``."""
    return RUNS / "ppo" / f"{preset}_seed{seed}"


RESULT_FILES = ("*.json", "*.jsonl", "*.md", "*.png", "*.npz")
"""What :func:`publish_run` copies: summaries, metrics, samples, probe rows, RM test scores, reports, plots."""
WEIGHT_FOLDERS = frozenset({"model", "pretrained", "sft_adapter", "reward", "policy", "critic", "checkpoint"})
"""Sub-folders of a run that hold weights (never copied into the repository)."""


def publish_run(run: str | Path, dest: str | Path) -> list[Path]:
    """Copy the small files of a pipeline run (``RESULT_FILES``, outside ``WEIGHT_FOLDERS``) to ``dest``,
    keeping the layout, so that notebooks and plots read ``dest`` as they read the run. Returns the copies.

    Absolute paths in the text files (provenance records) become portable: the repository root becomes
    ``.``, the model cache ``~/.cache/rlhf_lite`` (see :mod:`rlhf_lite.fetch`).
    """
    import shutil

    from .fetch import cache_dir

    run, dest = Path(run), Path(dest)
    portable = [(str(REPO_ROOT.resolve()) + "/", ""), (str(REPO_ROOT.resolve()), "."),
                (str(cache_dir().resolve()), "~/.cache/rlhf_lite")]
    copied = []
    for pattern in RESULT_FILES:
        for src in sorted(run.rglob(pattern)):
            rel = src.relative_to(run)
            if WEIGHT_FOLDERS.intersection(rel.parts[:-1]):
                continue
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if src.suffix in (".png", ".npz"):
                shutil.copy2(src, target)
            else:
                text = src.read_text()
                for old, new in portable:
                    text = text.replace(old, new)
                target.write_text(text)
            copied.append(target)
    return copied


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


GLOSSARY = "../docs/glossary.md"


class Opening:
    """A notebook's opening (what you will learn, what it costs, prerequisites), shown by :func:`opening`;
    :meth:`close` (the recap's last cell) writes this execution's wall time into it."""

    def __init__(self, text: str, handle) -> None:
        from .utils import Stopwatch

        self.text, self.handle, self.timer = text, handle, Stopwatch()

    def close(self) -> float:
        """Put the time since :func:`opening` into the opening; returns it in seconds."""
        import torch
        from IPython.display import Markdown

        seconds, threads = self.timer(), torch.get_num_threads()
        took = f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
        note = (f"This execution took **{took}** with {threads} CPU thread{'s' if threads > 1 else ''} "
                f"(machine load average {os.getloadavg()[0]:.1f} at its end).")
        self.handle.update(Markdown(self.text.replace(_TIME_PLACEHOLDER, note)))
        return seconds


_TIME_PLACEHOLDER = "*(This execution's time appears here once the last cell has run.)*"


def opening(learn: list[str], cost: str, prerequisites: str) -> Opening:
    """Display a notebook's opening; the time of this execution is filled in by ``Opening.close()``."""
    from IPython.display import Markdown, display

    text = ("**What you will learn**\n\n" + "\n".join(f"* {item}" for item in learn)
            + f"\n\n**What it costs**: {cost} {_TIME_PLACEHOLDER}\n\n**Prerequisites**: {prerequisites}\n\n"
            f"Terms in bold are explained in the [glossary]({GLOSSARY}).")
    return Opening(text, display(Markdown(text), display_id=True))
