"""PPO math for RLHF: one small pure function per equation.

Shapes: B = batch (sequences), T = token positions, V = vocabulary. Unless stated otherwise a tensor is
(B, T) and ``mask`` is 1 (or True) on response tokens and 0 elsewhere. Masks are treated as binary:
any nonzero entry selects the position. Masked-out entries of the inputs never influence any output,
even if they hold garbage (NaN, -100 labels, ...), because they are selected away with ``torch.where``
rather than multiplied by 0.

Section references: "docs/paper.md Sec. N" is this project's summary of the paper; "paper Sec. N" is
Zheng et al. 2023, "Secrets of RLHF in Large Language Models Part I: PPO" (arXiv 2307.04964).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from .masked import _bool_mask, masked_mean, masked_sum, masked_var, masked_whiten

MeanFn = Callable[[Tensor, Tensor], Tensor]
"""``mean(x, mask)``: the token mean of a loss; :func:`masked_mean` here, the mean over every process's tokens
in data-parallel training (:mod:`rlhf_lite.ppo.distributed`)."""

__all__ = [
    "MeanFn",
    "RunningMoments",
    "clip_grad_norm_global",
    "compute_gae",
    "entropy_bonus",
    "entropy_from_logits",
    "explained_variance",
    "global_grad_norm",
    "kl_k1",
    "kl_k3",
    "logprobs_from_logits",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "normalize_and_clip_advantages",
    "normalize_rewards",
    "policy_loss",
    "ptx_loss",
    "response_perplexity",
    "shape_rewards",
    "value_loss",
]


# ----------------------------------------------------------------------------------------------------
# Log-probabilities, entropy, KL estimators
# ----------------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision log-softmax loses the small differences that PPO ratios are made of.
    return torch.promote_types(dtype, torch.float32)


CHUNK_ELEMENTS = 1 << 23
"""Logits elements (8M: 32 MB in float32) processed at once by the log-softmax helpers below."""


def _row_chunks(logits: Tensor) -> list[slice]:
    """Slices over the B rows of (B, T, V) logits, as many rows per slice as fit :data:`CHUNK_ELEMENTS`."""
    B = logits.shape[0]
    per_row = max(1, logits[0].numel()) if B else 1
    step = max(1, CHUNK_ELEMENTS // per_row)
    return [slice(i, i + step) for i in range(0, B, step)]


def logprobs_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """Log-probability of each label under its logits: log softmax(logits)[..., label].

    logits: (B, T, V); labels: (B, T) int64 -> (B, T), in at least float32. Computed as
    logit[label] - logsumexp(logits) over chunks of rows, so the extra memory is bounded by
    :data:`CHUNK_ELEMENTS` rather than a full (B, T, V) log-softmax copy with a real vocabulary (the idea of
    TRL's ``selective_log_softmax``); a tiny vocabulary fits one chunk, which keeps the op count low on CPU.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on (B, T).")
    dtype = _compute_dtype(logits.dtype)
    parts = []
    for sl in _row_chunks(logits):
        chunk = logits[sl].to(dtype)  # (b, T, V)
        picked = chunk.gather(-1, labels[sl].unsqueeze(-1)).squeeze(-1)  # (b, T)
        parts.append(picked - torch.logsumexp(chunk, dim=-1))
    return torch.cat(parts) if parts else logits.new_zeros(labels.shape, dtype=dtype)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the categorical given by ``logits``: H = -sum_v p_v log p_v.

    logits: (B, T, V) -> (B, T), in at least float32, over chunks of rows (see :func:`logprobs_from_logits`).
    Logits of -inf (p = 0) contribute 0.
    """
    dtype = _compute_dtype(logits.dtype)
    parts = []
    for sl in _row_chunks(logits):
        logp = torch.log_softmax(logits[sl].to(dtype), dim=-1)
        # clamp turns -inf into a finite number so that 0 * log 0 gives 0 instead of NaN.
        parts.append(-(logp.exp() * logp.clamp_min(torch.finfo(dtype).min)).sum(-1))
    return torch.cat(parts) if parts else logits.new_zeros(logits.shape[:-1], dtype=dtype)


def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k1 estimator of KL(pi || pi_ref) on tokens sampled from pi: log pi(a) - log pi_ref(a).

    Unbiased but can be negative per token. This is the per-token KL of docs/paper.md Sec. 2 (paper Sec. 3,
    Eq. for r_total). Any shape; returns the same shape.
    """
    return logp - ref_logp


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3 estimator of KL(pi || pi_ref) on tokens sampled from pi: (r - 1) - log r with r = pi_ref/pi.

    Unbiased and always >= 0 (Schulman, "Approximating KL divergence", 2020). Any shape; same shape out.
    """
    log_r = ref_logp - logp
    return torch.expm1(log_r) - log_r  # expm1 keeps precision when r is close to 1


# ----------------------------------------------------------------------------------------------------
# Rewards and advantages
# ----------------------------------------------------------------------------------------------------


def _last_index(mask: Tensor) -> Tensor:
    """(B,) index of the last nonzero entry in each row of a (B, T) mask; ValueError on an empty row."""
    m = mask.to(torch.bool)
    if not bool(m.any(dim=1).all()):
        raise ValueError("every row needs at least one response token (a row of the mask is all zero).")
    positions = torch.arange(m.shape[1], device=m.device).expand_as(m)
    return torch.where(m, positions, -1).max(dim=1).values


def shape_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float | None) -> Tensor:
    """Token-level reward of docs/paper.md Sec. 2 / Sec. 3 item 1 (paper Sec. 5.4, token-level KL penalty).

    r_t = -kl_coef * kl_t on every response token, plus scores[b] added at the LAST response token of
    row b (the EOS). scores: (B,); kl, mask: (B, T) -> rewards (B, T), 0 off the mask. The mask may be
    left- or right-aligned; the score goes to the last nonzero mask position of each row. kl_coef None or
    0 gives the bare score at the last token. ``kl`` is typically ``kl_k1(logp, ref_logp)``, detached.
    """
    m = _bool_mask(kl, mask)
    if kl_coef:
        rewards = torch.where(m, -kl_coef * kl, torch.zeros_like(kl))
    else:
        rewards = torch.zeros_like(kl)
    last = _last_index(m).unsqueeze(1)  # (B, 1)
    return rewards.scatter_add(1, last, scores.to(rewards.dtype).unsqueeze(1))


def compute_gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation over response tokens (paper Sec. 3, docs/paper.md Sec. 2).

    delta_t = r_t + gamma * V_next - V_t and A_t = delta_t + gamma * lam * A_next, where "next" is the
    next response token of the same row and V, A after a row's last response token are 0. Positions
    with mask 0 are skipped (they pass the running V_next, A_next through untouched), so any layout
    works: right- or left-padded, a run in the middle, even gaps.

    rewards, values, mask: (B, T). Returns (advantages, returns), both (B, T) and detached (they are
    regression / policy-gradient targets); returns = A + V on the mask; both are 0 off the mask.
    """
    rewards, values = rewards.detach(), values.detach()
    m = _bool_mask(values, mask)
    dtype = torch.promote_types(rewards.dtype, values.dtype)
    next_value = torch.zeros(values.shape[0], dtype=dtype, device=values.device)  # (B,)
    next_adv = torch.zeros_like(next_value)
    advs_reversed = []
    for t in reversed(range(values.shape[1])):  # loop over T only; every op is over the whole batch
        m_t = m[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv_t = delta + gamma * lam * next_adv
        advs_reversed.append(torch.where(m_t, adv_t, 0.0))
        next_adv = torch.where(m_t, adv_t, next_adv)
        next_value = torch.where(m_t, values[:, t].to(dtype), next_value)
    advantages = torch.stack(advs_reversed[::-1], dim=1)
    returns = torch.where(m, advantages + values, 0.0)
    return advantages, returns


# ----------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------


def policy_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip_eps: float, mean: MeanFn = masked_mean
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate (paper Sec. 3, Eq. L^CLIP; docs/paper.md Sec. 2), token mean over the mask.

    loss = mean_t max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - eps, 1 + eps)), ratio = exp(logp - old).
    All inputs (B, T); ``logp`` carries the gradient. Returns (0-dim loss, stats), stats detached:
      clipfrac   - fraction of masked tokens where the clipped term is strictly the larger (zero grad),
      approx_kl  - mean k3 estimate of KL(pi_old || pi): (ratio - 1) - log ratio (as in CleanRL),
      ratio_mean - mean ratio; healthy values stay near 1.
    ``mean`` takes every token mean (see :data:`MeanFn`).
    """
    m = _bool_mask(logp, mask)
    log_ratio = torch.where(m, logp - old_logp, 0.0)  # 0 off-mask keeps exp() finite there
    ratio = log_ratio.exp()
    pg_unclipped = -advantages * ratio
    pg_clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    loss = mean(torch.maximum(pg_unclipped, pg_clipped), m)
    with torch.no_grad():
        stats = {
            "clipfrac": mean((pg_clipped > pg_unclipped).to(ratio.dtype), m),
            "approx_kl": mean(kl_k3(old_logp, logp), m),
            "ratio_mean": mean(ratio, m),
        }
    return loss, stats


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float | None, mean: MeanFn = masked_mean
) -> tuple[Tensor, dict[str, Tensor]]:
    """Critic loss, optionally clipped (value-loss clipping: paper Fig. 5 / Sec. 5.4; docs/paper.md Sec. 3 item 3).

    clip given: 0.5 * mean max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2); clip None:
    0.5 * mean (V - R)^2. Means over masked tokens; all inputs (B, T); ``values`` carries the gradient.
    Returns (0-dim loss, stats) with stats["vf_clipfrac"]: fraction of masked tokens where the clipped
    term is strictly the larger (0 when clip is None). ``mean``: see :data:`MeanFn`.
    """
    m = _bool_mask(values, mask)
    vf_unclipped = (values - returns) ** 2
    if clip is None:
        return 0.5 * mean(vf_unclipped, m), {"vf_clipfrac": torch.zeros((), device=values.device)}
    values_clipped = old_values + (values - old_values).clamp(-clip, clip)
    vf_clipped = (values_clipped - returns) ** 2
    loss = 0.5 * mean(torch.maximum(vf_unclipped, vf_clipped), m)
    with torch.no_grad():
        vf_clipfrac = mean((vf_clipped > vf_unclipped).to(values.dtype), m)
    return loss, {"vf_clipfrac": vf_clipfrac}


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """1 - Var[R - V] / Var[R] over masked entries: 1 is a perfect critic, 0 no better than a constant,
    negative worse than a constant. Returns nan when Var[R] == 0. values, returns, mask: (B, T).
    """
    values, returns = values.detach(), returns.detach()
    var_r = masked_var(returns, mask, unbiased=False).item()
    if var_r == 0.0:
        return math.nan
    return 1.0 - masked_var(returns - values, mask, unbiased=False).item() / var_r


# ----------------------------------------------------------------------------------------------------
# Score reparameterization (paper Sec. 5.3.1) and other PPO-max tricks
# ----------------------------------------------------------------------------------------------------


class RunningMoments:
    """Running mean and standard deviation of every value seen so far.

    Each ``update`` merges one batch's (count, mean, sum of squared deviations) into the running totals
    with the parallel algorithm of Chan, Golub and LeVeque (1979), in float64. ``std`` is the SAMPLE
    standard deviation (ddof=1, as in MOSS-RLHF and TRL); it is 1.0 until two values have been seen, so
    normalizing by it is harmless at the start.
    """

    def __init__(self) -> None:
        self.count: int = 0
        self._mean: float = 0.0
        self._m2: float = 0.0  # sum of squared deviations from the running mean

    @property
    def mean(self) -> float:
        return self._mean

    @property
    def var(self) -> float:
        """Sample variance (ddof=1); 1.0 before two values have been seen."""
        return self._m2 / (self.count - 1) if self.count > 1 else 1.0

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    def update(self, x: Tensor) -> None:
        """Merge all entries of ``x`` (any shape) into the running statistics."""
        x = x.detach().to(torch.float64).flatten()
        n_b = x.numel()
        if n_b == 0:
            return
        mean_b = x.mean().item()
        m2_b = ((x - mean_b) ** 2).sum().item()
        total = self.count + n_b
        delta = mean_b - self._mean
        self._mean += delta * n_b / total
        self._m2 += m2_b + delta**2 * self.count * n_b / total
        self.count = total

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "mean": self._mean, "m2": self._m2}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count, self._mean, self._m2 = int(state["count"]), float(state["mean"]), float(state["m2"])


def normalize_rewards(scores: Tensor, moments: RunningMoments, mode: str = "normalize", clip: float | None = None,
                      eps: float = 1e-8) -> Tensor:
    """Score reparameterization (paper Sec. 5.3.1; docs/paper.md Sec. 3 item 2). scores: (B,) -> (B,).

    Updates ``moments`` with this batch FIRST (every mode keeps them, so a checkpoint's state does not
    depend on the mode), then with the running statistics over all scores seen:

    * ``"normalize"``: (r - mean) / (std + eps), PPO-max's reward normalization;
    * ``"scale"``: r / (std + eps), no mean shift (in the paper's Fig. 6 this variant collapses first);
    * ``"none"``: r itself.

    ``clip`` then clips the result to [-clip, clip] (PPO-max: normalize, then clip to 0.8); None: no clipping.
    """
    moments.update(scores)
    if mode == "normalize":
        scores = (scores - moments.mean) / (moments.std + eps)
    elif mode == "scale":
        scores = scores / (moments.std + eps)
    elif mode != "none":
        raise ValueError(f"reward normalization mode must be 'normalize', 'scale' or 'none', got {mode!r}")
    return scores if clip is None else scores.clamp(-clip, clip)


def normalize_and_clip_advantages(advantages: Tensor, mask: Tensor, clip: float | None) -> Tensor:
    """Advantage normalization and clipping (paper Sec. 5.3.1): whiten over the masked entries (mean 0,
    std 1), then clip to [-clip, clip] (clip None: no clipping). (B, T) -> (B, T); 0 off the mask.
    """
    whitened = masked_whiten(advantages, mask)
    return whitened if clip is None else whitened.clamp(-clip, clip)


def entropy_bonus(entropy: Tensor, mask: Tensor, coef: float, target: float, mean: MeanFn = masked_mean) -> Tensor:
    """The paper's entropy term (paper Sec. 5.3.2; docs/paper.md Sec. 3): a LOSS coef * |mean_H - target|.

    Unlike the usual bonus -coef * H, which always pushes entropy up, this pulls the mean response
    entropy toward ``target`` from either side. entropy, mask: (B, T) -> 0-dim tensor to ADD to the loss.
    ``mean`` must give the mean's full value (it sits inside the absolute value).
    """
    return coef * (mean(entropy, mask) - target).abs()


def ptx_loss(logits: Tensor, labels: Tensor, loss_mask: Tensor, mean: MeanFn = masked_mean) -> Tensor:
    """Pretraining / SFT language-model loss, PPO-max's ptx term (docs/paper.md Sec. 3 item 8; paper Sec. 5.4).

    Mean token cross-entropy -log p(label) over positions where ``loss_mask`` is 1 (the SFT response
    tokens). logits: (B, T, V); labels, loss_mask: (B, T). No shifting happens here: ``logits[:, t]``
    must already predict ``labels[:, t]``. Labels off the mask may be anything (e.g. -100). Returns a
    0-dim tensor; the caller multiplies it by its ptx coefficient. ``mean``: see :data:`MeanFn`.
    """
    m = _bool_mask(labels, loss_mask)
    safe_labels = torch.where(m, labels, 0)  # gather needs a valid index even where ignored
    return -mean(logprobs_from_logits(logits, safe_labels), m)


def clip_grad_norm_global(params: Iterable[Tensor], max_norm: float) -> float:
    """Global gradient clipping (paper Sec. 5.4; docs/paper.md Sec. 3 item 6): ONE L2 norm over the gradients of all given
    parameters (policy and critic together), all scaled by the same factor if it exceeds ``max_norm``.
    Parameters without a gradient are skipped. Returns the total norm BEFORE clipping, as a float.
    """
    return float(torch.nn.utils.clip_grad_norm_(list(params), max_norm))


def global_grad_norm(params: Iterable[Tensor]) -> float:
    """The L2 norm that :func:`clip_grad_norm_global` clips, without clipping: one norm over every
    gradient of ``params`` (those without one are skipped; 0.0 if none). NaN or inf propagate, so the
    trainer can use it as its non-finite gradient check.
    """
    return float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))


def response_perplexity(logp: Tensor, mask: Tensor) -> Tensor:
    """Standard per-sequence perplexity exp(-mean_t log p_t) over each row's response tokens.

    logp, mask: (B, T) -> (B,). This is the standard definition, NOT the paper's training "perplexity"
    (which divides the mean cross-entropy by the response length again; docs/paper.md Sec. 4). Rows with no
    response tokens give 1.0 (an empty mean is taken as 0).
    """
    return torch.exp(-masked_mean(logp.detach(), mask, dim=-1))
