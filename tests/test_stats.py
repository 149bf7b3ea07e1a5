"""Uncertainty helpers against values computed by hand and by brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rlhf_lite.stats import mean_ci, paired_bootstrap, t975


def test_mean_ci_by_hand() -> None:
    ci = mean_ci([1.0, 2.0, 3.0])  # mean 2, sd 1, n 3: 2 +- 4.303 / sqrt(3)
    assert ci.mean == 2.0 and ci.high == pytest.approx(2 + 4.303 / np.sqrt(3)) and ci.low == pytest.approx(
        2 - 4.303 / np.sqrt(3))
    assert mean_ci([0.5]).half_width == 0.0 and t975(100) == 1.96
    assert str(mean_ci([0.1, 0.3])) == "+0.200 [-1.071, +1.471]"
    with pytest.raises(ValueError, match="at least one value"):
        mean_ci([])


def test_paired_bootstrap_against_brute_force_and_its_pairing() -> None:
    rng = np.random.default_rng(1)
    base = rng.normal(0, 1, 200)  # a large prompt-to-prompt spread ...
    a, b = base + 0.1 + rng.normal(0, 0.05, 200), base  # ... and a small, steady gain
    ci = paired_bootstrap(a, b, n_resamples=2000, seed=3)
    assert ci.mean == pytest.approx(float((a - b).mean()))
    idx = np.random.default_rng(3).integers(0, 200, size=(2000, 200))  # the same resampling, written out
    means = (a - b)[idx].mean(axis=1)
    assert (ci.low, ci.high) == pytest.approx(tuple(np.quantile(means, [0.025, 0.975])))
    assert ci.excludes_zero() and ci.half_width < 0.02  # pairing removes the spread of the prompts
    unpaired = paired_bootstrap(a, rng.permutation(b), n_resamples=2000, seed=3)
    assert not unpaired.excludes_zero()  # without the pairing the same gain drowns in prompt noise
    with pytest.raises(ValueError, match="same length"):
        paired_bootstrap(a, b[:10])


def test_several_samples_per_prompt(stack) -> None:
    from rlhf_lite.evaluation import GoldJudge, evaluate_gold
    from rlhf_lite.text import Prompt

    class Tok:  # just enough of a tokenizer: prompts are lists of ids written as text
        pad_token_id, eos_token_id, padding_side = 0, 1, "left"

        def __call__(self, texts, return_tensors=None, padding=False, add_special_tokens=False):
            ids = [[int(t) for t in x.split()] for x in texts]
            n = max(map(len, ids))
            return {"input_ids": torch.tensor([[0] * (n - len(r)) + r for r in ids]),
                    "attention_mask": torch.tensor([[0] * (n - len(r)) + [1] * len(r) for r in ids])}

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    judge = GoldJudge(score=lambda p, r, f: float(len(r.split())), category=lambda p: "all", categories=("all",))
    prompts = [Prompt(f"p{i}", f"5 {6 + i} 7") for i in range(3)]
    model = stack.base_model
    ev = evaluate_gold(model, Tok(), prompts, 4, judge, samples_per_prompt=2)
    assert [p.raw for p in ev.prompts] == ["p0", "p0", "p1", "p1", "p2", "p2"]
    per = ev.per_prompt_scores()
    assert len(per) == 3 and per == pytest.approx([np.mean(ev.scores()[i:i + 2]) for i in (0, 2, 4)])
    assert ev.score == pytest.approx(np.mean(per))
    one = evaluate_gold(model, Tok(), prompts, 4, judge)
    assert one.samples_per_prompt == 1 and len(one.prompts) == 3
