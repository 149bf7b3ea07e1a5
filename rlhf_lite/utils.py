"""Small shared helpers: seeding, JSON/JSONL output, timing, devices."""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "data"


class DivergedError(RuntimeError):
    """Training met non-finite values it cannot go on from; the message says what was kept and what to change."""


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, numpy and torch; return a torch.Generator seeded the same for explicit sampling."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def set_cpu_threads() -> int:
    """Use every core the machine offers (2 here) unless OMP_NUM_THREADS says otherwise."""
    n = int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))
    torch.set_num_threads(max(1, n))
    return torch.get_num_threads()


def pick_device(requested: str | None = None) -> torch.device:
    """``requested`` if given, else CUDA when available, else the CPU."""
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _clean(value: Any) -> Any:
    """Make a value JSON-safe: tensors and numpy scalars to floats, NaN and inf to None."""
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json(path: str | Path, obj: dict) -> None:
    """Write ``obj`` as indented JSON (NaN becomes null)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(_clean(obj), indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path) -> dict:
    """Read a JSON object from a file; FileNotFoundError or ValueError naming the file when it is missing,
    a folder, or not a valid JSON object (a truncated or corrupt file)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} not found")
    if p.is_dir():
        raise ValueError(f"{p} is a folder, not a JSON file")
    try:
        data = json.loads(p.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{p} is not valid JSON (corrupt or truncated?): {e}") from e
    if isinstance(data, dict):
        return data
    raise ValueError(f"{p} holds a JSON {type(data).__name__}, not an object")


class MetricsLog:
    """Append-only metrics.jsonl: one JSON object per logged step, flushed as it goes; every row also goes to
    TensorBoard (and W&B) in the same folder, tagged for ``stage`` (see :mod:`rlhf_lite.tracking`).
    ``purge_step``: the first step a resumed log writes again (TensorBoard hides older events from there on)."""

    def __init__(self, path: str | Path, append: bool = False, stage: str = "metrics",
                 purge_step: int | None = None) -> None:
        from .tracking import RowTracker

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self.path.open("a" if append else "w")
        self.rows: list[dict] = []
        self.tracker = RowTracker(self.path.parent, stage, fresh=not append, purge_step=purge_step)

    def log(self, row: dict) -> None:
        row = _clean(row)
        self.rows.append(row)
        self._fh.write(json.dumps(row, sort_keys=True) + "\n")
        self._fh.flush()
        self.tracker.row(row)

    def text(self, step: int, tag: str, text: str) -> None:
        """A text summary (sample tables) for the trackers; metrics.jsonl keeps only rows."""
        self.tracker.text(step, tag, text)

    def close(self) -> None:
        self._fh.close()
        self.tracker.close()


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of a metrics.jsonl file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class Stopwatch:
    """Wall-clock seconds since creation."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.start


def quiet_hf_progress() -> bool:
    """True when RLHF_LITE_PROGRESS=0; then transformers' own bars ("Loading weights", "Writing model
    shards") are switched off too. Called by ``progress`` and before every model load."""
    disable = os.environ.get("RLHF_LITE_PROGRESS", "1") == "0"
    if disable:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    return disable


def progress(iterable, desc: str, **kwargs):
    """A tqdm progress bar, off when RLHF_LITE_PROGRESS=0 (the committed notebooks set it, to keep their
    stored outputs short)."""
    from tqdm.auto import tqdm

    disable = quiet_hf_progress()
    return tqdm(iterable, desc=desc, leave=False, disable=disable, dynamic_ncols=True, **kwargs)


@contextlib.contextmanager
def stop_on_signals(request_stop: Callable[[str], None]) -> Iterator[None]:
    """While the block runs, the first Ctrl-C or SIGTERM calls ``request_stop(signal name)`` (the caller stops
    at its next safe point, e.g. after an iteration with a checkpoint); a second one raises KeyboardInterrupt
    at once. The previous handlers come back afterwards. Signals reach only the main thread: elsewhere this
    does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    asked = False

    def handler(signum: int, frame: object) -> None:
        nonlocal asked
        if asked:
            raise KeyboardInterrupt
        asked = True
        request_stop(signal.Signals(signum).name)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
