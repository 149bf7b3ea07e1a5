"""The exercise checks accept a correct solution written from the formulas and reject plausible mistakes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rlhf_lite import exercises as ex


# ----- solutions written from the formulas (the solutions notebook has the same ones) ---------------
def sft_loss(logits, ids, loss_mask):
    pred, target, m = logits[:, :-1], ids[:, 1:], loss_mask[:, 1:].bool()
    logp = torch.log_softmax(pred, dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return -logp[m].mean()


def scores_at_eos(values, attention_mask):
    positions = torch.arange(attention_mask.shape[1]).expand_as(attention_mask)
    last = torch.where(attention_mask.bool(), positions, -1).max(dim=1).values
    return values[torch.arange(values.shape[0]), last]


def pairwise_loss(r_chosen, r_rejected):
    return torch.nn.functional.softplus(r_rejected - r_chosen).mean()


def shape_rewards(scores, kl, mask, kl_coef):
    rewards = torch.zeros_like(kl)
    for b in range(kl.shape[0]):
        tokens = [t for t in range(kl.shape[1]) if mask[b, t]]
        for t in tokens:
            rewards[b, t] = -(kl_coef or 0.0) * kl[b, t]
        rewards[b, tokens[-1]] += scores[b]
    return rewards


def gae(rewards, values, mask, gamma, lam):
    adv = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        next_v, next_a = 0.0, 0.0
        for t in reversed([t for t in range(rewards.shape[1]) if mask[b, t]]):
            next_a = rewards[b, t] + gamma * next_v - values[b, t] + gamma * lam * next_a
            adv[b, t], next_v = next_a, values[b, t]
    return adv


def policy_loss(logp, old_logp, adv, mask, eps):
    m = mask.bool()
    ratio = torch.exp(logp[m] - old_logp[m])
    return torch.maximum(-adv[m] * ratio, -adv[m] * ratio.clamp(1 - eps, 1 + eps)).mean()


def running_normalize(batches, clip):
    seen, out = [], []
    for b in batches:
        seen += b.tolist()
        x = (b - np.mean(seen)) / (np.std(seen, ddof=1) + 1e-8)
        out.append(x if clip is None else x.clamp(-clip, clip))
    return out


def value_loss(values, old, returns, mask, clip):
    m = mask.bool()
    err = (values[m] - returns[m]) ** 2
    if clip is not None:
        err = torch.maximum(err, (old[m] + (values[m] - old[m]).clamp(-clip, clip) - returns[m]) ** 2)
    return 0.5 * err.mean()


def global_clip(grads, max_norm):
    norm = float(torch.sqrt(sum((g ** 2).sum() for g in grads)))
    scale = min(1.0, max_norm / (norm + 1e-6))
    return [g * scale for g in grads], norm


def mean_ci_solution(values):
    t = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776}[len(values) - 1]
    x = np.asarray(values)
    half = t * x.std(ddof=1) / np.sqrt(len(x))
    return x.mean() - half, x.mean() + half


def paired_bootstrap(a, b, n_resamples, seed):
    d = a - b
    idx = np.random.default_rng(seed).integers(0, len(d), size=(n_resamples, len(d)))
    low, high = np.quantile(d[idx].mean(axis=1), [0.025, 0.975])
    return low, high


def entropy_term(entropy, mask, coef, target):
    return coef * (entropy[mask.bool()].mean() - target).abs()


def dpo_loss(pc, pr, rc, rr, beta, eps):
    h = beta * ((pc - rc) - (pr - rr))
    return (-(1 - eps) * torch.log(torch.sigmoid(h)) - eps * torch.log(torch.sigmoid(-h))).mean()


def group_advantages(rewards, size, scale):
    out = []
    for start in range(0, len(rewards), size):
        g = rewards[start:start + size].tolist()
        mean, std = np.mean(g), np.std(g, ddof=1)
        out += [(r - mean) / (std + 1e-4) if scale else r - mean for r in g]
    return torch.tensor(out)


def bon_expected(scores, values, n):
    from itertools import combinations

    return np.mean([values[max(s, key=lambda i: scores[i])] for s in combinations(range(len(scores)), n)])


SOLUTIONS = [(ex.check_sft_loss, sft_loss), (ex.check_scores_at_eos, scores_at_eos),
             (ex.check_pairwise_loss, pairwise_loss), (ex.check_shape_rewards, shape_rewards), (ex.check_gae, gae),
             (ex.check_policy_loss, policy_loss),
             (ex.check_running_normalize, running_normalize), (ex.check_value_loss, value_loss),
             (ex.check_global_clip, global_clip), (ex.check_mean_ci, mean_ci_solution),
             (ex.check_paired_bootstrap, paired_bootstrap), (ex.check_entropy_term, entropy_term),
             (ex.check_dpo_loss, dpo_loss), (ex.check_group_advantages, group_advantages),
             (ex.check_bon_expected, bon_expected)]


@pytest.mark.parametrize("check, solution", SOLUTIONS, ids=[c.__name__ for c, _ in SOLUTIONS])
def test_a_correct_solution_passes(check, solution) -> None:
    assert ex.attempt(check, solution).startswith("correct: equal to the package's reference on ")


def test_an_untouched_stub_is_reported_not_attempted() -> None:
    def stub(*args):
        raise NotImplementedError
    assert ex.attempt(ex.check_gae, stub) == ex.NOT_ATTEMPTED


MISTAKES = [
    (ex.check_sft_loss, lambda lg, ids, m: sft_loss(torch.cat([lg[:, :1], lg], 1)[:, :-1], ids, m)),  # no shift
    (ex.check_sft_loss, lambda lg, ids, m: sft_loss(lg, ids, torch.ones_like(m))),  # prompt tokens in the loss
    (ex.check_sft_loss, lambda lg, ids, m: torch.stack([  # a mean per row, then over rows
        sft_loss(lg[b:b + 1], ids[b:b + 1], m[b:b + 1]) for b in range(len(ids)) if m[b, 1:].any()]).mean()),
    (ex.check_scores_at_eos, lambda v, m: v[:, -1]),  # the last position, padding or not
    (ex.check_scores_at_eos, lambda v, m: v[torch.arange(len(v)), m.sum(-1) - 1]),  # right padding only
    (ex.check_pairwise_loss, lambda c, r: -torch.log(torch.sigmoid(c - r)).mean()),  # overflows on large margins
    (ex.check_pairwise_loss, lambda c, r: pairwise_loss(r, c)),  # chosen and rejected swapped
    (ex.check_pairwise_loss, lambda c, r: torch.nn.functional.softplus(r - c).sum()),  # a sum, not a mean
    (ex.check_shape_rewards, lambda s, kl, m, c: shape_rewards(s, kl, m, c) + (1 - m) * kl),  # padding leaks
    (ex.check_gae, lambda r, v, m, g, lam: gae(r, v, m, g, 1.0)),  # lambda ignored
    (ex.check_policy_loss, lambda lp, old, a, m, e: (-a[m.bool()] * torch.exp(lp - old)[m.bool()]).mean()),  # no clip
    (ex.check_policy_loss, lambda lp, old, a, m, e: torch.minimum(  # min instead of max
        -a[m.bool()] * torch.exp(lp - old)[m.bool()],
        -a[m.bool()] * torch.exp(lp - old)[m.bool()].clamp(1 - e, 1 + e)).mean()),
    (ex.check_running_normalize, lambda bs, c: [((b - b.mean()) / b.std()).clamp(-c, c) if c else (b - b.mean()) / b.std()
                                               for b in bs]),  # per batch, not running
    (ex.check_value_loss, lambda v, old, r, m, c: value_loss(v, old, r, m, None)),  # clip ignored
    (ex.check_global_clip, lambda gs, n: ([g.clamp(-n, n) for g in gs], 0.0)),  # element-wise clip
    (ex.check_mean_ci, lambda vs: (np.mean(vs) - 1.96 * np.std(vs, ddof=1) / np.sqrt(len(vs)),
                                   np.mean(vs) + 1.96 * np.std(vs, ddof=1) / np.sqrt(len(vs)))),  # normal, not t
    (ex.check_paired_bootstrap, lambda a, b, n, s: paired_bootstrap(np.random.default_rng(s).permutation(a), b, n, s)),
    (ex.check_entropy_term, lambda h, m, c, t: -c * h[m.bool()].mean()),  # the usual bonus
    (ex.check_dpo_loss, lambda pc, pr, rc, rr, b, e: dpo_loss(pc, pr, rc, rr, b, 0.0)),  # label smoothing ignored
    (ex.check_dpo_loss, lambda pc, pr, rc, rr, b, e: dpo_loss(pc, pr, 0 * rc, 0 * rr, b, e)),  # no reference
    (ex.check_group_advantages, lambda r, g, s: torch.tensor(  # the population std (n, not n - 1)
        [(x - r.view(-1, g).mean(-1)[i // g]) / ((r.view(-1, g).std(-1, correction=0)[i // g] + 1e-4) if s else 1)
         for i, x in enumerate(r.tolist())])),
    (ex.check_group_advantages, lambda r, g, s: (r - r.mean()) / (r.std() + 1e-4) if s else r - r.mean()),  # batch
    (ex.check_bon_expected, lambda sc, v, n: float(v[:n][np.argmax(sc[:n])])),  # one draw, not the expectation
    (ex.check_bon_expected, lambda sc, v, n: float(v[np.argmax(sc)])),  # always the best of all N
]


@pytest.mark.parametrize("check, wrong", MISTAKES, ids=[f"{c.__name__}-{i}" for i, (c, _) in enumerate(MISTAKES)])
def test_a_wrong_solution_fails_with_a_message(check, wrong) -> None:
    with pytest.raises(AssertionError, match="differs|expected|returned"):
        check(wrong)


def test_every_check_has_an_exercise_a_solution_and_a_test() -> None:
    import json
    from pathlib import Path

    def sources(path: Path) -> str:
        return "\n".join("".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code")

    nbs = Path(__file__).resolve().parents[1] / "notebooks"
    checks = {name for name in ex.__all__ if name.startswith("check_")}
    exercised = "".join(sources(p) for p in sorted(nbs.glob("0[0-6]_*.ipynb")))
    solved = sources(nbs / "solutions.ipynb")
    assert checks == {c.__name__ for c, _ in SOLUTIONS}
    assert not [c for c in checks if f"exercises.{c}" not in exercised], "a check no notebook's exercise runs"
    assert not [c for c in checks if f"exercises.{c}" not in solved], "a check without a solution in solutions.ipynb"
