"""What notebook 06 computes from the stored sweep (:mod:`rlhf_lite.beyond.sweep`): curves over seeds, the
results table with 95 % intervals, the RM-hacking rule and the verdicts against the published claims.

Every figure here is read off the compact results; nothing is typed in by hand.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..ppo.config import CollapseBands
from ..stats import Interval, mean_ci
from .sweep import METHODS

HACK = CollapseBands()
"""The RM-hacking rule is the collapse detector's: after the gold score's peak, the gold score falls by more
than ``gold_drop`` (0.25) while the RM reward rises by more than ``reward_rise`` (0.25), on the same samples."""
TOL = 0.05
"""Gold points within which two figures count as equal: the noise of one gold measurement on 256 prompts."""


@dataclass
class Curves:
    """One method's measurements over seeds: (S, K) arrays, K measurements per run in training order (the
    first is the starting policy); best-of-n: K values of n."""

    name: str
    label: str
    kl: np.ndarray  # KL(policy || reference) per response, nats (best-of-n: the analytic value)
    gold: np.ndarray
    reward: np.ndarray  # the RM's mean score of the measured samples
    length: np.ndarray  # tokens per response
    progress: np.ndarray  # (K,) fraction of the training budget (best-of-n: n)
    wall: np.ndarray  # (S,) seconds per run

    def peak(self, s: int) -> int:
        return int(np.argmax(self.gold[s]))

    def hacked(self, s: int) -> bool:
        """Seed ``s`` over-optimized the RM: see :data:`HACK`."""
        p = self.peak(s)
        return bool(np.any((self.gold[s, p:] < self.gold[s, p] - HACK.gold_drop)
                           & (self.reward[s, p:] > self.reward[s, p] + HACK.reward_rise)))


def curves(results: dict, name: str) -> Curves:
    """The :class:`Curves` of method ``name`` from :func:`~rlhf_lite.beyond.sweep.load_results`'s dict."""
    seeds = results["meta"]["seeds"]
    runs = [results["runs"][(name, s)] for s in seeds]
    label = runs[0]["label"]
    wall = np.array([r["wall_seconds"] for r in runs])
    if runs[0]["stage"] == "bon":
        rows = [r["series"] for r in runs]
        get = lambda key: np.array([[p[key] for p in rs] for rs in rows])
        return Curves(name, label, get("kl_bon"), get("gold_score"), get("reward"), get("response_length"),
                      np.array([p["n"] for p in rows[0]], dtype=float), wall)
    pts = [[p for p in r["series"] if "gold_score" in p] for r in runs]
    if len({len(p) for p in pts}) != 1:
        raise ValueError(f"{name}: the seeds were measured a different number of times")
    get = lambda key: np.array([[p[key] for p in ps] for ps in pts])
    its = np.array([p["iteration"] for p in pts[0]], dtype=float)
    return Curves(name, label, get("eval_kl_per_sequence"), get("gold_score"), get("eval_reward"),
                  get("eval_response_length"), its / its[-1], wall)


def all_curves(results: dict) -> dict[str, Curves]:
    return {m.name: curves(results, m.name) for m in METHODS}


def _ci(values) -> Interval:
    return mean_ci(list(values))


def fmt(iv: Interval, digits: int = 3) -> str:
    """``mean [low, high]``; one seed shows the mean alone."""
    if iv.low == iv.high:
        return f"{iv.mean:.{digits}f}"
    return f"{iv.mean:.{digits}f} [{iv.low:.{digits}f}, {iv.high:.{digits}f}]"


def table_rows(cs: dict[str, Curves]) -> list[list[str]]:
    """One row per method: final and peak gold with 95 % intervals over seeds, the KL at the peak and at the
    end, the RM reward and length at the end, how many seeds hacked the RM, the wall time."""
    rows = []
    for c in cs.values():
        S = c.gold.shape[0]
        peaks = [c.peak(s) for s in range(S)]
        rows.append([c.label, fmt(_ci(c.gold[:, -1])), fmt(_ci(c.gold[np.arange(S), peaks])),
                     fmt(_ci(c.kl[np.arange(S), peaks]), 2), fmt(_ci(c.kl[:, -1]), 2), fmt(_ci(c.reward[:, -1]), 2),
                     f"{c.length[:, -1].mean():.1f}", f"{sum(c.hacked(s) for s in range(S))} of {S}",
                     f"{c.wall.mean():.0f}"])
    return rows


TABLE_HEADER = ["method", "final gold", "peak gold", "KL at peak", "final KL", "final RM reward", "final length",
                "seeds hacking the RM", "wall s / run"]


def at_kl(c: Curves, kl: float) -> float | None:
    """The mean gold score of ``c`` where its mean path first reaches ``kl`` nats (linear interpolation);
    None if it never gets that far."""
    x, y = c.kl.mean(0), c.gold.mean(0)
    for i in range(1, len(x)):
        if x[i] >= kl > x[i - 1] or x[i] == kl:
            return float(y[i - 1] + (y[i] - y[i - 1]) * (kl - x[i - 1]) / (x[i] - x[i - 1] or 1.0))
    return float(y[0]) if kl <= x[0] else None


def verdicts(cs: dict[str, Curves], sft_gold: float) -> list[list[str]]:
    """(claim, source, what our runs show, verdict) rows, each computed from the curves by a stated rule."""
    def peak(c):
        S = c.gold.shape[0]
        idx = [c.peak(s) for s in range(S)]
        return _ci(c.gold[np.arange(S), idx]), float(c.kl[np.arange(S), idx].mean())

    def hackers():
        return [c.label for c in cs.values() if sum(c.hacked(s) for s in range(c.gold.shape[0])) >= 2]

    rows = []
    best = max(cs.values(), key=lambda c: peak(c)[0].mean)
    g, k = peak(best)
    rows.append(["Which method reaches the best gold score, at which KL?", "(this notebook)",
                 f"{best.label}: peak gold {fmt(g)} at {k:.2f} nats per response (SFT model {sft_gold:.3f})",
                 best.label])
    h = hackers()
    rows.append(["Which methods hack the RM (gold falls after its peak while the RM reward rises)?", "(this notebook)",
                 ", ".join(h) or "none", ", ".join(h) or "none"])
    dpo, pmax, van = cs["dpo"], cs["ppo_max"], cs["vanilla"]
    (gd, kd), (gp, kp) = peak(dpo), peak(pmax)
    dominates = gd.mean >= gp.mean - TOL and kd <= kp
    rows.append(["DPO's gold-vs-KL frontier dominates PPO's (DPO Fig. 2, with a ground-truth reward)",
                 "Rafailov et al. 2023", (f"DPO peak {gd.mean:.3f} at KL {kd:.2f}; PPO-max peak {gp.mean:.3f} at "
                 f"KL {kp:.2f}; vanilla PPO peak {peak(van)[0].mean:.3f}"),
                 "yes" if dominates else ("against vanilla PPO only" if gd.mean > peak(van)[0].mean + TOL else "no")])
    diff = _ci(pmax.gold[:, -1] - dpo.gold[:, -1])
    rows.append(["Well-tuned PPO beats DPO", "Xu et al. 2024",
                 f"final gold PPO-max minus DPO: {fmt(diff)} (per seed pairs)",
                 "yes" if diff.low > 0 else ("no: DPO is better" if diff.high < 0 else "not resolved by 3 seeds")])
    rows.append(["DPO drifts further from the reference than PPO (out-of-distribution solutions)", "Xu et al. 2024",
                 f"final KL per response: DPO {dpo.kl[:, -1].mean():.2f}, PPO-max {pmax.kl[:, -1].mean():.2f}",
                 "yes" if dpo.kl[:, -1].mean() > pmax.kl[:, -1].mean() else "no"])
    grpo = cs["grpo"]
    gain = lambda c: c.gold[:, -1].mean() - sft_gold
    rows.append(["Dropping the critic keeps RL's gains at lower cost", "Shao et al. 2024 (GRPO)",
                 (f"gold gain over SFT: GRPO {gain(grpo):+.3f}, PPO-max {gain(pmax):+.3f}; wall time "
                 f"{grpo.wall.mean():.0f} s against {pmax.wall.mean():.0f} s"),
                 "yes" if gain(grpo) >= gain(pmax) - TOL and grpo.wall.mean() < pmax.wall.mean() else
                 ("cheaper, smaller gain" if grpo.wall.mean() < pmax.wall.mean() else "no")])
    bon = cs["bon"]
    i = int(np.argmax(bon.gold.mean(0)))
    turn = bon.gold.mean(0)[-1] < bon.gold.mean(0)[i] - TOL
    rows.append(["Gold rises, then falls as best-of-n optimizes harder (over-optimization)", "Gao et al. 2023",
                 (f"best-of-n gold peaks at n = {int(bon.progress[i])} ({bon.gold.mean(0)[i]:.3f}, KL {bon.kl[0, i]:.2f}); "
                 f"n = {int(bon.progress[-1])}: {bon.gold.mean(0)[-1]:.3f}"),
                 "yes" if turn and i > 0 else ("rises only, no turn within n_max" if i > 0 else "no")])
    g_bon, k_bon = float(bon.gold.mean(0)[i]), float(bon.kl[0, i])
    rl = [c for c in cs.values() if c.name not in ("bon", "dpo")]
    reach = {c.label: at_kl(c, k_bon) for c in rl}
    worse = [n for n, v in reach.items() if v is not None and v < g_bon - TOL]
    rows.append(["RL is less KL-efficient than best-of-n: lower gold at the same KL", "Gao et al. 2023",
                 f"gold at best-of-n's peak KL {k_bon:.2f} (best-of-n {g_bon:.3f}): " + ", ".join(
                     f"{n} {'-' if v is None else f'{v:.3f}'}" for n, v in reach.items()),
                 f"yes for {', '.join(worse)}" if worse else "no"])
    nokl = cs["grpo_no_kl"]
    shared = min(grpo.kl.mean(0).max(), nokl.kl.mean(0).max())
    a, b = at_kl(grpo, shared), at_kl(nokl, shared)
    rows.append(["A KL penalty does not improve the gold-vs-KL frontier (it acts like early stopping)",
                 "Gao et al. 2023", (f"at KL {shared:.2f}: GRPO {a:.3f}, GRPO without KL {b:.3f}; final KL "
                 f"{grpo.kl[:, -1].mean():.2f} and {nokl.kl[:, -1].mean():.2f}"),
                 "yes" if abs(a - b) <= TOL else ("no: the KL term's frontier is higher" if a > b else
                                                  "no: the frontier without KL is higher")])
    return rows


VERDICT_HEADER = ["question or published claim", "source", "our runs (3 seeds, means)", "verdict"]

__all__ = ["HACK", "TABLE_HEADER", "TOL", "VERDICT_HEADER", "Curves", "all_curves", "at_kl", "curves", "fmt",
           "table_rows", "verdicts"]
