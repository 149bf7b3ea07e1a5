"""The one gold-score measurement that every stage reports, with the gold judge injected.

Every ``gold_score_*`` in every summary.json is this: the mean gold score over the test prompts of
responses sampled at temperature 1 from the model in question, with a fixed seed. SFT, vanilla PPO and
PPO-max are therefore directly comparable. The judge is a :class:`GoldJudge` given by the caller (the
synthetic world's, :func:`rlhf_lite.stage.world_judge`); data without one (HH-RLHF) reports no gold score.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from .generation import Rollout, decode_responses, encode_prompts, sample
from .text import Prompt

EVAL_SEED = 1234  # fixed sampling seed of the gold measurement, whatever the training seed


@dataclass(frozen=True)
class GoldJudge:
    """An oracle that scores any response: ``score(prompt, response, finished)`` reads the raw HH prompt;
    ``category(prompt)`` names the prompt's kind of task, one of ``categories`` (reported separately)."""

    score: Callable[[str, str, bool], float]
    category: Callable[[str], str]
    categories: tuple[str, ...]

    def report(self, prompts: Sequence[str], responses: Sequence[str], finished: Sequence[bool]) -> dict[str, float]:
        """Mean gold score overall and per category, plus ``"n"``; categories without items are omitted."""
        if not len(prompts) == len(responses) == len(finished):
            raise ValueError("prompts, responses and finished must have the same length")
        by_cat: dict[str, list[float]] = {}
        scores = []
        for p, r, f in zip(prompts, responses, finished):
            s = self.score(p, r, bool(f))
            scores.append(s)
            by_cat.setdefault(self.category(p), []).append(s)
        report = {"overall": float(np.mean(scores)) if scores else float("nan")}
        report.update({c: float(np.mean(by_cat[c])) for c in self.categories if c in by_cat})
        report["n"] = float(len(scores))
        return report


@dataclass
class GoldEval:
    """Result of :func:`evaluate_gold`: the report and the samples behind it."""

    report: dict[str, float]  # {"overall": ..., per category ..., "n": ...}
    prompts: list[Prompt]
    responses: list[str]
    finished: list[bool]
    lengths: list[int]  # response tokens, EOS included
    judge: GoldJudge
    samples_per_prompt: int = 1  # the prompts are repeated this many times in a row
    rollouts: list[Rollout] = field(default_factory=list)  # the sampled batches (tokens, masks, log-probs), in order

    def per_prompt_scores(self) -> list[float]:
        """The mean gold score of each distinct prompt's samples, in prompt order (the items a paired
        bootstrap resamples, :func:`rlhf_lite.stats.paired_bootstrap`)."""
        s, k = self.scores(), self.samples_per_prompt
        return [sum(s[i:i + k]) / k for i in range(0, len(s), k)]

    @property
    def score(self) -> float:
        return self.report["overall"]

    @property
    def by_category(self) -> dict[str, float]:
        return {k: v for k, v in self.report.items() if k not in ("overall", "n")}

    def scores(self) -> list[float]:
        """The gold score of each sample, in prompt order (for confidence intervals over prompts)."""
        return [self.judge.score(p.raw, r, f) for p, r, f in zip(self.prompts, self.responses, self.finished)]

    def samples(self, k: int = 4) -> list[dict]:
        """``k`` samples with their gold scores, for tables in notebooks and logs. All of them in order
        when ``k`` covers every prompt; otherwise one prompt of each category in turn (test prompts are
        grouped by category, so the first ``k`` would all be of one kind)."""
        by_cat: dict[str, list[int]] = {}
        for i, p in enumerate(self.prompts):
            by_cat.setdefault(self.judge.category(p.raw), []).append(i)
        picks: list[int] = list(range(len(self.prompts))) if k >= len(self.prompts) else []
        for rank in range(max((len(v) for v in by_cat.values()), default=0) if not picks else 0):
            picks += [v[rank] for v in by_cat.values() if rank < len(v)]
        return [
            {"category": self.judge.category(self.prompts[i].raw), "prompt": self.prompts[i].question,
             "response": self.responses[i].strip(),
             "gold": round(self.judge.score(self.prompts[i].raw, self.responses[i], self.finished[i]), 3)}
            for i in picks[:k]
        ]


def rollout_in_batches(
    forward: Callable | torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt_texts: Sequence[str],
    max_new_tokens: int,
    generator: torch.Generator,
    batch_size: int = 128,
    temperature: float = 1.0,
    device: torch.device | str = "cpu",
    keep: list[Rollout] | None = None,
) -> tuple[list[str], list[bool], list[int]]:
    """Sample one response per model prompt, in batches; returns texts, EOS flags and token lengths (and
    appends each batch's :class:`Rollout` to ``keep`` when given)."""
    texts: list[str] = []
    finished: list[bool] = []
    lengths: list[int] = []
    for i in range(0, len(prompt_texts), batch_size):
        ids, mask = encode_prompts(tokenizer, prompt_texts[i : i + batch_size], device)
        ro: Rollout = sample(forward, ids, mask, max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id,
                             temperature=temperature, generator=generator)
        texts += decode_responses(tokenizer, ro)
        if keep is not None:
            keep.append(ro)
        finished += ro.finished.tolist()
        lengths += ro.lengths.tolist()
    return texts, finished, lengths


def evaluate_gold(
    forward: Callable | torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    max_new_tokens: int,
    judge: GoldJudge,
    seed: int = EVAL_SEED,
    device: torch.device | str = "cpu",
    batch_size: int = 128,
    samples_per_prompt: int = 1,
) -> GoldEval:
    """Mean gold score of temperature-1 samples on ``prompts`` with a fixed seed (see module doc).

    ``samples_per_prompt`` > 1 samples each prompt that many times (the noise of one sample is large next to
    the differences between good models); the report averages every sample.
    """
    if samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt must be >= 1, got {samples_per_prompt}")
    prompts = [p for p in prompts for _ in range(samples_per_prompt)]
    gen = torch.Generator(device=torch.device(device)).manual_seed(seed)
    if isinstance(forward, torch.nn.Module):
        was_training = forward.training
        forward.eval()
    rollouts: list[Rollout] = []
    texts, finished, lengths = rollout_in_batches(forward, tokenizer, [p.text for p in prompts], max_new_tokens,
                                                  gen, batch_size=batch_size, device=device, keep=rollouts)
    if isinstance(forward, torch.nn.Module):
        forward.train(was_training)
    report = judge.report([p.raw for p in prompts], texts, finished)
    return GoldEval(report=report, prompts=prompts, responses=texts, finished=finished, lengths=lengths,
                    judge=judge, samples_per_prompt=samples_per_prompt, rollouts=rollouts)


__all__ = ["EVAL_SEED", "GoldEval", "GoldJudge", "evaluate_gold", "rollout_in_batches"]
