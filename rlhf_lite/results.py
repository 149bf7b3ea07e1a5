"""Reading a sweep's results (:mod:`rlhf_lite.sweeps`): values over seeds, error bands, paired intervals, verdicts.

Two kinds of uncertainty, kept apart (see :mod:`rlhf_lite.stats`):

* **over seeds** (:meth:`Results.ci`, :meth:`Results.band`): Student's t 95 % interval of the mean of the
  three seeds' values. It says how far another seed could move a result, the spread of PPO itself;
* **over prompts** (:meth:`Results.versus`): a paired bootstrap of the final gold score over the 256 test
  prompts (each the mean of several samples, averaged over the seeds), against a baseline evaluated on the
  same prompts with the same sampling seed. It says how sure the measurement is for these runs.

A paper's finding is graded ``reproduced`` / ``partly`` / ``differs`` by a rule stated next to it, over seeds
by :func:`over_seeds`: the same grade on every seed stands; mixed grades are ``partly``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .stats import Interval, mean_ci, paired_bootstrap

REPRODUCED, PARTLY, DIFFERS = "reproduced", "partly", "differs"


class Results:
    """One results file: ``Results(sweeps.load(name))``."""

    def __init__(self, data: dict) -> None:
        self.data = data
        self.by_key = {(r["label"], r["seed"]): r for r in data["runs"]}
        self.labels = list(dict.fromkeys(r["label"] for r in data["runs"]))
        self.seeds = sorted({r["seed"] for r in data["runs"]})

    def runs(self, label: str) -> list[dict]:
        """The runs of ``label``, by seed."""
        if label not in self.labels:
            raise KeyError(f"no variant {label!r} in sweep {self.data['sweep']!r}; it has: {', '.join(self.labels)}")
        return [self.by_key[(label, s)] for s in self.seeds]

    def group(self, group: str) -> list[str]:
        """Labels of the variants in ``group`` (e.g. "Fig. 6"), in sweep order."""
        return [label for label in self.labels if self.runs(label)[0]["group"] == group]

    def values(self, label: str, key: str) -> list:
        """One value per seed: a summary key, or ``final.<key>`` of the final gold evaluation."""
        if key.startswith("final."):
            return [r["final"][key[6:]] for r in self.runs(label)]
        return [r["summary"][key] for r in self.runs(label)]

    def ci(self, label: str, key: str = "final.score") -> Interval:
        """Mean over seeds of ``key`` with its t interval."""
        return mean_ci([float(v) for v in self.values(label, key)])

    def collapsed(self, label: str) -> int:
        """On how many seeds the collapse detector fired."""
        return sum(bool(v) for v in self.values(label, "collapse_detected"))

    def per_prompt(self, label: str) -> np.ndarray:
        """Final gold score per test prompt (mean of its samples), one row per seed: (seeds, prompts)."""
        return np.array([r["final"]["per_prompt"] for r in self.runs(label)])

    def sft_per_prompt(self) -> np.ndarray:
        """The SFT model's final-evaluation gold score per test prompt (prompts,)."""
        return np.array(self.data["sft_final"]["per_prompt"])

    def versus(self, label: str, baseline: str = "sft", seed: int | None = None) -> Interval:
        """Final gold of ``label`` minus ``baseline`` ("sft" or another label), paired over prompts, with a
        bootstrap 95 % interval; per-prompt scores averaged over the seeds (or of one ``seed``)."""
        def scores(name: str) -> np.ndarray:
            if name == "sft":
                return self.sft_per_prompt()
            rows = self.per_prompt(name)
            return rows[self.seeds.index(seed)] if seed is not None else rows.mean(axis=0)
        return paired_bootstrap(scores(label), scores(baseline))

    def series(self, label: str, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(iterations, values with one row per seed) of a per-iteration metric or a gold metric."""
        part = "gold" if key in ("gold_score", "eval_response_length") else "series"
        runs = self.runs(label)
        x = np.array(runs[0][part]["iteration"])
        ys = np.array([[np.nan if v is None else v for v in r[part][key]] for r in runs], dtype=float)
        return x, ys

    def band(self, label: str, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(iterations, mean, low, high): the mean over seeds at each iteration with its t interval."""
        x, ys = self.series(label, key)
        cis = [mean_ci(col[~np.isnan(col)]) if (~np.isnan(col)).any() else Interval(np.nan, np.nan, np.nan)
               for col in ys.T]
        return x, *(np.array([getattr(c, a) for c in cis]) for a in ("mean", "low", "high"))

    def window(self, label: str, key: str, first: int | None = None, last: int | None = None) -> list[float]:
        """Per seed, the mean of ``key`` over the first ``first`` or the last ``last`` iterations."""
        _, ys = self.series(label, key)
        part = ys[:, :first] if first is not None else ys[:, -last:]
        return [float(np.nanmean(row)) for row in part]


def grade(full: bool, some: bool = False) -> str:
    """``reproduced`` when the full claim holds, ``partly`` when only ``some`` of it does, else ``differs``."""
    return REPRODUCED if full else PARTLY if some else DIFFERS


def over_seeds(grades: Sequence[str]) -> str:
    """One grade for several seeds: a grade shared by every seed stands; a mix is ``partly``."""
    return grades[0] if len(set(grades)) == 1 else PARTLY


def tally(verdicts: Sequence[str]) -> str:
    """"3 reproduced, 2 partly, 0 differ" for a list of verdicts."""
    n = {g: sum(v == g for v in verdicts) for g in (REPRODUCED, PARTLY, DIFFERS)}
    return (f"{n[REPRODUCED]} reproduced, {n[PARTLY]} partly, {n[DIFFERS]} "
            f"differ{'s' if n[DIFFERS] == 1 else ''} (of {len(verdicts)})")


def fmt_ci(ci: Interval, digits: int = 3) -> str:
    """``0.612 [0.580, 0.644]``."""
    return f"{ci.mean:.{digits}f} [{ci.low:.{digits}f}, {ci.high:.{digits}f}]"


__all__ = ["DIFFERS", "PARTLY", "REPRODUCED", "Results", "fmt_ci", "grade", "over_seeds", "tally"]
