"""Anthropic HH-RLHF into this project's data layout: one reader for files and the hub, strict or skip-and-count.

Every stage reads a data folder in one layout (``prefs_{train,test}.jsonl``, ``prompts_{train,test}.jsonl``,
``sft.jsonl``, ``stats.json``): the synthetic world's (``data/``) or one written here from HH-RLHF, the
paper's data set (``python -m rlhf_lite data --hh Anthropic/hh-rlhf --out data_hh``). HH-RLHF has no gold
judge, so runs on it report the RM reward and the paper's monitors only.
"""

from __future__ import annotations

import errno
import json
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

from .data import (
    _PAIR_KEYS,
    DataError,
    PreferencePair,
    _check_limit,
    _check_required,
    _collect,
    _iter_jsonl,
    _row_to_pair,
)

_PathLike = str | Path


def hh_rows_to_prompts(pairs: Sequence[PreferencePair]) -> list[dict]:
    """Return the unique prompts of ``pairs``, first-seen order, as ``{"prompt": ...}`` rows for PPO."""
    seen: dict[str, None] = {}
    for pair in pairs:
        seen.setdefault(pair.prompt, None)
    return [{"prompt": prompt} for prompt in seen]



def _looks_like_local_path(source: _PathLike) -> bool:
    """Tell whether ``source`` is clearly meant as a file path rather than a hub dataset id."""
    if isinstance(source, Path):
        return True
    return source.startswith(("/", ".", "~", "\\")) or source.endswith((".jsonl", ".json", ".gz"))


def _hh_source_rows(source: _PathLike, split: str) -> tuple[str, Iterator[tuple[int, dict]]]:
    """(label, iterator of (1-based row number, row)) of an HH-RLHF source: a ``.jsonl[.gz]`` file, a
    directory holding ``{split}.jsonl[.gz]``, or a hub dataset id (needs the optional ``datasets``)."""
    local = Path(source).expanduser()
    if local.is_dir():
        for name in (f"{split}.jsonl", f"{split}.jsonl.gz"):
            if (local / name).is_file():
                return str(local / name), _iter_jsonl(local / name)
        raise FileNotFoundError(errno.ENOENT, f"no {split}.jsonl or {split}.jsonl.gz in HH-RLHF directory", str(local))
    if local.exists():
        return str(local), _iter_jsonl(local)
    if _looks_like_local_path(source):
        raise FileNotFoundError(errno.ENOENT, "no such HH-RLHF file or directory", str(source))
    try:
        import datasets
    except ImportError as e:
        raise ImportError(
            f"{source!r} is not a local file or directory, so it is treated as a Hugging Face hub "
            "dataset id, which needs the optional 'datasets' package: pip install datasets"
        ) from e
    dataset = datasets.load_dataset(str(source), split=split)
    return f"{source}[{split}]", ((i + 1, dict(item)) for i, item in enumerate(dataset))


def load_hh_rlhf(source: _PathLike, split: str = "train", limit: int | None = None, strict: bool = True
                 ) -> list[PreferencePair] | tuple[list[PreferencePair], Counter]:
    """Load HH-RLHF preference pairs from a local file or directory, or from the Hugging Face hub.

    ``source`` may be a ``.jsonl`` (or ``.jsonl.gz``) file, a directory holding ``{split}.jsonl`` (or
    ``{split}.jsonl.gz``), or a hub dataset id such as ``"Anthropic/hh-rlhf"``. Every row goes through the
    checks of :func:`load_preference_pairs`; hub rows are reported as ``"{source}[{split}]:{index + 1}"``.

    ``strict=True`` returns the pairs and raises on the first bad row. ``strict=False`` (skip-and-count,
    for real HH-RLHF, which holds a few rows with an empty final response, identical responses or
    different prompts) skips bad rows and returns ``(pairs, Counter of skip reasons)``.

    Raises:
        FileNotFoundError: a directory without the split file, or a path-like ``source`` (a ``Path``,
            or a str starting with ``/``, ``.`` or ``~`` or ending in ``.jsonl``/``.json``/``.gz``)
            that does not exist.
        ImportError: a hub id is given and ``datasets`` is not installed.
        DataError: a bad row (strict), or no usable rows.
    """
    _check_limit(limit)
    label, rows = _hh_source_rows(source, split)
    skipped: Counter = Counter()

    def pairs() -> Iterator[PreferencePair]:
        for lineno, row in rows:
            try:
                _check_required(row, _PAIR_KEYS, label, lineno)
                yield _row_to_pair(row, label, lineno)
            except DataError as e:
                if strict:
                    raise
                skipped[_reason_kind(e.reason)] += 1

    try:
        out = _collect(pairs(), limit, label)
    except DataError as e:
        if strict or e.lineno is not None or not e.reason.startswith("no rows"):  # a file error stays one
            raise
        raise DataError(f"no usable HH-RLHF rows (skipped: {dict(skipped)})", label) from e
    return out if strict else (out, skipped)


def _reason_kind(reason: str) -> str:
    """A short category of a DataError reason, for counting skipped rows."""
    for key, kind in (("is empty", "empty response"), ("identical", "identical responses"),
                      ("different prompts", "different prompts"), ("Human turn", "ends with a Human turn"),
                      ("no '", "no Assistant turn"), ("does not start", "bad start"), ("key", "missing field")):
        if key in reason:
            return kind
    return "other"


def write_layout(out_dir: _PathLike, train: Sequence[PreferencePair], test: Sequence[PreferencePair],
                 source: str) -> dict[str, Path]:
    """Write preference pairs in this project's data layout, which every stage reads; returns paths by name.

    ``prefs_{train,test}.jsonl``: ``{"prompt", "chosen", "rejected"}`` with full transcripts (as HH-RLHF
    has them); ``prompts_{train,test}.jsonl``: the unique prompts (PPO's prompt source); ``sft.jsonl``:
    the chosen response of each training pair as a demonstration ("SFT on chosen"); ``stats.json``:
    ``{"kind": "hh-rlhf", "source": ...}`` and the row counts. Such data has no gold judge.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "prefs_train": [{"prompt": p.prompt, "chosen": p.prompt + p.chosen, "rejected": p.prompt + p.rejected}
                        for p in train],
        "prefs_test": [{"prompt": p.prompt, "chosen": p.prompt + p.chosen, "rejected": p.prompt + p.rejected}
                       for p in test],
        "prompts_train": hh_rows_to_prompts(train),
        "prompts_test": hh_rows_to_prompts(test),
        "sft": [{"prompt": p.prompt, "response": p.chosen} for p in train],
    }
    paths = {}
    for name, rows in files.items():
        paths[name] = out / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    stats = {"kind": "hh-rlhf", "source": source, "rows": {name: len(rows) for name, rows in files.items()}}
    paths["stats"] = out / "stats.json"
    paths["stats"].write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")
    return paths



def import_hh(source: _PathLike, out_dir: _PathLike, train_limit: int | None = None,
              test_limit: int | None = None, prepare=None) -> dict:
    """Read HH-RLHF's train and test splits from ``source`` (skip-and-count: real HH-RLHF has a few
    unusable rows) and write them in this project's layout into ``out_dir``; returns the row counts and
    the skip reasons of each split. ``prepare(out_dir)`` runs once both splits have been read, before the
    first write (the CLI clears an earlier data set there)."""
    train, skipped_train = load_hh_rlhf(source, "train", train_limit, strict=False)
    test, skipped_test = load_hh_rlhf(source, "test", test_limit, strict=False)
    if prepare is not None:
        prepare(out_dir)
    write_layout(out_dir, train, test, str(source))
    return {"train_pairs": len(train), "test_pairs": len(test), "skipped_train": dict(skipped_train),
            "skipped_test": dict(skipped_test)}


__all__ = ["hh_rows_to_prompts", "import_hh", "load_hh_rlhf", "write_layout"]
