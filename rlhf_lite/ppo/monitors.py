"""The paper's monitors (paper Sec. 5.2, docs/paper.md Sec. 4): repetition, and the pattern-collapse detector.

The reward and the losses hide a collapse; response length, KL to the reference and the reference model's
perplexity of the responses show it. :func:`detect_collapse` flags the first iteration where a monitor
leaves its band (:class:`~rlhf_lite.ppo.config.CollapseBands`) for a few iterations in a row, and, with a
gold judge, where the gold score falls while the RM reward rises.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .config import CollapseBands


def repeated_trigram_fraction(texts: Sequence[str]) -> float:
    """Fraction of responses containing a repeated word trigram (the "pattern collapse" symptom)."""
    def has_repeat(t: str) -> bool:
        w = t.split()
        grams = [tuple(w[i : i + 3]) for i in range(len(w) - 2)]
        return len(grams) != len(set(grams))
    return float(np.mean([has_repeat(t) for t in texts])) if texts else 0.0


def detect_collapse(history: Sequence[dict], bands: CollapseBands) -> tuple[int, str] | None:
    """The paper's warning signs (paper Sec. 5.2): first iteration where a monitor left its band for
    ``bands.patience`` consecutive iterations, and why; None if never.

    ``history`` rows need ``iteration``, ``response_length``, ``kl_per_token``, ``ref_perplexity``,
    ``reward``, and ``gold_score`` on the rows where the gold measurement was taken.
    """
    k = bands.baseline_iterations
    if len(history) <= k:
        return None
    base_len = float(np.mean([h["response_length"] for h in history[:k]]))
    base_ppl = float(np.mean([h["ref_perplexity"] for h in history[:k]]))
    streak = 0
    peak_gold, reward_at_peak = -np.inf, None
    for h in history:
        reasons = []
        if h["response_length"] > bands.length_ratio * base_len:
            reasons.append(f"response length {h['response_length']:.1f} > {bands.length_ratio} x {base_len:.1f}")
        if h["kl_per_token"] > bands.kl_max:
            reasons.append(f"KL {h['kl_per_token']:.2f} nats/token > {bands.kl_max}")
        if h["ref_perplexity"] > bands.ref_perplexity_ratio * base_ppl:
            reasons.append(f"reference perplexity {h['ref_perplexity']:.1f} > {bands.ref_perplexity_ratio} x "
                           f"{base_ppl:.1f}")
        gold = h.get("gold_score")
        if gold is not None:
            if gold > peak_gold:
                peak_gold, reward_at_peak = gold, h["reward"]
            elif gold < peak_gold - bands.gold_drop and h["reward"] > reward_at_peak + bands.reward_rise:
                reasons.append(f"gold {gold:.2f} fell from its peak {peak_gold:.2f} while the RM reward rose "
                               f"to {h['reward']:.2f}")
        streak = streak + 1 if reasons else 0
        if streak >= bands.patience and h["iteration"] >= k:
            return int(h["iteration"]), "; ".join(reasons)
    return None


def run_figures(history: Sequence[dict], baseline: dict, collapse: tuple[int, str] | None) -> dict:
    """The headline figures of a run's summary: reward, gold score (``baseline``: the iteration-0 row),
    KL, length and repetition at the start and the end, and the collapse detector's verdict."""
    h = history
    golds = [baseline.get("gold_score")] + [r["gold_score"] for r in h if "gold_score" in r]
    golds = [g for g in golds if g is not None] or [None]
    last = h[-1] if h else {}
    return {
        "initial_reward": h[0]["reward"] if h else None, "final_reward": last.get("reward"),
        "initial_gold_score": golds[0], "peak_gold_score": max(golds) if golds[0] is not None else None,
        "final_gold_score": golds[-1], "final_kl": last.get("kl_per_token"),
        "final_kl_per_sequence": last.get("kl_per_sequence"),
        "initial_response_length": h[0]["response_length"] if h else None,
        "final_response_length": last.get("response_length"),
        "final_repetition_fraction": last.get("repetition_fraction"),
        "collapse_detected": collapse is not None,
        "collapse_iteration": collapse[0] if collapse else None,
        "collapse_reason": collapse[1] if collapse else None,
    }


__all__ = ["detect_collapse", "repeated_trigram_fraction", "run_figures"]
