"""Uncertainty: confidence intervals over seeds, and a paired bootstrap over prompts.

A difference of gold scores between two models means little without its noise: the gold measurement samples
responses, so two evaluations of the same model differ, and a training seed moves a run. Two tools:

* :func:`mean_ci` for a handful of independent runs (seeds): Student's t 95 % interval of the mean;
* :func:`paired_bootstrap` for two models evaluated on the same prompts: resample prompts with replacement,
  keep the pairing (each prompt's score under both models), and read the interval of the mean difference
  off the percentiles (Efron and Tibshirani 1993). Pairing removes the prompt-to-prompt spread, which is
  most of the variance when the models are alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Interval:
    """A point estimate and its confidence interval at ``level``."""

    mean: float
    low: float
    high: float
    level: float = 0.95

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def __str__(self) -> str:
        return f"{self.mean:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"


# Two-sided 95 % quantiles of Student's t (t_{0.975, df}), from the standard tables; df > 30 uses 1.96.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    """t_{0.975} with ``df`` degrees of freedom (the 95 % two-sided interval's multiplier)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return _T975[df - 1] if df <= len(_T975) else 1.96


def mean_ci(values: Sequence[float]) -> Interval:
    """The mean of independent ``values`` (e.g. one figure per seed) with Student's t 95 % interval; a single
    value gives a zero-width interval (nothing is known about the spread: say so where it is shown)."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("mean_ci needs at least one value")
    mean = float(x.mean())
    if x.size == 1:
        return Interval(mean, mean, mean)
    half = t975(x.size - 1) * float(x.std(ddof=1)) / np.sqrt(x.size)
    return Interval(mean, mean - half, mean + half)


def paired_bootstrap(a: Sequence[float], b: Sequence[float], n_resamples: int = 10_000, seed: int = 0,
                     level: float = 0.95) -> Interval:
    """Mean of ``a - b`` over paired items (prompts), with a percentile bootstrap interval.

    ``a[i]`` and ``b[i]`` are the scores of the same prompt under two models (e.g. the mean gold score of
    several samples per prompt). Prompts are resampled with replacement ``n_resamples`` times with a fixed
    ``seed``, so the interval is reproducible.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or a.size < 2:
        raise ValueError(f"paired_bootstrap needs two 1-D arrays of the same length >= 2, got {a.shape}, {b.shape}")
    diff = a - b
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, diff.size, size=(n_resamples, diff.size))].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return Interval(float(diff.mean()), float(low), float(high), level)


__all__ = ["Interval", "mean_ci", "paired_bootstrap", "t975"]
