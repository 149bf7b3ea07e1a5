"""Best-of-n sampling against the reward model: the no-training baseline of Gao et al. 2023 (arXiv 2210.10760).

For each test prompt, sample n responses from the SFT model and keep the one the RM scores highest. Nothing
is trained, so the only knob is n, and the distance from the reference has a closed form (Stiennon et al.
2020, Appendix G.3; Gao et al. 2023, Sec. 2):

    KL(best-of-n || pi_ref) = log n - (n - 1) / n     nats per response.

Beirami et al. 2024 (arXiv 2401.01879) show that this is an upper bound, reached when every sample is a
different response; a policy that often repeats itself (the tiny world's short answers do) is closer to
the reference than the formula says.

The stage samples ``n_max`` responses per prompt once and reads every n off them with the unbiased
estimator :func:`bon_expected` (the expectation over every n-subset of the samples, not one draw), so each
n's figure uses all the samples.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..evaluation import EVAL_SEED
from ..outdir import clear_out
from ..policy_setup import N_TEST_PROMPTS, load_policy_stack, policy_inputs
from ..rm import REWARD
from ..settings import check_common, positive, require, to_dict
from ..stage import begin_stage
from ..utils import DATA_DIR, MetricsLog, seed_everything, write_json
from .measure import StagePreset, measure_policy


@dataclass(frozen=True)
class BoNConfig:
    """Settings of the best-of-n stage. Defaults are the tiny profile's."""

    n_max: int = 64
    """Responses sampled per test prompt; every n up to this is read off them."""
    ns: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    """The values of n reported (each at most n_max)."""
    n_test_prompts: int = N_TEST_PROMPTS
    """Test prompts (the first ones, as in every gold measurement)."""
    max_new_tokens: int = 24
    """Response budget (PPO's rollout budget)."""
    max_prompt_tokens: int | None = None
    """Longest model prompt; None: the model's context length minus max_new_tokens."""
    seed: int = 0
    """Sampling seed (added to the gold measurement's fixed seed)."""

    def validate(self, context_length: int | None = None, rows: dict[str, int] | None = None) -> None:
        """Fail before any model loads on impossible settings, naming the field (``rows``, the rows per data
        file, are accepted for the common check; fewer test prompts than ``n_test_prompts`` means all of them)."""
        check_common(self)
        positive(self, "n_max", "n_test_prompts", "max_new_tokens")
        require(self, len(self.ns) > 0 and all(1 <= n <= self.n_max for n in self.ns), "ns",
                f"must be values of n in [1, n_max = {self.n_max}]")
        require(self, self.max_prompt_tokens is None or self.max_prompt_tokens > 0, "max_prompt_tokens",
                "must be > 0 or None")
        if context_length is not None:
            require(self, self.max_new_tokens < context_length, "max_new_tokens",
                    f"must be below the model's context length ({context_length})")


BON_PRESETS: dict[str, StagePreset] = {p.name: p for p in [
    StagePreset("bon", "best-of-n against the RM, n = 1 ... n_max (Gao et al. 2023)", {}),
]}
"""Presets as changes to a profile's best-of-n settings."""


# ----- the math -----------------------------------------------------------------------------------
def bon_kl(n: int) -> float:
    """Analytic KL(best-of-n || reference) in nats per response: log n - (n - 1) / n (0 at n = 1)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def bon_weights(N: int, n: int) -> np.ndarray:
    """(N,) probability that the sample of rank i (0: the lowest RM score) is the RM's favourite of a
    uniformly random n-subset of the N samples: C(i, n - 1) / C(N, n)."""
    if not 1 <= n <= N:
        raise ValueError(f"n must lie in [1, N = {N}], got {n}")
    total = math.comb(N, n)
    return np.array([math.comb(i, n - 1) / total for i in range(N)])


def bon_expected(scores, values, n: int) -> float:
    """Unbiased estimate of E[value of the best of n] from N >= n samples of one prompt.

    scores, values: (N,) the RM score and the value (gold score, RM score, length) of each sample. The
    average over every n-subset of the samples of the value of the subset's highest-scored sample (Nakano
    et al. 2021, Appendix; Gao et al. 2023), computed in O(N log N) with :func:`bon_weights`.
    """
    scores, values = np.asarray(scores, dtype=float), np.asarray(values, dtype=float)
    if scores.shape != values.shape or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape} and values {values.shape} must be equal 1-D shapes")
    order = np.argsort(scores, kind="stable")
    return float(bon_weights(len(scores), n) @ values[order])


def bon_curve(scores: np.ndarray, values: dict[str, np.ndarray], ns) -> list[dict]:
    """One row per n: ``n``, ``kl_bon`` and, for each named (P, N) array of ``values``, the mean over the P
    prompts of :func:`bon_expected`. ``scores``: (P, N) RM scores."""
    rows = []
    for n in ns:
        w = bon_weights(scores.shape[1], n)
        order = np.argsort(scores, axis=1, kind="stable")
        row = {"n": int(n), "kl_bon": bon_kl(n)}
        for name, v in values.items():
            row[name] = float((np.take_along_axis(np.asarray(v, dtype=float), order, axis=1) @ w).mean())
        rows.append(row)
    return rows


# ----- the stage ----------------------------------------------------------------------------------
def run_bon(out_dir: str | Path, sft_dir: str | Path, rm_dir: str | Path, cfg: BoNConfig | None = None,
            data_dir: str | Path = DATA_DIR, profile=None, preset: str = "custom", overwrite: bool = True) -> dict:
    """Best-of-n of the SFT model against the RM for every n of ``cfg.ns``; writes metrics.jsonl (a row per n),
    samples.jsonl, summary.json and bon.png. There is no trained policy to save: best-of-n is the SFT model
    and the RM at inference time. An earlier run in ``out_dir`` is replaced only with ``overwrite``."""
    from ..profiles import TINY
    from .plots import plot_bon

    profile = profile or TINY
    cfg = cfg or profile.bon
    out, timer = begin_stage(out_dir, cfg, profile, overwrite)
    inputs = policy_inputs("bon", cfg, sft_dir, rm_dir, data_dir, profile, n_test_prompts=cfg.n_test_prompts)
    seed_everything(cfg.seed)
    stack = load_policy_stack(profile, inputs.base_source, [REWARD], rm_dir)
    clear_out(out)  # an earlier run's files go only now, with every check passed and the models loaded
    P, N = len(inputs.test_prompts), cfg.n_max
    row, ev, stats = measure_policy(stack, None, inputs.tokenizer, inputs.test_prompts, cfg.max_new_tokens,
                                    inputs.judge, stack, samples_per_prompt=N, seed=EVAL_SEED + cfg.seed)
    rm = stats.reward.numpy().reshape(P, N)
    values = {"reward": rm, "response_length": stats.tokens.numpy().reshape(P, N)}
    if ev is not None:
        gold = np.array(ev.scores()).reshape(P, N)
        values["gold_score"] = gold
        cats = [inputs.judge.category(p.raw) for p in inputs.test_prompts]
        for c in inputs.judge.categories:
            sel = np.array([k == c for k in cats])
            if sel.any():
                values[f"gold/{c}"] = np.where(sel[:, None], gold, np.nan)
    rows = bon_curve(rm, {k: v for k, v in values.items() if not k.startswith("gold/")}, cfg.ns)
    for r in rows:  # per category: the mean over that category's prompts only
        n = r["n"]
        for k, v in values.items():
            if k.startswith("gold/"):
                sel = ~np.isnan(v[:, 0])
                r[k] = float(np.mean([bon_expected(rm[i], v[i], n) for i in np.flatnonzero(sel)]))
    texts = ev.responses if ev is not None else []
    distinct = float(np.mean([len(set(texts[i * N:(i + 1) * N])) / N for i in range(P)])) if texts else None
    log = MetricsLog(out / "metrics.jsonl", stage="bon")
    for r in rows:
        log.log(r)
    log.close()
    if texts:
        with (out / "samples.jsonl").open("w") as fh:
            for i in range(min(P, 8)):
                best = i * N + int(np.argmax(rm[i]))
                fh.write(json.dumps({"prompt": inputs.test_prompts[i].question, "first_sample": texts[i * N].strip(),
                                     "best_of_n": texts[best].strip(), "n": N, "gold_first": round(gold[i, 0], 3),
                                     "gold_best": round(gold.flat[best], 3)}, sort_keys=True) + "\n")
    best = max(rows, key=lambda r: r.get("gold_score", r["reward"]))
    summary = {"stage": "bon", "preset": preset, "profile": profile.name, "config": to_dict(cfg),
               "provenance": inputs.provenance, "test_prompts": P, "samples": P * N, "rows": rows,
               "distinct_fraction": distinct, "sft_kl_per_sequence": row["eval_kl_per_sequence"],
               "best_n": best["n"], "best_gold_score": best.get("gold_score"), "wall_seconds": timer()}
    write_json(out / "summary.json", summary)
    plot_bon(out, out / "bon.png")
    return summary


__all__ = ["BON_PRESETS", "BoNConfig", "bon_curve", "bon_expected", "bon_kl", "bon_weights", "run_bon"]
