"""Tests for rlhf_lite.ppo.core: every function against a reference (a plain loop, torch or numpy on the
unmasked slice, or numbers computed by hand)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rlhf_lite.ppo.core import (
    RunningMoments,
    clip_grad_norm_global,
    compute_gae,
    entropy_bonus,
    entropy_from_logits,
    explained_variance,
    kl_k1,
    kl_k3,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    normalize_and_clip_advantages,
    normalize_rewards,
    policy_loss,
    ptx_loss,
    response_perplexity,
    shape_rewards,
    value_loss,
)

DT = torch.float64


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ragged_mask(B: int, T: int, g: torch.Generator) -> torch.Tensor:
    """One contiguous run per row, in three layouts: right-padded, left-padded, in the middle."""
    mask = torch.zeros(B, T, dtype=DT)

    def randint(lo: int, hi: int) -> int:  # inclusive bounds
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    for b in range(B):
        layout = b % 3
        if layout == 0:  # right-padded: the response starts at a varying position, padding after
            length = randint(1, T)
            start = randint(0, T - length)
        elif layout == 1:  # left-padded: padding before, the run ends at T - 1
            length = randint(1, T)
            start = T - length
        else:  # strictly inside: padding on both sides
            length = randint(1, T - 2)
            start = randint(1, T - 1 - length)
        mask[b, start : start + length] = 1
    return mask


def _gae_reference(rewards, values, mask, gamma, lam):
    B, T = rewards.shape
    adv = torch.zeros(B, T, dtype=DT)
    for b in range(B):
        idx = [t for t in range(T) if mask[b, t] > 0]
        next_v, next_a = 0.0, 0.0
        for t in reversed(idx):
            delta = rewards[b, t].item() + gamma * next_v - values[b, t].item()
            next_a = delta + gamma * lam * next_a
            adv[b, t] = next_a
            next_v = values[b, t].item()
    return adv, (adv + values) * mask


# --------------------------------------------------------------------------------------------------
# GAE
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (0.9, 1.0), (1.0, 0.0)])
def test_compute_gae_matches_loop(gamma, lam):
    g = _gen(1)
    B, T = 12, 9
    mask = _ragged_mask(B, T, g)
    rewards, values = torch.randn(B, T, generator=g, dtype=DT), torch.randn(B, T, generator=g, dtype=DT)
    adv, ret = compute_gae(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = _gae_reference(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, ref_adv)
    torch.testing.assert_close(ret, ref_ret)
    assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()


def test_compute_gae_layouts_explicit():
    # The same 3-token response right-padded, left-padded and in the middle must give the same advantages.
    r = torch.tensor([0.1, -0.2, 1.0], dtype=DT)
    v = torch.tensor([0.5, 0.3, 0.2], dtype=DT)
    T = 6
    rewards, values, mask = (torch.zeros(3, T, dtype=DT) for _ in range(3))
    for row, start in enumerate([0, 3, 1]):
        span = slice(start, start + 3)
        rewards[row, span], values[row, span], mask[row, span] = r, v, 1.0
    adv, ret = compute_gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # By hand: A2 = 1.0 - 0.2 = 0.8; A1 = (-0.2 + 0.2 - 0.3) + 0.5 * 0.8 = 0.1; A0 = (0.1 + 0.3 - 0.5) + 0.05
    expected = torch.tensor([-0.05, 0.1, 0.8], dtype=DT)
    for row, start in enumerate([0, 3, 1]):
        torch.testing.assert_close(adv[row, start : start + 3], expected)
        torch.testing.assert_close(ret[row, start : start + 3], expected + v)


def test_compute_gae_ignores_masked_out_positions():
    g = _gen(2)
    B, T = 9, 8
    mask = _ragged_mask(B, T, g)
    rewards, values = torch.randn(B, T, generator=g, dtype=DT), torch.randn(B, T, generator=g, dtype=DT)
    adv, ret = compute_gae(rewards, values, mask, 1.0, 0.95)
    off = mask == 0
    assert off.any()
    for fill in (1e6, float("nan")):
        r2, v2 = rewards.clone(), values.clone()
        r2[off], v2[off] = fill, -fill
        adv2, ret2 = compute_gae(r2, v2, mask, 1.0, 0.95)
        assert torch.equal(adv, adv2) and torch.equal(ret, ret2)


def test_compute_gae_bool_mask_and_detached():
    values = torch.tensor([[1.0, 2.0, 0.0]], requires_grad=True)
    adv, ret = compute_gae(
        torch.tensor([[0.0, 1.0, 5.0]]), values, torch.tensor([[True, True, False]]), 1.0, 1.0
    )
    torch.testing.assert_close(adv, torch.tensor([[0.0, -1.0, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[1.0, 1.0, 0.0]]))
    assert not adv.requires_grad and not ret.requires_grad


# --------------------------------------------------------------------------------------------------
# Masked statistics
# --------------------------------------------------------------------------------------------------


def test_masked_stats_match_torch_on_slice():
    g = _gen(3)
    x = torch.randn(6, 7, generator=g, dtype=DT) * 3 + 1
    mask = _ragged_mask(6, 7, g)
    sel = x[mask.bool()]
    torch.testing.assert_close(masked_sum(x, mask), sel.sum())
    torch.testing.assert_close(masked_mean(x, mask), sel.mean())
    torch.testing.assert_close(masked_var(x, mask), sel.var())
    torch.testing.assert_close(masked_var(x, mask, unbiased=False), sel.var(unbiased=False))
    # Garbage off the mask does not leak in.
    x_nan = x.masked_fill(mask == 0, float("nan"))
    torch.testing.assert_close(masked_mean(x_nan, mask), sel.mean())
    torch.testing.assert_close(masked_var(x_nan, mask.bool()), sel.var())


def test_masked_mean_dim_rows_and_empty_rows():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [0, 0, 1]])
    torch.testing.assert_close(masked_mean(x, mask, dim=1), torch.tensor([1.5, 0.0, 9.0]))
    torch.testing.assert_close(masked_sum(x, mask, dim=1), torch.tensor([3.0, 0.0, 9.0]))
    torch.testing.assert_close(masked_mean(x, mask, dim=0), torch.tensor([1.0, 2.0, 9.0]))


def test_masked_mean_empty_mask_raises():
    x = torch.ones(2, 3)
    with pytest.raises(ValueError, match="no elements"):
        masked_mean(x, torch.zeros(2, 3))
    with pytest.raises(ValueError):
        masked_var(x, torch.tensor([[1, 0, 0], [0, 0, 0]]))  # unbiased var needs 2 entries
    with pytest.raises(ValueError):
        masked_whiten(x, torch.zeros(2, 3))


def test_masked_whiten_matches_torch_on_slice():
    g = _gen(4)
    x = torch.randn(5, 8, generator=g, dtype=DT) * 2 + 3
    mask = _ragged_mask(5, 8, g)
    m = mask.bool()
    sel = x[m]
    w = masked_whiten(x, mask)
    torch.testing.assert_close(w[m], (sel - sel.mean()) / torch.sqrt(sel.var() + 1e-8))
    assert (w[~m] == 0).all()
    torch.testing.assert_close(w[m].mean(), torch.tensor(0.0, dtype=DT), atol=1e-10, rtol=0)
    torch.testing.assert_close(w[m].std(), torch.tensor(1.0, dtype=DT))
    w_keep = masked_whiten(x, mask, shift_mean=False)
    torch.testing.assert_close(w_keep[m], (sel - sel.mean()) / torch.sqrt(sel.var() + 1e-8) + sel.mean())
    torch.testing.assert_close(w_keep[m].mean(), sel.mean())
    assert (w_keep[~m] == 0).all()


# --------------------------------------------------------------------------------------------------
# Log-probs, entropy, KL
# --------------------------------------------------------------------------------------------------


def test_logprobs_from_logits_matches_log_softmax_gather():
    g = _gen(5)
    logits = torch.randn(3, 5, 11, generator=g) * 4
    labels = torch.randint(0, 11, (3, 5), generator=g)
    ref = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(logprobs_from_logits(logits, labels), ref)
    # bf16 logits are upcast: result equals the float32 computation on the same (rounded) logits.
    lp16 = logprobs_from_logits(logits.bfloat16(), labels)
    assert lp16.dtype == torch.float32
    torch.testing.assert_close(lp16, logprobs_from_logits(logits.bfloat16().float(), labels))


def test_logprobs_from_logits_gradient_matches():
    g = _gen(6)
    logits = torch.randn(2, 4, 7, generator=g, requires_grad=True)
    labels = torch.randint(0, 7, (2, 4), generator=g)
    (grad,) = torch.autograd.grad(logprobs_from_logits(logits, labels).sum(), logits)
    (ref,) = torch.autograd.grad(torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).sum(), logits)
    torch.testing.assert_close(grad, ref)


def test_log_softmax_helpers_agree_across_chunk_sizes(monkeypatch):
    """Chunking bounds memory; with chunks of 1 or 2 rows the values are those of one pass."""
    import rlhf_lite.ppo.core as core_mod

    g = _gen(8)
    logits = torch.randn(5, 3, 6, generator=g, dtype=DT)
    labels = torch.randint(0, 6, (5, 3), generator=g)
    whole = logprobs_from_logits(logits, labels), entropy_from_logits(logits)
    for rows in (1, 2):
        monkeypatch.setattr(core_mod, "CHUNK_ELEMENTS", rows * 3 * 6)
        assert len(core_mod._row_chunks(logits)) == -(-5 // rows)
        torch.testing.assert_close(logprobs_from_logits(logits, labels), whole[0])
        torch.testing.assert_close(entropy_from_logits(logits), whole[1])


def test_entropy_from_logits_vs_categorical():
    g = _gen(7)
    logits = torch.randn(3, 4, 9, generator=g, dtype=DT) * 2
    ref = torch.distributions.Categorical(logits=logits).entropy()
    torch.testing.assert_close(entropy_from_logits(logits), ref)
    # Uniform over V gives log V; a -inf logit (p = 0) contributes 0, not NaN.
    torch.testing.assert_close(entropy_from_logits(torch.zeros(1, 1, 8)), torch.tensor([[math.log(8)]]))
    with_inf = torch.tensor([[[0.0, 0.0, float("-inf")]]])
    torch.testing.assert_close(entropy_from_logits(with_inf), torch.tensor([[math.log(2)]]))


def test_kl_estimators():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=DT)  # policy
    q = torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=DT)  # reference
    true_kl = (p * (p / q).log()).sum().item()  # KL(p || q) ~= 0.17
    samples = torch.multinomial(p, 200_000, replacement=True, generator=_gen(8))
    logp, ref_logp = p.log()[samples], q.log()[samples]
    k1, k3 = kl_k1(logp, ref_logp), kl_k3(logp, ref_logp)
    assert (k3 >= 0).all()
    assert (k1 < 0).any()  # k1 can be negative per token, k3 cannot
    assert abs(k1.mean().item() - true_kl) < 0.01
    assert abs(k3.mean().item() - true_kl) < 0.01
    torch.testing.assert_close(kl_k1(torch.tensor([-1.0]), torch.tensor([-3.0])), torch.tensor([2.0]))
    # k3 by hand: log r = -2 - (-1) = -1 -> e^-1 - 1 + 1
    torch.testing.assert_close(
        kl_k3(torch.tensor([-1.0]), torch.tensor([-2.0])), torch.tensor([math.exp(-1)])
    )
    assert (
        kl_k3(torch.randn(1000, generator=_gen(9)) * 5, torch.randn(1000, generator=_gen(10)) * 5) >= 0
    ).all()


# --------------------------------------------------------------------------------------------------
# Reward shaping
# --------------------------------------------------------------------------------------------------


def test_shape_rewards_right_and_left_alignment():
    kl = torch.tensor(
        [
            [0.1, 0.2, 0.3, 9.0, 9.0],  # right-padded, 3 tokens
            [0.5, 0.5, 0.5, 0.5, 0.5],  # full row
            [9.0, 9.0, 1.0, 2.0, 3.0],  # left-padded, 3 tokens
            [9.0, 0.4, -0.2, 9.0, 9.0],  # run in the middle
        ]
    )
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 1, 1, 0, 0]])
    scores = torch.tensor([2.0, -1.0, 0.5, 3.0])
    expected = torch.tensor(
        [
            [-0.01, -0.02, -0.03 + 2.0, 0.0, 0.0],
            [-0.05, -0.05, -0.05, -0.05, -0.05 - 1.0],
            [0.0, 0.0, -0.1, -0.2, -0.3 + 0.5],
            [0.0, -0.04, 0.02 + 3.0, 0.0, 0.0],
        ]
    )
    torch.testing.assert_close(shape_rewards(scores, kl, mask, kl_coef=0.1), expected)
    torch.testing.assert_close(shape_rewards(scores, kl, mask.bool(), kl_coef=0.1), expected)
    score_only = torch.zeros(4, 5)
    score_only[0, 2], score_only[1, 4], score_only[2, 4], score_only[3, 2] = 2.0, -1.0, 0.5, 3.0
    torch.testing.assert_close(shape_rewards(scores, kl, mask, kl_coef=None), score_only)
    torch.testing.assert_close(shape_rewards(scores, kl, mask, kl_coef=0.0), score_only)


def test_shape_rewards_empty_row_raises():
    with pytest.raises(ValueError, match="at least one response token"):
        shape_rewards(torch.ones(2), torch.zeros(2, 3), torch.tensor([[1, 1, 0], [0, 0, 0]]), 0.1)


# --------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------


def test_policy_loss_hand_computed():
    # token 0: A=+1, ratio 1.5 -> clipped at 1.2 (upper side), term -1.2
    # token 1: A=-1, ratio 0.5 -> clipped at 0.8 (lower side), term +0.8
    # token 2: A=+2, ratio 0.9 -> inside the band, term -1.8
    # token 3: A=-1, ratio 1.5 -> outside the band but the unclipped term is larger: +1.5 (not clipped)
    # token 4: masked out, garbage
    ratio = torch.tensor([[1.5, 0.5, 0.9, 1.5, 7.0]], dtype=DT)
    old_logp = torch.tensor([[-1.0, -2.0, -0.5, -3.0, float("nan")]], dtype=DT)
    logp = (old_logp + ratio.log()).requires_grad_(True)
    adv = torch.tensor([[1.0, -1.0, 2.0, -1.0, float("nan")]], dtype=DT)
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    loss, stats = policy_loss(logp, old_logp, adv, mask, clip_eps=0.2)
    torch.testing.assert_close(loss, torch.tensor((-1.2 + 0.8 - 1.8 + 1.5) / 4, dtype=DT))
    torch.testing.assert_close(stats["clipfrac"], torch.tensor(0.5, dtype=DT))
    torch.testing.assert_close(stats["ratio_mean"], torch.tensor((1.5 + 0.5 + 0.9 + 1.5) / 4, dtype=DT))
    k3 = [(r - 1) - math.log(r) for r in (1.5, 0.5, 0.9, 1.5)]
    torch.testing.assert_close(stats["approx_kl"], torch.tensor(sum(k3) / 4, dtype=DT))
    # Clipped tokens get zero gradient; the others get -A * ratio / n.
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.0, -2 * 0.9 / 4, 1.5 / 4, 0.0]], dtype=DT))


def test_policy_loss_no_clipping_when_on_policy():
    logp = torch.tensor([[-1.0, -2.0]])
    loss, stats = policy_loss(logp, logp.clone(), torch.tensor([[1.0, 3.0]]), torch.ones(1, 2), 0.2)
    torch.testing.assert_close(loss, torch.tensor(-2.0))
    assert stats["clipfrac"].item() == 0.0 and stats["approx_kl"].item() == 0.0
    assert stats["ratio_mean"].item() == 1.0


def test_value_loss_hand_computed():
    # c = 0.2:
    # token 0: V=1.0, old=0.5, R=2.0 -> (V-R)^2 = 1, clip(V)=0.7 -> 1.69 (clipped, upper side)
    # token 1: V=0.0, old=0.5, R=-1 -> 1, clip(V)=0.3 -> 1.69 (clipped, lower side)
    # token 2: V=1.0, old=0.5, R=0.0 -> 1, clip(V)=0.7 -> 0.49 -> 1 (not clipped)
    # token 3: V=0.6, old=0.5, R=1.0 -> 0.16 both (inside the band)
    values = torch.tensor([[1.0, 0.0, 1.0, 0.6, 5.0]], dtype=DT, requires_grad=True)
    old = torch.tensor([[0.5, 0.5, 0.5, 0.5, 0.0]], dtype=DT)
    returns = torch.tensor([[2.0, -1.0, 0.0, 1.0, 0.0]], dtype=DT)
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    loss, stats = value_loss(values, old, returns, mask, clip=0.2)
    torch.testing.assert_close(loss, torch.tensor(0.5 * (1.69 + 1.69 + 1.0 + 0.16) / 4, dtype=DT))
    torch.testing.assert_close(stats["vf_clipfrac"], torch.tensor(0.5, dtype=DT))
    loss.backward()
    # Clipped tokens: no gradient; others: (V - R) / n.
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, 0.0, 1.0 / 4, -0.4 / 4, 0.0]], dtype=DT))
    loss_nc, stats_nc = value_loss(values, old, returns, mask, clip=None)
    torch.testing.assert_close(loss_nc, torch.tensor(0.5 * (1.0 + 1.0 + 1.0 + 0.16) / 4, dtype=DT))
    assert stats_nc["vf_clipfrac"].item() == 0.0


def test_explained_variance():
    g = _gen(11)
    ret = torch.randn(4, 6, generator=g, dtype=DT)
    mask = _ragged_mask(4, 6, g)
    assert explained_variance(ret, ret, mask) == pytest.approx(1.0)
    assert explained_variance(torch.zeros_like(ret) + 3.0, ret, mask) == pytest.approx(0.0, abs=1e-12)
    vals = torch.randn(4, 6, generator=g, dtype=DT)
    m = mask.bool()
    expected = 1 - np.var((ret - vals)[m].numpy()) / np.var(ret[m].numpy())
    assert explained_variance(vals, ret, mask) == pytest.approx(expected)
    assert math.isnan(explained_variance(vals, torch.ones_like(ret), mask))


# --------------------------------------------------------------------------------------------------
# Running statistics and score reparameterization
# --------------------------------------------------------------------------------------------------


def test_running_moments_vs_numpy_and_state_dict():
    g = _gen(12)
    sizes = [3, 17, 1, 40, (2, 5)]
    batches = [torch.randn(s if isinstance(s, tuple) else (s,), generator=g, dtype=DT) * 2 + 5 for s in sizes]
    rm = RunningMoments()
    assert rm.count == 0 and rm.std == 1.0
    for i, batch in enumerate(batches):
        rm.update(batch)
        seen = np.concatenate([b.flatten().numpy() for b in batches[: i + 1]])
        assert rm.count == seen.size
        assert rm.mean == pytest.approx(seen.mean(), rel=1e-12)
        assert rm.std == pytest.approx(seen.std(ddof=1), rel=1e-10)
    clone = RunningMoments()
    clone.load_state_dict(rm.state_dict())
    extra = torch.randn(6, generator=g, dtype=DT)
    rm.update(extra)
    clone.update(extra)
    assert (clone.count, clone.mean, clone.std) == (rm.count, rm.mean, rm.std)


def test_normalize_and_clip_rewards():
    g = _gen(13)
    rm = RunningMoments()
    first = torch.randn(16, generator=g, dtype=DT) * 3 + 2
    # The batch is merged in before normalizing: on a fresh tracker this is the batch's own z-score.
    out = normalize_rewards(first, rm, "normalize", clip=None)
    torch.testing.assert_close(out, (first - first.mean()) / first.std(), rtol=1e-6, atol=1e-8)
    for _ in range(3):
        scores = torch.randn(16, generator=g, dtype=DT) * 3 + 2
        clipped = normalize_rewards(scores, rm, "normalize", clip=0.8)
        unclipped = (scores - rm.mean) / (rm.std + 1e-8)
        assert clipped.abs().max().item() <= 0.8
        inside = unclipped.abs() <= 0.8
        assert inside.any() and (~inside).any()
        torch.testing.assert_close(clipped[inside], unclipped[inside])
        torch.testing.assert_close(clipped[~inside], 0.8 * unclipped[~inside].sign())
    assert rm.count == 64


def test_scale_rewards_and_the_other_modes():
    g = _gen(14)
    rm = RunningMoments()
    scores = torch.randn(10, generator=g, dtype=DT) + 4
    torch.testing.assert_close(normalize_rewards(scores, rm, "scale"), scores / scores.std(), rtol=1e-6, atol=1e-8)
    more = torch.randn(10, generator=g, dtype=DT) * 2
    both = torch.cat([scores, more])
    torch.testing.assert_close(normalize_rewards(more, rm, "scale", clip=0.5),
                               (more / both.std()).clamp(-0.5, 0.5), rtol=1e-6, atol=1e-8)
    raw = torch.tensor([-3.0, 0.2, 5.0], dtype=DT)
    torch.testing.assert_close(normalize_rewards(raw, rm, "none"), raw)  # the raw score, moments still updated
    torch.testing.assert_close(normalize_rewards(raw, rm, "none", clip=1.0), torch.tensor([-1.0, 0.2, 1.0], dtype=DT))
    assert rm.count == 26
    with pytest.raises(ValueError, match="'normalize', 'scale' or 'none'"):
        normalize_rewards(raw, rm, "whiten")


def test_normalize_and_clip_advantages():
    g = _gen(15)
    adv = torch.randn(6, 9, generator=g, dtype=DT) * 4 + 1
    mask = _ragged_mask(6, 9, g)
    m = mask.bool()
    out = normalize_and_clip_advantages(adv, mask, clip=0.5)
    white = masked_whiten(adv, mask)
    assert out.abs().max().item() <= 0.5
    assert (out[~m] == 0).all()
    inside = m & (white.abs() <= 0.5)
    assert inside.any()
    torch.testing.assert_close(out[inside], white[inside])
    torch.testing.assert_close(normalize_and_clip_advantages(adv, mask, clip=None), white)


# --------------------------------------------------------------------------------------------------
# Other PPO-max terms
# --------------------------------------------------------------------------------------------------


def test_entropy_bonus_pulls_toward_target():
    mask = torch.tensor([[1, 1, 0]])
    high = torch.tensor([[1.0, 2.0, 99.0]], requires_grad=True)  # mean 1.5 above target 1.0
    loss = entropy_bonus(high, mask, coef=0.1, target=1.0)
    torch.testing.assert_close(loss, torch.tensor(0.05))
    loss.backward()
    assert (high.grad[0, :2] > 0).all()  # gradient descent lowers the entropy
    low = torch.tensor([[0.2, 0.4, 99.0]], requires_grad=True)  # mean 0.3 below target
    loss = entropy_bonus(low, mask, coef=0.1, target=1.0)
    torch.testing.assert_close(loss, torch.tensor(0.07))
    loss.backward()
    assert (low.grad[0, :2] < 0).all()  # gradient descent raises the entropy


def test_ptx_loss_vs_cross_entropy():
    g = _gen(16)
    logits = torch.randn(3, 6, 13, generator=g)
    labels = torch.randint(0, 13, (3, 6), generator=g)
    loss_mask = torch.tensor([[0, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    m = loss_mask.bool()
    ref = F.cross_entropy(logits[m], labels[m])
    torch.testing.assert_close(ptx_loss(logits, labels, loss_mask), ref)
    # Ignored positions may carry -100 labels (the usual ignore index).
    torch.testing.assert_close(ptx_loss(logits, labels.masked_fill(~m, -100), loss_mask), ref)


def test_clip_grad_norm_global():
    torch.manual_seed(0)  # test-only: parameter init of the two modules
    policy, critic = torch.nn.Linear(4, 3), torch.nn.Linear(4, 1)
    g = _gen(17)
    for p in [*policy.parameters(), *critic.parameters()]:
        p.grad = torch.randn(p.shape, generator=g)
    before = [p.grad.clone() for p in [*policy.parameters(), *critic.parameters()]]
    pre = math.sqrt(sum(float(b.pow(2).sum()) for b in before))
    assert pre > 1.0
    returned = clip_grad_norm_global([*policy.parameters(), *critic.parameters()], max_norm=1.0)
    assert returned == pytest.approx(pre, rel=1e-6)
    after = [p.grad for p in [*policy.parameters(), *critic.parameters()]]
    post = math.sqrt(sum(float(a.pow(2).sum()) for a in after))
    assert post <= 1.0 + 1e-6 and post == pytest.approx(1.0, rel=1e-5)
    # One global factor for both groups (per-group clipping would scale them differently).
    for a, b in zip(after, before, strict=True):
        torch.testing.assert_close(a, b * (1.0 / pre), rtol=1e-5, atol=1e-7)


def test_response_perplexity():
    logp = torch.tensor([[-1.0, -2.0, float("nan")], [float("nan"), -0.5, -0.5]])
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    torch.testing.assert_close(response_perplexity(logp, mask), torch.tensor([math.exp(1.5), math.exp(0.5)]))
