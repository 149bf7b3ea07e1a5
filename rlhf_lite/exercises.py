"""Checks for the exercises of notebooks 00 to 04 and 06: the learner's function against the package's own.

Each ``check_*`` takes the learner's function, runs it and the package's reference on hand-built and random
inputs (padding with garbage in it, left- and right-padded rows, several settings), and raises an
AssertionError that says what differs. A function that still raises NotImplementedError is reported as
not attempted, so an untouched notebook runs through. ``notebooks/solutions.ipynb`` holds one solution
of each; the tests check that the checks pass it and fail wrong ones.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from . import stats
from .ppo import core

NOT_ATTEMPTED = "not attempted yet: replace the `raise NotImplementedError` (solutions: notebooks/solutions.ipynb)"


def _masks() -> list[torch.Tensor]:
    """Right-padded, left-padded and full rows, as the trainer and the worked examples use them."""
    return [torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.float64),
            torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 1]], dtype=torch.float64)]


def _noisy(shape, gen, mask: torch.Tensor | None = None, garbage: float = 9.9) -> torch.Tensor:
    """Random values, with ``garbage`` in the padding so that a leak shows."""
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    return x if mask is None else torch.where(mask.bool(), x, torch.full_like(x, garbage))


def _close(name: str, got, want: torch.Tensor, case: str, atol: float = 1e-6) -> None:
    got = torch.as_tensor(got, dtype=want.dtype)
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)}, expected {tuple(want.shape)} ({case})"
    assert torch.allclose(got, want, atol=atol), (
        f"{name} differs ({case}):\n  yours:    {got.tolist()}\n  expected: {want.tolist()}")


def _close_with_grads(name: str, fn: Callable, ref: Callable, wrt: dict[str, torch.Tensor], rest: tuple,
                      case: str) -> None:
    """Compare ``fn(*wrt, *rest)`` with ``ref(*wrt, *rest)``, each on its own leaf copies of ``wrt``: the value
    (the first item where ``ref`` returns ``(loss, stats)``), then the gradient with respect to every input of
    ``wrt`` (its keys name them in the message)."""
    mine = [x.clone().requires_grad_(True) for x in wrt.values()]
    theirs = [x.clone().requires_grad_(True) for x in wrt.values()]
    got, want = fn(*mine, *rest), ref(*theirs, *rest)
    want = want[0] if isinstance(want, tuple) else want
    _close(name, got.detach(), want.detach(), case)
    got.backward(), want.backward()
    for label, a, b in zip(wrt, mine, theirs):
        _close(f"d {name} / d {label}", a.grad, b.grad, case)


def attempt(check: Callable, fn: Callable) -> str:
    """Run ``check(fn)``; a message for the notebook, NOT_ATTEMPTED for an untouched stub."""
    try:
        n = check(fn)
    except NotImplementedError:
        return NOT_ATTEMPTED
    return f"correct: equal to the package's reference on {n} cases"


# ----- notebook 00 ---------------------------------------------------------------------------------
def _shifted_ptx_loss(logits: torch.Tensor, ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """The SFT loss as sft.lm_loss computes it: the logits at t predict the token at t + 1."""
    return core.ptx_loss(logits[:, :-1], ids[:, 1:], loss_mask[:, 1:])


def check_sft_loss(fn: Callable) -> int:
    """``fn(logits (B, T, V), ids (B, T), loss_mask (B, T)) -> loss``, the SFT loss: mean next-token cross-entropy
    over every position whose *target* is a response token (one mean over the batch's tokens), against
    core.ptx_loss on the shifted tensors, as sft.lm_loss computes it. Checks the value and the gradient with
    respect to the logits."""
    n = 0
    for seed, mask in enumerate(_masks()):
        gen = torch.Generator().manual_seed(110 + seed)
        for vocab in (5, 11):
            ids = torch.randint(0, vocab, mask.shape, generator=gen)
            logits = 2.0 * torch.randn((*mask.shape, vocab), generator=gen, dtype=torch.float64)
            _close_with_grads("SFT loss", fn, _shifted_ptx_loss, {"logits": logits}, (ids, mask),
                              f"loss_mask {mask.long().tolist()}, vocabulary {vocab}")
            n += 1
    return n


# ----- notebook 01 ---------------------------------------------------------------------------------
def check_scores_at_eos(fn: Callable) -> int:
    """``fn(values (B, T), attention_mask (B, T)) -> scores (B,)``: each row's value at its last real token,
    for left- and right-padded rows, against rm.scores_at_eos."""
    from .rm import scores_at_eos

    n = 0
    for seed, mask in enumerate(_masks()):
        gen = torch.Generator().manual_seed(120 + seed)
        values = _noisy(mask.shape, gen, mask)
        _close("scores", fn(values.clone(), mask.long()), scores_at_eos(values, mask.long()),
               f"attention_mask {mask.long().tolist()}, values {values.round(decimals=2).tolist()}")
        n += 1
    return n


def check_pairwise_loss(fn: Callable) -> int:
    """``fn(r_chosen (B,), r_rejected (B,)) -> loss``, the Bradley-Terry loss (paper Eq. 1), against
    rm.pairwise_loss: the value and both gradients, including margins below -745, where ``sigmoid``
    underflows to 0 in float64 (so ``log(sigmoid(.))`` is -inf) and ``logsigmoid`` stays finite."""
    from .rm import pairwise_loss

    gen = torch.Generator().manual_seed(130)
    n = 0
    for scale in (1.0, 5.0, 1000.0):
        for batch in (1, 4, 9):
            rc, rr = scale * _noisy((batch,), gen), scale * _noisy((batch,), gen)
            _close_with_grads("loss", fn, pairwise_loss, {"r_chosen": rc, "r_rejected": rr}, (),
                              f"{batch} pairs, margins {(rc - rr).round(decimals=2).tolist()}")
            n += 1
    return n


# ----- notebook 02 ---------------------------------------------------------------------------------
def check_shape_rewards(fn: Callable) -> int:
    """``fn(scores (B,), kl (B, T), mask (B, T), kl_coef) -> rewards (B, T)`` against core.shape_rewards."""
    n = 0
    for seed, mask in enumerate(_masks()):
        gen = torch.Generator().manual_seed(seed)
        scores, kl = _noisy((3,), gen), _noisy(mask.shape, gen, mask)
        for coef in (None, 0.05, 0.2):
            _close("shaped reward", fn(scores, kl, mask, coef), core.shape_rewards(scores, kl, mask, coef),
                   f"mask {mask.tolist()}, kl_coef {coef}")
            n += 1
    return n


def check_gae(fn: Callable) -> int:
    """``fn(rewards, values, mask, gamma, lam) -> advantages (B, T)`` against core.compute_gae."""
    n = 0
    for seed, mask in enumerate(_masks()):
        gen = torch.Generator().manual_seed(10 + seed)
        rewards, values = _noisy(mask.shape, gen, mask, 0.0), _noisy(mask.shape, gen, mask)
        for gamma, lam in ((1.0, 0.95), (1.0, 1.0), (0.9, 0.5), (1.0, 0.0)):
            want, _ = core.compute_gae(rewards, values, mask, gamma, lam)
            _close("advantages", fn(rewards, values, mask, gamma, lam), want,
                   f"mask {mask.tolist()}, gamma {gamma}, lambda {lam}")
            n += 1
    return n


def check_policy_loss(fn: Callable) -> int:
    """``fn(logp, old_logp, advantages, mask, clip_eps) -> loss`` against core.policy_loss: the value and its
    gradient with respect to ``logp`` (which shows whether the right tokens are clipped)."""
    n = 0
    for seed, mask in enumerate(_masks()):
        gen = torch.Generator().manual_seed(20 + seed)
        old = _noisy(mask.shape, gen, mask) - 2.0
        logp = old + 0.4 * _noisy(mask.shape, gen)  # ratios from about 0.5 to 2: many clipped tokens
        adv = _noisy(mask.shape, gen, mask)
        for eps in (0.2, 0.1):
            _close_with_grads("loss", fn, core.policy_loss, {"logp": logp}, (old, adv, mask, eps),
                              f"mask {mask.tolist()}, clip_eps {eps}")
            n += 1
    return n


# ----- notebook 03 ---------------------------------------------------------------------------------
def check_running_normalize(fn: Callable) -> int:
    """``fn(batches: list of (B,) tensors, clip) -> list of normalized, clipped tensors``, the statistics
    running over every score seen so far, against core.RunningMoments + core.normalize_rewards."""
    gen = torch.Generator().manual_seed(30)
    n = 0
    for clip in (0.8, 0.3, None):
        batches = [3.0 * _noisy((b,), gen) + shift for b, shift in ((4, 1.0), (6, 2.0), (5, 4.0), (3, 8.0))]
        moments = core.RunningMoments()
        want = [core.normalize_rewards(b, moments, "normalize", clip) for b in batches]
        got = fn([b.clone() for b in batches], clip)
        assert len(got) == len(want), f"{len(got)} batches returned for {len(want)} given"
        for i, (g, w) in enumerate(zip(got, want)):
            _close(f"batch {i}", g, w, f"clip {clip}", atol=1e-5)
        n += 1
    return n


def check_value_loss(fn: Callable) -> int:
    """``fn(values, old_values, returns, mask, clip) -> loss`` against core.value_loss (value and gradient)."""
    n = 0
    for seed, mask in enumerate(_masks()):
        gen = torch.Generator().manual_seed(40 + seed)
        old, ret = _noisy(mask.shape, gen, mask), _noisy(mask.shape, gen, mask)
        values = old + 0.5 * _noisy(mask.shape, gen)
        for clip in (None, 0.2):
            _close_with_grads("value loss", fn, core.value_loss, {"values": values}, (old, ret, mask, clip),
                              f"mask {mask.tolist()}, clip {clip}")
            n += 1
    return n


def check_global_clip(fn: Callable) -> int:
    """``fn(grads: list of tensors, max_norm) -> (clipped grads, norm before)`` against
    core.clip_grad_norm_global on parameters holding the same gradients."""
    gen = torch.Generator().manual_seed(50)
    n = 0
    for scale, max_norm in ((1.0, 1.0), (0.05, 1.0), (3.0, 0.5)):
        grads = [scale * _noisy(shape, gen) for shape in ((3, 4), (5,), (2, 2, 2))]
        params = [torch.zeros_like(g, requires_grad=True) for g in grads]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        norm = core.clip_grad_norm_global(params, max_norm)
        got, got_norm = fn([g.clone() for g in grads], max_norm)
        assert abs(float(got_norm) - norm) < 1e-6, f"norm before clipping {float(got_norm)}, expected {norm}"
        for i, (g, p) in enumerate(zip(got, params)):
            _close(f"gradient {i}", g, p.grad, f"norm {norm:.3f}, max_norm {max_norm}")
        n += 1
    return n


# ----- notebook 04 ---------------------------------------------------------------------------------
def check_mean_ci(fn: Callable) -> int:
    """``fn(values) -> (low, high)``, the t 95 % interval of the mean, against stats.mean_ci."""
    cases = [[0.61, 0.58, 0.66], [1.0, 2.0, 3.0], [0.2, 0.25], [0.5, 0.1, 0.9, 0.3, 0.7]]
    for values in cases:
        want = stats.mean_ci(values)
        low, high = fn(list(values))
        assert abs(low - want.low) < 1e-6 and abs(high - want.high) < 1e-6, (
            f"values {values}: yours [{low:.6f}, {high:.6f}], expected [{want.low:.6f}, {want.high:.6f}]")
    return len(cases)


def check_paired_bootstrap(fn: Callable) -> int:
    """``fn(a, b, n_resamples, seed) -> (low, high)`` against stats.paired_bootstrap (same resampling:
    ``np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))``, percentiles by np.quantile)."""
    rng = np.random.default_rng(60)
    n = 0
    for size, gain in ((50, 0.1), (200, 0.0), (256, -0.05)):
        b = rng.normal(0, 1, size)
        a = b + gain + rng.normal(0, 0.3, size)
        for seed in (0, 7):
            want = stats.paired_bootstrap(a, b, n_resamples=2000, seed=seed)
            low, high = fn(a.copy(), b.copy(), 2000, seed)
            assert abs(low - want.low) < 1e-9 and abs(high - want.high) < 1e-9, (
                f"{size} prompts, seed {seed}: yours [{low:.6f}, {high:.6f}], expected [{want.low:.6f}, {want.high:.6f}]")
            n += 1
    return n


def check_entropy_term(fn: Callable) -> int:
    """``fn(entropy, mask, coef, target) -> loss term`` against core.entropy_bonus (value and gradient)."""
    n = 0
    for seed, mask in enumerate(_masks()):
        gen = torch.Generator().manual_seed(70 + seed)
        entropy = _noisy(mask.shape, gen, mask).abs()
        for coef, target in ((0.05, 0.2), (0.05, 1.0), (0.5, 0.0)):
            _close_with_grads("entropy term", fn, core.entropy_bonus, {"entropy": entropy}, (mask, coef, target),
                              f"coef {coef}, target {target}")
            n += 1
    return n


# ----- notebook 06 ---------------------------------------------------------------------------------
def check_dpo_loss(fn: Callable) -> int:
    """``fn(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, label_smoothing) -> loss`` (all
    (B,) sequence log-probs) against beyond.dpo.dpo_loss: the value and the gradients with respect to both
    policy log-probs."""
    from .beyond.dpo import dpo_loss

    gen = torch.Generator().manual_seed(80)
    n = 0
    for batch in (1, 4, 7):
        pc, pr, rc, rr = (3.0 * _noisy((batch,), gen) - 20.0 for _ in range(4))
        for beta, eps in ((0.1, 0.0), (0.5, 0.0), (0.1, 0.2)):
            _close_with_grads("DPO loss", fn, dpo_loss, {"log pi(chosen)": pc, "log pi(rejected)": pr},
                              (rc, rr, beta, eps), f"{batch} pairs, beta {beta}, label_smoothing {eps}")
            n += 1
    return n


def check_group_advantages(fn: Callable) -> int:
    """``fn(rewards (B,), group_size, scale_by_std) -> advantages (B,)`` against beyond.grpo.group_advantages,
    on groups with spread and on a group whose responses all scored the same."""
    from .beyond.grpo import group_advantages

    gen = torch.Generator().manual_seed(90)
    n = 0
    for groups, size in ((1, 8), (3, 4), (4, 2)):
        rewards = _noisy((groups * size,), gen)
        rewards[:size] = 0.7  # one group of equal scores: no signal
        for scale in (True, False):
            _close("advantages", fn(rewards.clone(), size, scale), group_advantages(rewards, size, scale).double(),
                   f"{groups} groups of {size}, scale_by_std {scale}, rewards {[round(r, 3) for r in rewards.tolist()]}",
                   atol=1e-5)
            n += 1
    return n


def check_bon_expected(fn: Callable) -> int:
    """``fn(scores (N,), values (N,), n) -> float``, the expected value of the RM's favourite of n samples drawn
    without replacement from the N, against beyond.bon.bon_expected (distinct scores: no ties)."""
    from .beyond.bon import bon_expected

    rng = np.random.default_rng(100)
    n = 0
    for size in (3, 6, 9):
        scores, values = rng.permutation(size) + rng.uniform(0, 0.5, size), rng.normal(0, 1, size)
        for k in sorted({1, 2, size // 2, size}):
            got, want = float(fn(scores.copy(), values.copy(), k)), bon_expected(scores, values, k)
            assert abs(got - want) < 1e-9, (f"best of {k} of {size} samples: yours {got:.6f}, expected {want:.6f} "
                                            f"(scores {np.round(scores, 3).tolist()}, values {np.round(values, 3).tolist()})")
            n += 1
    return n


__all__ = ["NOT_ATTEMPTED", "attempt", "check_bon_expected", "check_dpo_loss", "check_entropy_term", "check_gae",
           "check_global_clip", "check_group_advantages", "check_mean_ci", "check_paired_bootstrap", "check_pairwise_loss",
           "check_policy_loss", "check_running_normalize", "check_scores_at_eos", "check_sft_loss", "check_shape_rewards",
           "check_value_loss"]
