"""Sampling world prompts, candidate responses for preference pairs, and SFT demonstrations.

Candidates are built from the world's fixed phrases around a task's answer frames: concise, padded with
fillers, buried after fillers, wrong, bare, repetitive and over-refusing answers (for harmful prompts
full and degenerate refusals and compliance), so that every case of the gold judge's table occurs.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

from .tasks import (
    CATEGORIES,
    COMPLIANCES,
    DEGENERATE_REFUSALS,
    FILLERS,
    GREETINGS,
    JUNK_WORDS,
    MAX_OPERAND,
    NUMBERS,
    REFUSALS,
    Task,
    _world,
    make_prompt,
    parse_task,
)


def _as_response(words: Iterable[str]) -> str:
    return " " + " ".join(words)


def _fillers(rng: random.Random, n: int, repeated: bool = False) -> list[str]:
    """``n`` filler phrases as words: distinct ones, or one phrase repeated."""
    phrases = [rng.choice(FILLERS)] * n if repeated else rng.sample(FILLERS, n)
    return [w for p in phrases for w in p.split()]


def _wrong_value(task: Task, rng: random.Random) -> tuple[str, ...]:
    """A plausible wrong value of the same kind as the answer (never the answer itself)."""
    if task.kind == "count":
        seq = list(task.answer)
        how = rng.randrange(3)
        if how == 0:
            del seq[rng.randrange(1, len(seq) - 1)]  # skip a middle number
        elif how == 1:
            seq.append(str(int(seq[-1]) + 1))  # one too far
        else:
            seq = seq[:-1]  # stop early
        return tuple(seq)
    if task.category == "arithmetic":
        c = int(task.answer[0])
        options = [v for v in range(2 * MAX_OPERAND + 1) if v != c and abs(v - c) <= 3]
        return (str(rng.choice(options)),)
    return (rng.choice(sorted(task.competitors - set(task.answer))),)


def _earlier_exchange(rng: random.Random) -> tuple[str, str]:
    """One benign earlier (Human, Assistant) exchange: a greeting or an answered training question."""
    if rng.random() < 0.5:
        return rng.choice(GREETINGS)
    split = _world()[1]
    question = rng.choice(split[rng.choice(CATEGORIES[:3])]["train"])
    task = _world()[0][question]
    return question, " ".join(task.full_forms[0])


def sample_prompt(rng: random.Random, split: str = "train", category: str | None = None,
                  multi_turn_p: float = 0.2) -> str:
    """A random world prompt from the ``split`` ("train" or "test") question pool."""
    cat = category or rng.choice(CATEGORIES)
    question = rng.choice(_world()[1][cat][split])
    earlier = [_earlier_exchange(rng)] if rng.random() < multi_turn_p else []
    return make_prompt(question, earlier)


def sample_candidate(task: Task, rng: random.Random) -> tuple[str, str]:
    """One candidate response for a preference pair: (kind, response text with leading space)."""
    if task.category == "harmful":
        kind = rng.choices(("refusal", "degenerate", "compliance", "repetitive"), (0.3, 0.2, 0.38, 0.12))[0]
        if kind == "refusal":
            padding = _fillers(rng, rng.randint(1, 2)) if rng.random() < 0.5 else []
            words = rng.choice(REFUSALS).split() + padding
        elif kind == "degenerate":
            words = rng.choice(DEGENERATE_REFUSALS).format(n=rng.choice(NUMBERS)).split()
        elif kind == "compliance":
            words = rng.choice(COMPLIANCES).split() + _fillers(rng, rng.choice((0, 0, 1, 2)))
        else:
            words = rng.choice(REFUSALS).split() + [rng.choice(JUNK_WORDS + ("sorry",))] * rng.randint(3, 8)
        return kind, _as_response(words)
    kinds = ("concise", "padded", "buried", "wrong", "bare", "repetitive", "over_refusal")
    kind = rng.choices(kinds, (0.18, 0.24, 0.08, 0.17, 0.1, 0.13, 0.1))[0]
    full = list(task.render(task.answer, 0 if rng.random() < 0.8 else rng.randrange(len(task.frames))))
    if kind == "concise":
        words = full
    elif kind == "padded":
        n, repeated = rng.randint(1, 3), rng.random() < 0.25
        words = full + _fillers(rng, max(n, 2) if repeated else n, repeated=repeated)
    elif kind == "buried":
        answer = full if rng.random() < 0.5 else list(task.bare_forms[0])
        words = _fillers(rng, rng.randint(1, 2)) + answer
    elif kind == "wrong":
        value = _wrong_value(task, rng)
        words = list(task.render(value, rng.randrange(len(task.frames)))) if rng.random() < 0.75 else [
            *value, "."]
        words += _fillers(rng, rng.choice((0, 0, 1, 2)))
    elif kind == "bare":
        words = list(task.answer) + (["."] if rng.random() < 0.8 else [])
    elif kind == "repetitive":
        if rng.random() < 0.6:
            words = full + [rng.choice(JUNK_WORDS)] * rng.randint(3, 8)
        else:
            words = full * rng.randint(2, 3)
    else:
        words = rng.choice(REFUSALS).split() + _fillers(rng, rng.choice((0, 0, 1)))
    return kind, _as_response(words)


def candidate_responses(prompt: str, rng: random.Random, n: int = 16) -> list[str]:
    """``n`` distinct-as-possible candidate responses for ``prompt`` (the pool preference pairs come from)."""
    task = parse_task(prompt)
    seen: dict[str, None] = {}
    for _ in range(4 * n):
        seen.setdefault(sample_candidate(task, rng)[1])
        if len(seen) == n:
            break
    return list(seen)


def sample_pair(rng: random.Random, split: str = "train") -> tuple[str, str, str]:
    """A (prompt, response_a, response_b) pair of two different candidates for one prompt."""
    prompt = sample_prompt(rng, split)
    task = parse_task(prompt)
    a = sample_candidate(task, rng)[1]
    b = a
    while b == a:
        b = sample_candidate(task, rng)[1]
    return prompt, a, b


def sample_sft_response(task: Task, rng: random.Random) -> tuple[str, str]:
    """One SFT demonstration: (quality, response); ideal 66 %, one filler 10 %, wrong 6 %, bare 18 %.

    Terse "bare" answers are the most common imperfection, as in real demonstration data: the SFT model
    inherits them, and a reward model that prefers full answers gives PPO something real to fix.
    """
    quality = rng.choices(("ideal", "filler", "wrong", "bare"), (0.66, 0.10, 0.06, 0.18))[0]
    frame = 0 if rng.random() < 0.85 else rng.randrange(len(task.frames))
    full = list(task.render(task.answer, frame))
    if quality == "ideal":
        words = full
    elif quality == "filler":
        words = full + _fillers(rng, 1)
    elif task.category == "harmful":
        # The harmful analogues: a wrong answer is compliance, a bare answer a degenerate refusal.
        words = rng.choice(COMPLIANCES).split() if quality == "wrong" else ["sorry", "."]
    elif quality == "wrong":
        words = list(task.render(_wrong_value(task, rng), frame))
    else:
        words = [*task.answer, "."]
    return quality, _as_response(words)
