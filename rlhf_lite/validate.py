"""Every data row checked before anything trains: format, world parse, required and finite fields, token length.

The loaders of :mod:`rlhf_lite.data` check each row's format as they read it. This module adds what needs
the data's kind or a tokenizer, so that no problem surfaces only after a model has loaded or trained:

* on the synthetic world's data, every prompt must be a question of the world (the gold judge scores only
  those), and every preference row needs finite ``gold_chosen`` and ``gold_rejected`` scores (the RM's gold
  diagnostics read them; a NaN would be dropped from the agreement without a word);
* with the model's tokenizer and a token budget, every example must fit it (the tiny model does not
  truncate: a row too long would fail inside the tokenizer's batch, with no file and line).

Each error is a :class:`~rlhf_lite.data.DataError` ``"{path}:{line}: {reason}"``. Duplicate rows are counted;
on data other than the world's (which samples its questions with replacement, so repeats are expected)
they are reported with a :class:`DataWarning`. :func:`check_stage_data` knows which files and budgets each
stage needs, and then checks the stage's config against the data's size.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .data import (
    _PAIR_KEYS,
    SFT_KEYS,
    DataError,
    _check_prompt,
    _check_sft_row,
    _iter_jsonl,
    _row_to_pair,
    data_kind,
)
from .settings import revalidate
from .text import excerpt, model_prompt, model_response

KINDS = {"sft.jsonl": "sft", "prefs_train.jsonl": "prefs", "prefs_test.jsonl": "prefs",
         "prompts_train.jsonl": "prompts", "prompts_test.jsonl": "prompts"}
"""The data files of a data folder and the kind of row each holds."""
GOLD_KEYS = ("gold_chosen", "gold_rejected")
POLICY_STAGES = ("ppo", "dpo", "grpo", "bon")
"""The stages that train or sample a policy on the SFT model (:mod:`rlhf_lite.policy_setup`)."""


class DataWarning(UserWarning):
    """Data that works but is likely not as meant (duplicate rows)."""


@dataclass
class Row:
    """What a row gives the model: its HH prompt and (for SFT and preference rows) the responses."""

    lineno: int
    prompt: str
    responses: tuple[str, ...] = ()


@dataclass
class DataCheck:
    """The result of :func:`check_data`: rows per file, the data's kind, duplicates per file."""

    kind: str
    rows: dict[str, int] = field(default_factory=dict)
    duplicates: dict[str, int] = field(default_factory=dict)


def _world_question(prompt: str, path: Path, lineno: int) -> None:
    from .world import parse_task

    try:
        parse_task(prompt)
    except ValueError as e:
        raise DataError(f"the prompt is not a question of the synthetic world ({e}); this data folder's "
                        "stats.json says it is world data, which the gold judge scores", path, lineno) from e


def _gold(row: dict, path: Path, lineno: int) -> None:
    for key in GOLD_KEYS:
        value = row.get(key)
        if key not in row:
            raise DataError(f"missing {key!r}: world preference rows carry the gold judge's scores", path, lineno)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise DataError(f"{key!r} must be a finite number, got {value!r}", path, lineno)


def read_rows(path: Path, kind: str, world: bool) -> tuple[list[Row], int]:
    """Every row of data file ``path`` (of ``kind`` "sft", "prefs" or "prompts") checked; returns the rows and
    how many repeat an earlier row. A file read before (same size and modification time) is not read again:
    the pipeline's stages check the same files."""
    stat = path.stat() if path.is_file() else None
    return _read_rows(path, kind, world, stat and (stat.st_size, stat.st_mtime_ns))


@functools.lru_cache(maxsize=16)
def _read_rows(path: Path, kind: str, world: bool, version: tuple[int, int] | None) -> tuple[list[Row], int]:
    rows, seen, repeats = [], set(), 0
    required = {"sft": SFT_KEYS, "prefs": _PAIR_KEYS, "prompts": {"prompt": str}}[kind]
    for lineno, raw in _iter_jsonl(path, required):
        if kind == "prefs":
            pair = _row_to_pair(raw, path, lineno)
            row, key = Row(lineno, pair.prompt, (pair.chosen, pair.rejected)), (raw["chosen"], raw["rejected"])
            if world:
                _gold(raw, path, lineno)
        elif kind == "sft":
            _check_sft_row(raw, path, lineno)
            row, key = Row(lineno, raw["prompt"], (raw["response"],)), (raw["prompt"], raw["response"])
        else:
            _check_prompt(raw["prompt"], path, lineno)
            row, key = Row(lineno, raw["prompt"]), raw["prompt"]
        if world:
            _world_question(row.prompt, path, lineno)
        repeats += key in seen
        seen.add(key)
        rows.append(row)
    if not rows:
        raise DataError("no rows (the data is empty or only blank lines)", path)
    return rows, repeats


def check_lengths(tokenizer, path: Path, rows: list[Row], limit: int, budget: str, system_prompt: bool = True) -> None:
    """Every prompt (+ response + EOS) of ``rows`` must fit ``limit`` tokens, counted as
    :func:`~rlhf_lite.text.encode_pair_texts` counts them; ``budget`` names where the limit comes from."""
    fast = getattr(tokenizer, "backend_tokenizer", None)  # lengths only: skip transformers' encoding objects

    def lengths(texts: set[str]) -> dict[str, int]:  # each distinct text once: world rows repeat a lot
        order = sorted(texts)
        if not order:
            return {}
        if fast is not None:
            return {t: len(e.ids) for t, e in zip(order, fast.encode_batch(order, add_special_tokens=False))}
        return dict(zip(order, map(len, tokenizer(order, add_special_tokens=False)["input_ids"])))

    p_len = lengths({model_prompt(tokenizer, r.prompt, system_prompt) for r in rows})
    r_len = lengths({model_response(tokenizer, x) for r in rows for x in r.responses})
    for row in rows:
        n = p_len[model_prompt(tokenizer, row.prompt, system_prompt)]
        n += max((r_len[model_response(tokenizer, x)] + 1 for x in row.responses), default=0)  # + EOS
        if n > limit:
            what = "prompt" if not row.responses else "prompt and response (with EOS)"
            raise DataError(f"{what} of {n} tokens exceeds {budget} = {limit} tokens: {excerpt(row.prompt, True)}",
                            path, row.lineno)


def check_data(data_dir: str | Path, files: Iterable[str] = tuple(KINDS), tokenizer=None,
               budgets: Mapping[str, tuple[int, str]] | None = None, system_prompt: bool = True) -> DataCheck:
    """Check every row of ``files`` in ``data_dir``: format, world parse (world data), gold fields (world
    preference rows) and, with a ``tokenizer``, the token budgets ``{file: (limit, what the limit is)}``.
    Raises DataError naming the file and line; returns the row counts."""
    folder = Path(data_dir)
    check = DataCheck(data_kind(folder))
    world = check.kind == "world"
    for name in files:
        rows, repeats = read_rows(folder / name, KINDS[name], world)
        check.rows[name], check.duplicates[name] = len(rows), repeats
        if repeats and not world:
            warnings.warn(f"{folder / name}: {repeats} of {len(rows)} rows repeat an earlier row", DataWarning,
                          stacklevel=2)
        if tokenizer is not None and budgets and name in budgets:
            check_lengths(tokenizer, folder / name, rows, *budgets[name], system_prompt)
    return check


def check_stage_data(stage: str, data_dir: str | Path, cfg, profile, tokenizer=None,
                     context: int | None = None) -> DataCheck:
    """Check the data files stage ``stage`` reads, their token budgets where the model does not truncate (the
    tiny model), and ``cfg`` against the data's size. ``stage``: "sft", "rm", or one of :data:`POLICY_STAGES`
    (which sample the prompts; DPO also trains on the preference pairs). ``tokenizer``: the model's (the
    world's tokenizer.json for the tiny SFT stage, loaded here when not given); ``context``: the model's
    context length (read from the tiny profile when not given)."""
    folder = Path(data_dir)
    world = data_kind(folder) == "world"
    tiny = profile.model.is_tiny
    context = context or (profile.model.tiny.max_positions if tiny else None)
    budgets: dict[str, tuple[int, str]] = {}
    if stage == "sft":
        files = ["sft.jsonl"] + ["prefs_train.jsonl"] * bool(cfg.pretrain_steps) + ["prompts_test.jsonl"] * world
        limit = (cfg.max_len, "SFTConfig.max_len") if cfg.max_len else (context, "the model's context")
        budgets = {"sft.jsonl": limit, "prefs_train.jsonl": limit}
        if tiny and tokenizer is None:
            from .tokenizer import load_tokenizer

            tokenizer = load_tokenizer(folder / "tokenizer.json")
    elif stage == "rm":
        files = ["prefs_train.jsonl", "prefs_test.jsonl"] + ["prompts_test.jsonl"] * world
        limit = (cfg.max_len, "RMConfig.max_len") if cfg.max_len else (context, "the model's context")
        budgets = {"prefs_train.jsonl": limit, "prefs_test.jsonl": limit}
    elif stage in POLICY_STAGES:
        name = type(cfg).__name__
        files = ["prompts_train.jsonl", "prompts_test.jsonl"] + ["sft.jsonl"] * bool(getattr(cfg, "ptx_coef", None))
        room = cfg.max_prompt_tokens or (context - cfg.max_new_tokens if context else None)
        what = (f"{name}.max_prompt_tokens" if cfg.max_prompt_tokens else
                f"the model's context minus {name}.max_new_tokens ({cfg.max_new_tokens})")
        if room is not None:
            budgets = {"prompts_train.jsonl": (room, what), "prompts_test.jsonl": (room, what),
                       "sft.jsonl": (room + cfg.max_new_tokens, f"{what} plus {name}.max_new_tokens")}
        limit = (cfg.max_len, f"{name}.max_len") if stage == "dpo" and cfg.max_len else (context, "the model's context")
        if stage == "dpo":  # DPO trains on the preference pairs
            files.insert(0, "prefs_train.jsonl")
            if limit[0] is not None:
                budgets["prefs_train.jsonl"] = limit
    else:
        raise ValueError(f"unknown stage {stage!r}; choose one of: sft, rm, {', '.join(POLICY_STAGES)}")
    if stage in POLICY_STAGES:
        revalidate(cfg, context)  # a response budget over the context is the config's error, not the data's
    check = check_data(folder, files, tokenizer if tiny else None, budgets, profile.model.system_prompt)
    if stage in POLICY_STAGES:
        revalidate(cfg, context, check.rows)
    else:
        revalidate(cfg, check.rows, gold=world)
    return check


__all__ = ["POLICY_STAGES", "DataCheck", "DataWarning", "check_data", "check_lengths", "check_stage_data", "read_rows"]
