"""The one measurement every method of notebook 06 is compared by, and what its stages share.

:func:`measure_policy` samples the test prompts with :func:`rlhf_lite.evaluation.evaluate_gold` (the gold
measurement of every stage: temperature 1, a fixed seed) and, on the very same samples, computes

* ``eval_kl_per_sequence``: KL(policy || reference) of whole responses, the mean over samples of
  sum_t [log pi(y_t) - log pi_ref(y_t)] (the k1 estimator, unbiased on samples of the policy); the x-axis
  of the over-optimization frontier (Gao et al. 2023 plot gold reward against this KL);
* ``eval_reward``: the RM's mean score of those samples (the proxy the RL methods maximize);
* the collapse monitors of the paper (length, the reference's perplexity, repeated trigrams).

So DPO, which never samples while it trains, is measured exactly as GRPO, PPO and the SFT model are.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..evaluation import EVAL_SEED, GoldEval, GoldJudge, evaluate_gold, rollout_in_batches
from ..generation import Rollout
from ..models import AdapterStack
from ..ppo import core
from ..ppo.experience import response_logits, rm_scores
from ..ppo.monitors import repeated_trigram_fraction
from ..text import Prompt


@dataclass(frozen=True)
class StagePreset:
    """A named set of changes to a stage's config (the profile's own), and what it shows."""

    name: str
    description: str
    changes: dict


def preset_config(presets: dict[str, StagePreset], name: str, base):
    """Preset ``name`` applied to ``base``; ValueError listing the presets if unknown."""
    from dataclasses import replace

    if name not in presets:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(presets)}")
    return replace(base, **presets[name].changes)


@dataclass
class SampleStats:
    """Per-sample figures of a batch of rollouts, all (N,) in sample order."""

    kl: torch.Tensor  # sum over response tokens of log pi - log pi_ref
    tokens: torch.Tensor  # response tokens, EOS included
    ref_logp: torch.Tensor  # sum over response tokens of log pi_ref
    reward: torch.Tensor | None  # the RM score (None without an RM)


@torch.no_grad()
def sample_stats(stack: AdapterStack, rollouts: Sequence[Rollout], reward_model: AdapterStack | None) -> SampleStats:
    """KL to the reference (adapters off on ``stack``), reference log-likelihood and RM score of each sampled
    response. The rollouts' own log-probs are the sampling policy's at temperature 1."""
    kl, tokens, ref, reward = [], [], [], []
    for ro in rollouts:
        P = ro.prompt_len
        mask = ro.response_mask[:, P:].float()
        ref_logp = core.logprobs_from_logits(response_logits(stack, None, ro.input_ids, ro.attention_mask, P),
                                             ro.input_ids[:, P:]) * mask
        kl.append(((ro.logprobs[:, P:] - ref_logp) * mask).sum(-1))
        ref.append(ref_logp.sum(-1))
        tokens.append(mask.sum(-1))
        if reward_model is not None:
            reward.append(rm_scores(reward_model, ro.input_ids, ro.attention_mask))
    return SampleStats(torch.cat(kl).cpu(), torch.cat(tokens).cpu(), torch.cat(ref).cpu(),
                       torch.cat(reward).float().cpu() if reward else None)


def summarize(stats: SampleStats, texts: Sequence[str]) -> dict[str, float]:
    """The ``eval_*`` figures of :func:`measure_policy` from per-sample stats."""
    n_tok = stats.tokens.clamp(min=1)
    out = {
        "eval_kl_per_sequence": stats.kl.mean().item(),
        "eval_kl_per_token": (stats.kl.sum() / n_tok.sum()).item(),
        "eval_response_length": stats.tokens.mean().item(),
        "eval_ref_perplexity": torch.exp(-stats.ref_logp / n_tok).mean().item(),
        "eval_repetition_fraction": repeated_trigram_fraction(list(texts)),
    }
    if stats.reward is not None:
        out["eval_reward"] = stats.reward.mean().item()
    return out


@torch.no_grad()
def measure_policy(stack: AdapterStack, name: str | None, tokenizer, prompts: Sequence[Prompt], max_new_tokens: int,
                   judge: GoldJudge | None, reward_model: AdapterStack | None = None, samples_per_prompt: int = 1,
                   seed: int = EVAL_SEED) -> tuple[dict[str, float], GoldEval | None, SampleStats]:
    """Sample ``prompts`` with adapter ``name`` (None: the reference, i.e. the SFT model) and measure the samples.

    Returns (row, the GoldEval, per-sample stats). The row has ``gold_score`` and ``gold/<category>`` (with a
    judge; the exact figures of :func:`evaluate_gold`) and the ``eval_*`` figures of :func:`summarize`
    (``eval_reward`` only with a ``reward_model``).
    """
    was_training = stack.training
    stack.eval()
    with stack.causal_lm(name) as lm:
        if judge is not None:
            ev = evaluate_gold(lm, tokenizer, prompts, max_new_tokens, judge, seed=seed, device=stack.device,
                               samples_per_prompt=samples_per_prompt)
            texts, rollouts = ev.responses, ev.rollouts
        else:
            ev, rollouts = None, []
            gen = torch.Generator(device=stack.device).manual_seed(seed)
            texts, _, _ = rollout_in_batches(lm, tokenizer, [p.text for p in prompts for _ in range(samples_per_prompt)],
                                             max_new_tokens, gen, device=stack.device, keep=rollouts)
    stats = sample_stats(stack, rollouts, reward_model)
    row = summarize(stats, texts)
    if ev is not None:
        row = {"gold_score": ev.score, **{f"gold/{k}": v for k, v in ev.by_category.items()}, **row}
    stack.train(was_training)
    return row, ev, stats


MONITORS = {"reward": "eval_reward", "kl_per_token": "eval_kl_per_token", "kl_per_sequence": "eval_kl_per_sequence",
            "response_length": "eval_response_length", "ref_perplexity": "eval_ref_perplexity",
            "repetition_fraction": "eval_repetition_fraction"}
"""The PPO monitors' names and the measurement each is read from where a stage has no rollouts (DPO)."""


def as_monitors(row: dict) -> dict:
    """``row`` plus the PPO monitor names (:data:`MONITORS`) read off its ``eval_*`` figures, so that the
    collapse detector and the PPO plots read a stage without rollouts too. Without an RM the reward is NaN
    (the detector's gold-falls-while-reward-rises rule then never fires)."""
    return {**row, "reward": math.nan, **{k: row[v] for k, v in MONITORS.items() if v in row}}


def measured_ppo_trainer():
    """:class:`~rlhf_lite.ppo.trainer.PPOTrainer` whose gold measurement is :func:`measure_policy`: the same
    gold figures (the same evaluate_gold call), plus KL and RM reward of the same samples. Measuring draws
    from its own generator, so the training is exactly run_ppo's."""
    from ..ppo.trainer import PPOTrainer

    class MeasuredPPOTrainer(PPOTrainer):
        def gold_eval(self) -> dict:
            if self.setup.judge is None:
                return {}
            row, _, _ = measure_policy(self.stack, "policy", self.tok, self.setup.test_prompts, self.cfg.max_new_tokens,
                                       self.setup.judge, self.setup.reward_model)
            return row

    return MeasuredPPOTrainer


__all__ = ["MONITORS", "SampleStats", "StagePreset", "as_monitors", "measure_policy", "measured_ppo_trainer",
           "preset_config", "sample_stats", "summarize"]
