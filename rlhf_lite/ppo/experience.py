"""Phases 2-4 of a PPO iteration: score a rollout, shape the rewards, estimate advantages (docs/paper.md Sec. 2).

Tensors here live in *response space*: (B, N) with N the longest response of the buffer, where column i is
response token i. Logits at sequence position P-1+i predict token i, and the critic's value there is the
value of the state before token i.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, fields

import torch

from ..batching import last_token_index
from ..generation import Rollout
from ..models import AdapterStack
from . import core
from .config import PPOConfig


@dataclass
class Experience:
    """One rollout buffer in response space; all (B, N) unless stated."""

    input_ids: torch.Tensor  # (B, P + N) prompt + response
    attention_mask: torch.Tensor  # (B, P + N)
    prompt_len: int
    mask: torch.Tensor  # response tokens (float)
    old_logprobs: torch.Tensor  # log pi_old(token): the behaviour policy of the ratio
    ref_logprobs: torch.Tensor  # log pi_ref(token)
    old_values: torch.Tensor  # V_old(state before token)
    rewards: torch.Tensor  # shaped per-token rewards
    advantages: torch.Tensor
    returns: torch.Tensor
    finite: bool = True  # False: a non-finite RM score, so the buffer must not be trained on

    def minibatches(self, size: int, rng: random.Random) -> list[dict[str, torch.Tensor]]:
        """Shuffled minibatches of ``size`` rows, each a dict of the row-sliced tensors (views are not
        copied first: only the selected rows are gathered)."""
        order = list(range(self.mask.shape[0]))
        rng.shuffle(order)
        tensors = {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}
        out = []
        for i in range(0, len(order), size):
            idx = torch.tensor(order[i : i + size], device=self.mask.device)
            out.append({k: v[idx] for k, v in tensors.items()})
        return out


def response_logits(stack: AdapterStack, name: str | None, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    prompt_len: int) -> torch.Tensor:
    """Logits (B, N, V) that predict the N response tokens; lm_head runs on those positions only."""
    hidden = stack.hidden(name, input_ids, attention_mask)[:, prompt_len - 1 : -1]
    return stack.base_model.lm_head(hidden).float()


def response_values(stack: AdapterStack, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    prompt_len: int) -> torch.Tensor:
    """Critic values (B, N) of the states before each response token."""
    return stack.values("critic", input_ids, attention_mask)[:, prompt_len - 1 : -1]


def rm_scores(stack: AdapterStack, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """RM score (B,) read at each sequence's last token (the EOS, or the cap when there is none)."""
    values = stack.values("reward", input_ids, attention_mask)
    return values.gather(1, last_token_index(attention_mask)[:, None]).squeeze(1)


@dataclass
class Scores:
    """Phase 2 of a rollout of B rows with N response tokens: what the model passes give, per row."""

    ref_logprobs: torch.Tensor  # (B, N) log pi_ref(token) at the sampling temperature, 0 off the response
    values: torch.Tensor  # (B, N) V_old(state before token), 0 off the response
    scores: torch.Tensor  # (B,) RM score at each sequence's last token


@torch.no_grad()
def score_rollout(cfg: PPOConfig, stack: AdapterStack, reward_model: AdapterStack, ro: Rollout) -> Scores:
    """2. **score**: reference log-probs (adapters off), old values (critic), the RM score at the last token.
    Each row's numbers depend on that row only, so processes may score their own rows
    (:mod:`rlhf_lite.ppo.distributed`)."""
    P, ids, att = ro.prompt_len, ro.input_ids, ro.attention_mask
    mask = ro.response_mask[:, P:].float()
    ref_logits = response_logits(stack, None, ids, att, P) / cfg.temperature
    ref_logp = core.logprobs_from_logits(ref_logits, ids[:, P:]) * mask
    values = response_values(stack, ids, att, P) * mask
    return Scores(ref_logp, values, rm_scores(reward_model, ids, att))


@torch.no_grad()
def make_experience(cfg: PPOConfig, stack: AdapterStack, reward_model: AdapterStack, ro: Rollout,
                    moments: core.RunningMoments) -> tuple[Experience, dict]:
    """Score a rollout and turn it into a training buffer, with the iteration's monitors: phase 2 by
    :func:`score_rollout`, phases 3-4 by :func:`build_experience`."""
    return build_experience(cfg, ro, score_rollout(cfg, stack, reward_model, ro), moments)


@torch.no_grad()
def build_experience(cfg: PPOConfig, ro: Rollout, scored: Scores, moments: core.RunningMoments
                     ) -> tuple[Experience, dict]:
    """Phases 3-4 of a scored rollout, over the whole batch:

    3. **shape rewards**: score reparameterization of the RM score with running ``moments`` (updated here),
       then ``-eta * KL_t`` per token plus the score at the last token;
    4. **GAE**: advantages and returns over response tokens, optionally whitened and clipped.

    A non-finite RM score returns a buffer with ``finite=False`` and leaves ``moments`` untouched (they
    persist across iterations, so one NaN would poison every later one); the caller skips its update.
    """
    P = ro.prompt_len
    ids, att = ro.input_ids, ro.attention_mask
    mask = ro.response_mask[:, P:].float()
    old_logp = ro.logprobs[:, P:]
    ref_logp, values, scores = scored.ref_logprobs, scored.values, scored.scores
    finite = bool(torch.isfinite(scores).all())
    used = core.normalize_rewards(scores, moments, cfg.reward_norm, cfg.reward_clip) if finite else scores
    kl = core.kl_k1(old_logp, ref_logp) * mask
    rewards = core.shape_rewards(used, kl, mask, cfg.kl_coef)
    adv, ret = core.compute_gae(rewards, values, mask, cfg.gamma, cfg.lam)
    if cfg.adv_norm_clip is not None:
        adv = core.normalize_and_clip_advantages(adv, mask, cfg.adv_norm_clip)
    behaviour = ref_logp if cfg.old_policy == "reference" else old_logp
    exp = Experience(ids, att, P, mask, behaviour, ref_logp, values, rewards, adv, ret, finite)
    stats = {
        "reward": scores.mean().item(),
        "reward_std": scores.std().item() if len(scores) > 1 else 0.0,
        "reward_used": used.mean().item(),
        "kl_per_token": core.masked_mean(kl, mask).item(),
        "kl_per_sequence": (kl * mask).sum(-1).mean().item(),
        "kl_k3_per_token": core.masked_mean(core.kl_k3(old_logp, ref_logp), mask).item(),
        "response_length": mask.sum(-1).mean().item(),
        "finished_fraction": ro.finished.float().mean().item(),
        "policy_perplexity": core.response_perplexity(old_logp, mask).mean().item(),
        "ref_perplexity": core.response_perplexity(ref_logp, mask).mean().item(),
        "advantage_mean": core.masked_mean(adv, mask).item(),
        "return_mean": core.masked_mean(ret, mask).item(),
        "value_mean": core.masked_mean(values, mask).item(),
        "explained_variance": core.explained_variance(values, ret, mask),
    }
    if not finite:
        stats["nonfinite_scores"] = int((~torch.isfinite(scores)).sum())
    return exp, stats


__all__ = ["Experience", "Scores", "build_experience", "make_experience", "response_logits", "response_values",
           "rm_scores", "score_rollout"]
