"""What notebook 06 computes from the stored sweep (:mod:`rlhf_lite.beyond.sweep`): curves over seeds, the
results table with 95 % intervals, the RM-hacking rule, and the verdicts against the published claims
(graded ``reproduced`` / ``partly`` / ``differs``, as in notebooks 03 and 04).

Every figure here is read off the compact results; nothing is typed in by hand.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..ppo.config import CollapseBands
from ..results import grade
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
    ref_ppl: np.ndarray  # the SFT model's perplexity of the responses (best-of-n: NaN, not measured per n)
    progress: np.ndarray  # (K,) fraction of the training budget (best-of-n: n)
    wall: np.ndarray  # (S,) seconds per run
    collapsed: np.ndarray  # (S,) whether the stage's collapse detector fired (best-of-n: never)

    def peak(self, s: int) -> int:
        """Index of seed ``s``'s best measurement after the start (the start is the SFT model; best-of-n: n > 1).
        The best of a dozen noisy measurements is an optimistic estimate: compare peaks with that in mind."""
        return 1 + int(np.argmax(self.gold[s, 1:]))

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
    collapsed = np.array([bool(r["summary"].get("collapse_detected")) for r in runs])
    if runs[0]["stage"] == "bon":
        rows = [r["series"] for r in runs]
        get = lambda key: np.array([[p[key] for p in rs] for rs in rows])
        return Curves(name, label, get("kl_bon"), get("gold_score"), get("reward"), get("response_length"),
                      np.full((len(runs), len(rows[0])), np.nan), np.array([p["n"] for p in rows[0]], dtype=float),
                      wall, collapsed)
    pts = [[p for p in r["series"] if "gold_score" in p] for r in runs]
    if len({len(p) for p in pts}) != 1:
        raise ValueError(f"{name}: the seeds were measured a different number of times")
    get = lambda key: np.array([[p[key] for p in ps] for ps in pts])
    its = np.array([p["iteration"] for p in pts[0]], dtype=float)
    return Curves(name, label, get("eval_kl_per_sequence"), get("gold_score"), get("eval_reward"),
                  get("eval_response_length"), get("eval_ref_perplexity"), its / its[-1], wall, collapsed)


def all_curves(results: dict, precise_start: bool = True) -> dict[str, Curves]:
    """Every method's :class:`Curves`. ``precise_start``: every trained method starts as the SFT model, whose
    gold score, RM reward and length best-of-n at n = 1 measures on 64 samples per prompt; that replaces the
    first measurement of one sample per prompt (identical for every method and seed, so its noise would not
    average out over seeds)."""
    cs = {m.name: curves(results, m.name) for m in METHODS}
    if precise_start:
        bon = cs["bon"]
        for c in cs.values():
            if c.name != "bon":
                c.gold[:, 0], c.reward[:, 0] = bon.gold[:, 0].mean(), bon.reward[:, 0].mean()
                c.length[:, 0] = bon.length[:, 0].mean()
    return cs


def _ci(values) -> Interval:
    return mean_ci(list(values))


def fmt(iv: Interval, digits: int = 3) -> str:
    """``mean [low, high]``; one seed shows the mean alone."""
    if iv.low == iv.high:
        return f"{iv.mean:.{digits}f}"
    return f"{iv.mean:.{digits}f} [{iv.low:.{digits}f}, {iv.high:.{digits}f}]"


def sft_gold(cs: dict[str, Curves]) -> float:
    """The SFT model's expected gold score, measured precisely: best-of-n at n = 1 averages 64 samples per test
    prompt (every other method's first measurement is one sample per prompt: the same model, 64x the noise)."""
    return float(cs["bon"].gold[:, 0].mean())


def hackers(cs: dict[str, Curves]) -> list[str]:
    """The methods that hacked the RM (:data:`HACK`) on most seeds."""
    return [c.label for c in cs.values() if sum(c.hacked(s) for s in range(c.gold.shape[0])) > c.gold.shape[0] / 2]


def table_rows(cs: dict[str, Curves]) -> list[list[str]]:
    """One row per method: final and peak gold with 95 % intervals over seeds, the KL at the peak and at the
    end, the RM reward and length at the end, on how many seeds the RM was hacked and the collapse detector
    fired, the wall time."""
    rows = []
    for c in cs.values():
        S = c.gold.shape[0]
        peaks = [c.peak(s) for s in range(S)]
        rows.append([c.label, fmt(_ci(c.gold[:, -1])), fmt(_ci(c.gold[np.arange(S), peaks])),
                     fmt(_ci(c.kl[np.arange(S), peaks]), 2), fmt(_ci(c.kl[:, -1]), 2), fmt(_ci(c.reward[:, -1]), 2),
                     f"{c.length[:, -1].mean():.1f}", f"{sum(c.hacked(s) for s in range(S))} of {S}",
                     "-" if c.name == "bon" else f"{int(c.collapsed.sum())} of {S}", f"{c.wall.mean():.0f}"])
    return rows


TABLE_HEADER = ["method", "final gold", "peak gold", "KL at peak", "final KL", "final RM reward", "final length",
                "RM hacked (seeds)", "collapse detected (seeds)", "wall s / run"]


def at_kl(c: Curves, kl: float) -> float | None:
    """The mean gold score of ``c`` where its mean path first reaches ``kl`` nats (linear interpolation);
    None if it never gets that far."""
    x, y = c.kl.mean(0), c.gold.mean(0)
    for i in range(1, len(x)):
        if x[i] >= kl > x[i - 1] or x[i] == kl:
            return float(y[i - 1] + (y[i] - y[i - 1]) * (kl - x[i - 1]) / (x[i] - x[i - 1] or 1.0))
    return float(y[0]) if kl <= x[0] else None


def _peak(c: Curves) -> tuple[Interval, float]:
    """The peak gold over seeds (95 % interval) and the mean KL at which the seeds reached it."""
    S = c.gold.shape[0]
    idx = [c.peak(s) for s in range(S)]
    return _ci(c.gold[np.arange(S), idx]), float(c.kl[np.arange(S), idx].mean())


def frontier_gap(a: Curves, b: Curves, points: int = 6) -> tuple[float, float, float]:
    """Mean of ``at_kl(a) - at_kl(b)`` over ``points`` KL values spaced evenly in log between 0.3 nats and the
    largest mean KL both paths reach; returns (gap, low end, high end)."""
    top = float(min(a.kl.mean(0).max(), b.kl.mean(0).max()))
    grid = np.geomspace(0.3, top, points)
    return float(np.mean([at_kl(a, k) - at_kl(b, k) for k in grid])), 0.3, top


def findings(cs: dict[str, Curves]) -> list[list[str]]:
    """(question, what our runs show, answer) rows for the two questions this comparison asks itself."""
    base = sft_gold(cs)
    best = max(cs.values(), key=lambda c: _peak(c)[0].mean)
    g, k = _peak(best)
    h = hackers(cs)
    return [["Which method reaches the best gold score, and at which KL?",
             f"{best.label}: peak {fmt(g)} at {k:.2f} nats per response (SFT model {base:.3f})", best.label],
            ["Which methods hack the RM (after the gold peak, gold falls while the RM reward rises)?",
             f"on most seeds: {', '.join(h) or 'none'}", ", ".join(h) or "none"]]


FINDING_HEADER = ["question", "our runs (3 seeds, means)", "answer"]


def verdicts(cs: dict[str, Curves]) -> list[list[str]]:
    """(published claim, source, what our runs show, verdict) rows; each verdict is ``reproduced``, ``partly``
    or ``differs`` (:func:`rlhf_lite.results.grade`) by a stated rule on the means over seeds: figures within
    :data:`TOL` count as equal; a difference of final gold scores needs its 95 % interval over the seed
    pairs to exclude 0."""
    base = sft_gold(cs)
    rows = []
    dpo, pmax, van, grpo, nokl, bon = (cs[n] for n in ("dpo", "ppo_max", "vanilla", "grpo", "grpo_no_kl", "bon"))
    (gd, kd), (gp, kp) = _peak(dpo), _peak(pmax)
    rows.append(["DPO's gold-vs-KL frontier dominates PPO's (their Fig. 2, with a ground-truth reward)",
                 "Rafailov et al. 2023", (f"peak gold: DPO {gd.mean:.3f} at KL {kd:.2f}, PPO-max {gp.mean:.3f} at "
                                          f"KL {kp:.2f}, vanilla PPO {_peak(van)[0].mean:.3f}"),
                 grade(gd.mean >= gp.mean - TOL and kd <= kp, gd.mean > _peak(van)[0].mean + TOL)])
    diff = _ci(pmax.gold[:, -1] - dpo.gold[:, -1])
    rows.append(["Well-tuned PPO beats DPO", "Xu et al. 2024", f"final gold, PPO-max minus DPO: {fmt(diff)}",
                 grade(diff.low > 0, diff.mean > 0)])
    ppl = lambda c: float(c.ref_ppl[:, -1].mean())
    further, stranger = dpo.kl[:, -1].mean() > pmax.kl[:, -1].mean(), ppl(dpo) > ppl(pmax)
    rows.append(["DPO drifts to responses off the reference's distribution", "Xu et al. 2024",
                 (f"at the end, KL per response DPO {dpo.kl[:, -1].mean():.2f}, PPO-max {pmax.kl[:, -1].mean():.2f}; "
                  f"reference perplexity DPO {ppl(dpo):.1f}, PPO-max {ppl(pmax):.1f}"),
                 grade(further and stranger, further or stranger)])
    rows.append(["Without a critic, RL costs less", "Shao et al. 2024 (GRPO)",
                 f"wall time per run: GRPO {grpo.wall.mean():.0f} s, vanilla PPO {van.wall.mean():.0f} s",
                 grade(bool(grpo.wall.mean() < van.wall.mean()))])
    gains = {c.label: _peak(c)[0].mean - base for c in (grpo, van, pmax)}
    rows.append(["... and keeps RL's gains", "Shao et al. 2024 (GRPO)",
                 "best gold after the start, minus the SFT model's: " + ", ".join(f"{n} {v:+.3f}" for n, v in gains.items()),
                 grade(gains["GRPO"] >= gains["PPO-max"] - TOL, gains["GRPO"] >= gains["vanilla PPO"] - TOL)])
    bg = bon.gold.mean(0)
    i = int(np.argmax(bg))
    rows.append(["Gold rises, then falls as best-of-n optimizes harder", "Gao et al. 2023",
                 (f"best-of-n gold: n = 1 {bg[0]:.3f}, peak at n = {int(bon.progress[i])} {bg[i]:.3f} (KL "
                  f"{bon.kl[0, i]:.2f}), n = {int(bon.progress[-1])} {bg[-1]:.3f}"),
                 grade(i > 0 and bool(bg[-1] < bg[i] - TOL), i > 0)])
    g_bon, k_bon = float(bg[i]), float(bon.kl[0, i])
    reach = {c.label: at_kl(c, k_bon) for c in (van, pmax, grpo, nokl)}
    worse = [n for n, v in reach.items() if v is not None and v < g_bon - TOL]
    rows.append(["RL is less KL-efficient than best-of-n: less gold at the same KL", "Gao et al. 2023",
                 f"gold at best-of-n's peak KL {k_bon:.2f} (best-of-n {g_bon:.3f}): " + ", ".join(
                     f"{n} {'-' if v is None else f'{v:.3f}'}" for n, v in reach.items())
                 + (f"; less for {', '.join(worse)}" if worse else ""),
                 grade(len(worse) == len(reach), bool(worse))])
    gap, lo, hi = frontier_gap(grpo, nokl)
    rows.append(["A KL penalty does not improve the gold-vs-KL frontier (it acts like early stopping)",
                 "Gao et al. 2023", (f"GRPO minus GRPO without KL, gold at equal KL, mean over {lo:.1f}-{hi:.1f} "
                                     f"nats: {gap:+.3f}; final KL {grpo.kl[:, -1].mean():.1f} and "
                                     f"{nokl.kl[:, -1].mean():.1f}"),
                 grade(abs(gap) <= TOL)])
    return rows


VERDICT_HEADER = ["published claim", "source", "our runs (3 seeds, means)", "verdict"]

__all__ = ["FINDING_HEADER", "HACK", "TABLE_HEADER", "TOL", "VERDICT_HEADER", "Curves", "all_curves", "at_kl", "curves",
           "findings", "fmt", "frontier_gap", "hackers", "sft_gold", "table_rows", "verdicts"]
