"""Simulated annotators: Bradley-Terry labels for preference pairs, and their measurement from the labels.

The annotators (:class:`AnnotatorConfig`, :func:`annotate`) label pairs with a Bradley-Terry draw on
``gold + length_bias * n_words``: they agree with the gold ordering about 70 % of the time (HH-RLHF's
raters agree with each other about as often) and prefer longer answers. The length bias per word
exceeds the gold concision penalty per word, so padding a correct answer with fillers wins the
annotators' vote while losing gold score: the exploitable proxy the reward model learns and vanilla PPO
hacks (paper section 5.2, Fig. 4 "pattern collapse").
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .judge import gold_score
from .tasks import category_of, n_words


@dataclass(frozen=True)
class AnnotatorConfig:
    """Bradley-Terry annotators: P(A preferred) = sigmoid((u_A - u_B) / temperature), u = gold + bias * words.

    ``length_bias`` (per word) exceeds the gold concision penalty (0.03 per word), so annotators
    prefer a padded correct answer over a concise one: the proxy gap the reward model inherits.
    """

    temperature: float = 0.4
    length_bias: float = 0.14


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def annotate(pairs: Iterable[tuple[str, str, str]], cfg: AnnotatorConfig,
             rng: random.Random) -> list[dict[str, Any]]:
    """Label (prompt, response_a, response_b) pairs; returns HH-RLHF-style rows with full transcripts.

    Each row: prompt, chosen (= prompt + chosen response), rejected, category, gold_chosen, gold_rejected.
    """
    rows = []
    for prompt, a, b in pairs:
        ga, gb = gold_score(prompt, a), gold_score(prompt, b)
        ua = ga + cfg.length_bias * n_words(a)
        ub = gb + cfg.length_bias * n_words(b)
        a_wins = rng.random() < _sigmoid((ua - ub) / cfg.temperature)
        (c, gc), (r, gr) = ((a, ga), (b, gb)) if a_wins else ((b, gb), (a, ga))
        rows.append({"prompt": prompt, "chosen": prompt + c, "rejected": prompt + r,
                     "category": category_of(prompt), "gold_chosen": gc, "gold_rejected": gr})
    return rows


def _fit_logistic_no_intercept(x: np.ndarray, iters: int = 50) -> np.ndarray:
    """Maximum-likelihood weights of P(y=1) = sigmoid(x @ w) with every label 1 (Newton / IRLS)."""
    w = np.zeros(x.shape[1])
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(x @ w)))
        grad = x.T @ (1.0 - p)
        hess = (x * (p * (1.0 - p))[:, None]).T @ x + 1e-9 * np.eye(x.shape[1])
        step = np.linalg.solve(hess, grad)
        w = w + step
        if np.max(np.abs(step)) < 1e-10:
            break
    return w


def measure_annotators(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Agreement with the gold ordering, and the annotators' length bias and temperature recovered by fit.

    Agreement counts rows whose gold scores differ. The fit is a 2-feature logistic regression without
    intercept on (gold_chosen - gold_rejected, words_chosen - words_rejected) with label "chosen won":
    under the Bradley-Terry model its coefficients are (1 / T, bias / T).
    """
    gd, ld = [], []
    for r in rows:
        resp_c = r["chosen"][len(r["prompt"]):]
        resp_r = r["rejected"][len(r["prompt"]):]
        gd.append(r["gold_chosen"] - r["gold_rejected"])
        ld.append(n_words(resp_c) - n_words(resp_r))
    g, ln = np.asarray(gd, dtype=float), np.asarray(ld, dtype=float)
    decided = np.abs(g) > 1e-9
    w = _fit_logistic_no_intercept(np.stack([g, ln], axis=1))
    return {"agreement": float(np.mean(g[decided] > 0)), "length_bias": float(w[1] / w[0]),
            "temperature": float(1.0 / w[0]), "n": float(len(rows)), "n_decided": float(decided.sum())}
