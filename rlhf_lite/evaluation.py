"""The one gold-score measurement that every stage reports.

Every ``gold_score_*`` in every summary.json is this: the mean gold score over the test prompts of
responses sampled at temperature 1 from the model in question, with a fixed seed. SFT, vanilla PPO
and PPO-max are therefore directly comparable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerFast

from . import world
from .generation import Rollout, decode_responses, encode_prompts, sample

EVAL_SEED = 1234  # fixed sampling seed of the gold measurement, whatever the training seed


@dataclass
class GoldEval:
    """Result of :func:`evaluate_gold`: the report and the samples behind it."""

    report: dict[str, float]  # {"overall": ..., per category ..., "n": ...}
    prompts: list[str]
    responses: list[str]
    finished: list[bool]
    lengths: list[int]  # response tokens, EOS included

    @property
    def score(self) -> float:
        return self.report["overall"]

    def samples(self, k: int = 4) -> list[dict]:
        """``k`` samples with their gold scores, for tables in notebooks and logs. All of them in order
        when ``k`` covers every prompt; otherwise one prompt of each category in turn (test prompts are
        grouped by category, so the first ``k`` would all be arithmetic)."""
        by_cat: dict[str, list[int]] = {}
        for i, p in enumerate(self.prompts):
            by_cat.setdefault(world.category_of(p), []).append(i)
        picks: list[int] = list(range(len(self.prompts))) if k >= len(self.prompts) else []
        for rank in range(max((len(v) for v in by_cat.values()), default=0) if not picks else 0):
            picks += [v[rank] for v in by_cat.values() if rank < len(v)]
        return [
            {"category": world.category_of(self.prompts[i]),
             "prompt": self.prompts[i].split("Human:")[-1].replace("\n\nAssistant:", "").strip(),
             "response": self.responses[i].strip(),
             "gold": round(world.gold_score(self.prompts[i], self.responses[i], self.finished[i]), 3)}
            for i in picks[:k]
        ]


def rollout_in_batches(
    forward: Callable | torch.nn.Module,
    tokenizer: PreTrainedTokenizerFast,
    prompts: Sequence[str],
    max_new_tokens: int,
    generator: torch.Generator,
    batch_size: int = 128,
    temperature: float = 1.0,
    device: torch.device | str = "cpu",
) -> tuple[list[str], list[bool], list[int]]:
    """Sample one response per prompt, in batches; returns texts, EOS flags and token lengths."""
    texts: list[str] = []
    finished: list[bool] = []
    lengths: list[int] = []
    for i in range(0, len(prompts), batch_size):
        ids, mask = encode_prompts(tokenizer, prompts[i : i + batch_size], device)
        ro: Rollout = sample(forward, ids, mask, max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id,
                             temperature=temperature, generator=generator)
        texts += decode_responses(tokenizer, ro)
        finished += ro.finished.tolist()
        lengths += ro.lengths.tolist()
    return texts, finished, lengths


def evaluate_gold(
    forward: Callable | torch.nn.Module,
    tokenizer: PreTrainedTokenizerFast,
    prompts: Sequence[str],
    max_new_tokens: int,
    seed: int = EVAL_SEED,
    device: torch.device | str = "cpu",
) -> GoldEval:
    """Mean gold score of temperature-1 samples on ``prompts`` with a fixed seed (see module doc)."""
    gen = torch.Generator(device=torch.device(device)).manual_seed(seed)
    if isinstance(forward, torch.nn.Module):
        was_training = forward.training
        forward.eval()
    texts, finished, lengths = rollout_in_batches(forward, tokenizer, prompts, max_new_tokens, gen, device=device)
    if isinstance(forward, torch.nn.Module):
        forward.train(was_training)
    report = world.gold_report(prompts, texts, finished)
    return GoldEval(report=report, prompts=list(prompts), responses=texts, finished=finished, lengths=lengths)


def gold_of_responses(prompts: Sequence[str], responses: Sequence[str]) -> dict[str, float]:
    """Gold report of given (finished) responses, e.g. the SFT demonstrations themselves."""
    return world.gold_report(prompts, responses, [True] * len(prompts))
