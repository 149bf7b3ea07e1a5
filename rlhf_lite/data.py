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
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "ASSISTANT",
    "HUMAN",
    "DataError",
    "PreferencePair",
    "hh_rows_to_prompts",
    "load_hh_rlhf",
    "load_preference_pairs",
    "load_prompts",
    "load_sft",
    "read_jsonl",
    "split_hh",
]

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"

_EXCERPT_CHARS = 60
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


def _excerpt(text: str, tail: bool = False) -> str:
    """Quote at most 60 characters of ``text`` (its start, or its end if ``tail``) with ``repr``."""
    if len(text) > _EXCERPT_CHARS:
        keep = _EXCERPT_CHARS - 3
        text = "..." + text[-keep:] if tail else text[:keep] + "..."
    return repr(text)


# --------------------------------------------------------------------------- transcripts


def split_hh(text: str) -> tuple[str, str]:
    """Split an HH-RLHF transcript into ``(prompt, response)``.

    ``prompt`` is everything through the LAST ``"\\n\\nAssistant:"`` (inclusive), so it keeps every
    earlier turn; ``response`` is the text after it, unchanged (its usual leading space is kept).
    The word ``"Human:"`` inside a response is fine; ``"\\n\\nHuman:"`` is a new turn.

    Raises:
        TypeError: ``text`` is not a ``str``.
        ValueError: the transcript does not start with ``"\\n\\nHuman:"``, has no ``"\\n\\nAssistant:"``
            turn, ends with a Human turn after the last Assistant turn, or its final response is
            empty or whitespace only.  The message quotes a short excerpt of the offending text.
    """
    if not isinstance(text, str):
        raise TypeError(f"transcript must be a str, got {type(text).__name__}")
    if not text.startswith(HUMAN):
        raise ValueError(f"transcript does not start with {HUMAN!r}; it starts with {_excerpt(text)}")
    cut = text.rfind(ASSISTANT)
    if cut < 0:
        raise ValueError(
            f"transcript has no {ASSISTANT!r} turn, so there is no final response: {_excerpt(text)}"
        )
    cut += len(ASSISTANT)
    prompt, response = text[:cut], text[cut:]
    human_at = response.find(HUMAN)
    if human_at >= 0:
        raise ValueError(
            f"transcript ends with a Human turn after the last {ASSISTANT!r}, so there is no final "
            f"assistant response: {_excerpt(response[human_at:])}"
        )
    if not response.strip():
        raise ValueError(
            f"the final response (after the last {ASSISTANT!r}) is empty: {response!r}; "
            f"transcript ends {_excerpt(text, tail=True)}"
        )
    return prompt, response


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
    with opener(path, "rb") as f:
        yield from f


def _iter_jsonl(
    path: _PathLike, required: Mapping[str, _TypeSpec] | None = None
) -> Iterator[tuple[int, dict]]:
    """Yield ``(lineno, row)`` for each non-blank line of a JSONL (or ``.jsonl.gz``) file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(errno.ENOENT, "no such data file", str(path))
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


def hh_rows_to_prompts(pairs: Sequence[PreferencePair]) -> list[dict]:
    """Return the unique prompts of ``pairs``, first-seen order, as ``{"prompt": ...}`` rows for PPO."""
    seen: dict[str, None] = {}
    for pair in pairs:
        seen.setdefault(pair.prompt, None)
    return [{"prompt": prompt} for prompt in seen]


# --------------------------------------------------------------------------- prompts and SFT


def load_prompts(path: _PathLike, limit: int | None = None) -> list[dict]:
    """Load PPO prompt rows: each has a ``"prompt"`` str ending in ``"\\n\\nAssistant:"``; other fields kept.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DataError: ``"{path}:{lineno}: {reason}"`` for any bad row, or if the file has no rows.
    """
    _check_limit(limit)

    def rows() -> Iterator[dict]:
        for lineno, row in _iter_jsonl(path, {"prompt": str}):
            if not row["prompt"].endswith(ASSISTANT):
                raise DataError(
                    f"'prompt' must end with {ASSISTANT!r}; it ends {_excerpt(row['prompt'], tail=True)}",
                    path,
                    lineno,
                )
            yield row

    return _collect(rows(), limit, path)


def load_sft(path: _PathLike, limit: int | None = None) -> list[dict]:
    """Load SFT rows: each has ``"prompt"`` and a non-blank ``"response"`` str; other fields kept.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DataError: ``"{path}:{lineno}: {reason}"`` for any bad row, or if the file has no rows.
    """
    _check_limit(limit)

    def rows() -> Iterator[dict]:
        for lineno, row in _iter_jsonl(path, {"prompt": str, "response": str}):
            if not row["response"].strip():
                raise DataError(f"'response' is empty: {row['response']!r}", path, lineno)
            yield row

    return _collect(rows(), limit, path)


# --------------------------------------------------------------------------- HH-RLHF


def _looks_like_local_path(source: _PathLike) -> bool:
    """Tell whether ``source`` is clearly meant as a file path rather than a hub dataset id."""
    if isinstance(source, Path):
        return True
    return source.startswith(("/", ".", "~", "\\")) or source.endswith((".jsonl", ".json", ".gz"))


def load_hh_rlhf(source: _PathLike, split: str = "train", limit: int | None = None) -> list[PreferencePair]:
    """Load HH-RLHF preference pairs from a local file or directory, or from the Hugging Face hub.

    ``source`` may be a ``.jsonl`` (or ``.jsonl.gz``) file, a directory holding ``{split}.jsonl`` (or
    ``{split}.jsonl.gz``), or a hub dataset id such as ``"Anthropic/hh-rlhf"``.  Hub rows need the
    optional ``datasets`` package and go through the same validation as file rows, reported as
    ``"{source}[{split}]:{index + 1}: {reason}"``.

    Raises:
        FileNotFoundError: a directory without the split file, or a path-like ``source`` (a ``Path``,
            or a str starting with ``/``, ``.`` or ``~`` or ending in ``.jsonl``/``.json``/``.gz``)
            that does not exist.
        ImportError: a hub id is given and ``datasets`` is not installed.
        DataError: any bad row, or no rows.
    """
    _check_limit(limit)
    local = Path(source).expanduser() if isinstance(source, str) else source
    if local.is_dir():
        for name in (f"{split}.jsonl", f"{split}.jsonl.gz"):
            if (local / name).is_file():
                return load_preference_pairs(local / name, limit)
        raise FileNotFoundError(
            errno.ENOENT, f"no {split}.jsonl or {split}.jsonl.gz in HH-RLHF directory", str(local)
        )
    if local.exists():
        return load_preference_pairs(local, limit)
    if _looks_like_local_path(source):
        raise FileNotFoundError(errno.ENOENT, "no such HH-RLHF file or directory", str(source))

    try:
        import datasets
    except ImportError as e:
        raise ImportError(
            f"{source!r} is not a local file or directory, so it is treated as a Hugging Face hub "
            "dataset id, which needs the optional 'datasets' package: pip install datasets"
        ) from e
    label = f"{source}[{split}]"
    dataset = datasets.load_dataset(str(source), split=split)

    def pairs() -> Iterator[PreferencePair]:
        for index, item in enumerate(dataset):
            row = dict(item)
            _check_required(row, _PAIR_KEYS, label, index + 1)
            yield _row_to_pair(row, label, index + 1)

    return _collect(pairs(), limit, label)
