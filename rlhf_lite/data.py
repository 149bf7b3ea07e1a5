"""Data loading for rlhf_lite: JSONL preference pairs, PPO prompts and SFT rows in the HH-RLHF format.

Every transcript follows Anthropic HH-RLHF: it starts with ``"\\n\\nHuman:"`` and alternates
``"\\n\\nHuman:"`` / ``"\\n\\nAssistant:"`` turns.  :func:`split_hh` cuts one into the prompt (everything
through the last ``"\\n\\nAssistant:"``) and the final response (the text after it).

All loaders share :func:`read_jsonl`'s discipline: blank lines are skipped, a missing file raises
:class:`FileNotFoundError`, and any bad row raises :class:`DataError` whose message starts with
``"{path}:{lineno}: "`` (1-based line number).  A file without rows is an error too.  ``limit`` stops
reading after that many rows, so rows beyond it are neither read nor validated.
"""

from __future__ import annotations

import errno
import gzip
import json
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .text import ASSISTANT, HUMAN, excerpt, split_hh

__all__ = [
    "ASSISTANT",
    "HUMAN",
    "DataError",
    "PreferencePair",
    "data_kind",
    "load_preference_pairs",
    "load_prompts",
    "load_sft",
    "read_jsonl",
    "split_hh",
]

_PathLike = str | Path
_TypeSpec = type | tuple[type, ...]


class DataError(ValueError):
    """A data file (or hub dataset) holds a row that cannot be used.

    The message is ``f"{path}:{lineno}: {reason}"`` when the 1-based line number is known and
    ``f"{path}: {reason}"`` otherwise; the three parts are also kept as attributes.
    """

    def __init__(self, reason: str, path: _PathLike | None = None, lineno: int | None = None) -> None:
        self.reason = reason
        self.path = None if path is None else str(path)
        self.lineno = lineno
        if path is None:
            message = reason
        elif lineno is None:
            message = f"{path}: {reason}"
        else:
            message = f"{path}:{lineno}: {reason}"
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.reason, self.path, self.lineno))


_excerpt = excerpt


# --------------------------------------------------------------------------- JSONL core


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")


def _type_name(spec: _TypeSpec) -> str:
    if isinstance(spec, tuple):
        return " or ".join(t.__name__ for t in spec)
    return spec.__name__


def _check_required(
    row: dict[str, Any], required: Mapping[str, _TypeSpec] | None, path: _PathLike, lineno: int
) -> None:
    """Raise :class:`DataError` unless every ``required`` key is in ``row`` with the given type."""
    for key, spec in (required or {}).items():
        if key not in row:
            raise DataError(f"missing required key {key!r} (row has keys {sorted(row)})", path, lineno)
        value = row[key]
        types = spec if isinstance(spec, tuple) else (spec,)
        # bool is a subclass of int, but a JSON true/false is never a valid count or score.
        is_bad_bool = isinstance(value, bool) and bool not in types
        if is_bad_bool or not isinstance(value, types):
            raise DataError(
                f"key {key!r} must be {_type_name(spec)}, got {type(value).__name__}: "
                f"{_excerpt(json.dumps(value, ensure_ascii=False))}",
                path,
                lineno,
            )


def _open_lines(path: Path) -> Iterator[bytes]:
    opener = gzip.open if path.suffix == ".gz" else open
    lineno = 0
    try:
        with opener(path, "rb") as f:
            for lineno, line in enumerate(f, start=1):  # the count says where a gzip breaks
                yield line
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:  # a truncated or corrupt compressed file
        raise DataError(f"corrupt or truncated gzip after {lineno} lines ({e})", path) from e


def _iter_jsonl(
    path: _PathLike, required: Mapping[str, _TypeSpec] | None = None
) -> Iterator[tuple[int, dict]]:
    """Yield ``(lineno, row)`` for each non-blank line of a JSONL (or ``.jsonl.gz``) file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(errno.ENOENT, "no such data file", str(path))
    if path.is_dir():
        raise DataError("is a folder, not a JSONL data file", path)
    for lineno, raw in enumerate(_open_lines(path), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(
                f"line is not valid UTF-8: {e.reason} at byte {e.start} of the line", path, lineno
            ) from e
        if lineno == 1:
            line = line.removeprefix("\ufeff")
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"invalid JSON: {e.msg} (column {e.colno}): {_excerpt(line.strip())}", path, lineno
            ) from e
        if not isinstance(row, dict):
            raise DataError(f"expected a JSON object, got {type(row).__name__}", path, lineno)
        _check_required(row, required, path, lineno)
        yield lineno, row


def _collect(rows: Iterable[Any], limit: int | None, path: _PathLike) -> list[Any]:
    """Take up to ``limit`` items from ``rows``; raise :class:`DataError` if there are none."""
    out: list[Any] = []
    iterator = iter(rows)
    try:
        for item in iterator:
            out.append(item)
            if limit is not None and len(out) >= limit:
                break
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()  # stop early: release the open file now, not at garbage collection
    if not out:
        raise DataError("no rows (the data is empty or only blank lines)", path)
    return out


def read_jsonl(
    path: _PathLike, required: Mapping[str, _TypeSpec] | None = None, limit: int | None = None
) -> list[dict]:
    """Read the JSON-object rows of a JSONL file (``.gz`` is decompressed).

    Args:
        path: the file.
        required: ``{key: type}`` (or a tuple of types) every row must have; ``bool`` never passes
            for ``int``/``float``.
        limit: return at most this many rows (a positive int); later lines are not read.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DataError: ``"{path}:{lineno}: {reason}"`` for invalid UTF-8 or JSON, a non-object row, a
            missing key or a wrongly typed value; ``"{path}: no rows ..."`` if there are no rows.
    """
    _check_limit(limit)
    return _collect((row for _, row in _iter_jsonl(path, required)), limit, path)


# --------------------------------------------------------------------------- preference pairs


@dataclass(frozen=True)
class PreferencePair:
    """One comparison: a shared prompt and two candidate RESPONSES (the text after the prompt).

    ``meta`` holds every other field of the source row (e.g. ``category``, ``gold_chosen``, and the
    row's own ``prompt`` field if it has one); it is not part of the hash.
    """

    prompt: str
    chosen: str
    rejected: str
    meta: dict = field(default_factory=dict, hash=False)


_PAIR_KEYS: dict[str, type] = {"chosen": str, "rejected": str}


def _first_difference(a: str, b: str) -> int:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))


def _row_to_pair(row: dict[str, Any], path: _PathLike, lineno: int) -> PreferencePair:
    """Validate one ``{"chosen", "rejected", ...}`` row (keys already type-checked) into a pair."""
    parts: dict[str, tuple[str, str]] = {}
    for side in ("chosen", "rejected"):
        try:
            parts[side] = split_hh(row[side])
        except ValueError as e:
            raise DataError(f"{side!r}: {e}", path, lineno) from e
    (prompt, chosen), (other_prompt, rejected) = parts["chosen"], parts["rejected"]
    if prompt != other_prompt:
        at = _first_difference(prompt, other_prompt)
        raise DataError(
            f"'chosen' and 'rejected' have different prompts; they differ at character {at}: "
            f"chosen {_excerpt(prompt[at:])} vs rejected {_excerpt(other_prompt[at:])}",
            path,
            lineno,
        )
    if chosen == rejected:
        raise DataError(f"'chosen' and 'rejected' responses are identical: {_excerpt(chosen)}", path, lineno)
    meta = {k: v for k, v in row.items() if k not in _PAIR_KEYS}
    return PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected, meta=meta)


def load_preference_pairs(path: _PathLike, limit: int | None = None) -> list[PreferencePair]:
    """Load ``{"chosen": transcript, "rejected": transcript, ...}`` JSONL rows as preference pairs.

    Works for our files and for real HH-RLHF files alike.  Each transcript is cut with
    :func:`split_hh`; both must share the same prompt and have different responses.  All other
    fields go to ``meta``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DataError: ``"{path}:{lineno}: {reason}"`` for any bad row, or if the file has no rows.
    """
    _check_limit(limit)
    pairs = (_row_to_pair(row, path, lineno) for lineno, row in _iter_jsonl(path, _PAIR_KEYS))
    return _collect(pairs, limit, path)


# --------------------------------------------------------------------------- prompts and SFT


def _check_prompt(prompt: str, path: _PathLike, lineno: int) -> None:
    """An HH prompt starts with a Human turn and ends with the open Assistant turn the model answers."""
    if not prompt.startswith(HUMAN):
        raise DataError(f"'prompt' must start with {HUMAN!r}; it starts {_excerpt(prompt)}", path, lineno)
    if not prompt.endswith(ASSISTANT):
        raise DataError(f"'prompt' must end with {ASSISTANT!r}; it ends {_excerpt(prompt, tail=True)}", path, lineno)


SFT_KEYS: dict[str, type] = {"prompt": str, "response": str}


def _check_sft_row(row: dict[str, Any], path: _PathLike, lineno: int) -> None:
    """An SFT row (keys already type-checked): an HH prompt and one non-blank reply."""
    _check_prompt(row["prompt"], path, lineno)
    if not row["response"].strip():
        raise DataError(f"'response' is empty: {row['response']!r}", path, lineno)
    if HUMAN in row["response"] or ASSISTANT in row["response"]:
        raise DataError(f"'response' holds a turn marker, so it is not one reply: {_excerpt(row['response'])}",
                        path, lineno)


def load_prompts(path: _PathLike, limit: int | None = None) -> list[dict]:
    """Load PPO prompt rows: each has a ``"prompt"`` str, an HH prompt (it starts with ``"\\n\\nHuman:"`` and
    ends with ``"\\n\\nAssistant:"``); other fields kept.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DataError: ``"{path}:{lineno}: {reason}"`` for any bad row, or if the file has no rows.
    """
    _check_limit(limit)

    def rows() -> Iterator[dict]:
        for lineno, row in _iter_jsonl(path, {"prompt": str}):
            _check_prompt(row["prompt"], path, lineno)
            yield row

    return _collect(rows(), limit, path)


def load_sft(path: _PathLike, limit: int | None = None) -> list[dict]:
    """Load SFT rows: each has an HH ``"prompt"`` and a non-blank ``"response"`` str holding no turn marker;
    other fields kept.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DataError: ``"{path}:{lineno}: {reason}"`` for any bad row, or if the file has no rows.
    """
    _check_limit(limit)

    def rows() -> Iterator[dict]:
        for lineno, row in _iter_jsonl(path, SFT_KEYS):
            _check_sft_row(row, path, lineno)
            yield row

    return _collect(rows(), limit, path)


# --------------------------------------------------------------------------- data folders


def data_kind(data_dir: _PathLike) -> str:
    """``"world"`` for the synthetic world's data (it has a gold judge), ``"hh-rlhf"`` for imported HH-RLHF
    (:func:`write_layout`); read from the folder's ``stats.json``."""
    path = Path(data_dir) / "stats.json"
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, "no stats.json in the data folder (write one with `python -m "
                                "rlhf_lite data`)", str(path))
    try:
        stats = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"not valid JSON: {e}", path) from e
    return stats.get("kind", "world")
