"""Reward model: the loss, score reading under padding, the LM term, and learning a separable set."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from rlhf_lite.batching import pad_batch
from rlhf_lite.rm import pairwise_loss, rm_loss, rm_score, scores_at_eos
from rlhf_lite.rm_eval import agreement, pearson
from tests.conftest import EOS, PAD, make_stack


def test_pairwise_loss_matches_hand_computation() -> None:
    rc = torch.tensor([2.0, 0.5, -1.0])
    rr = torch.tensor([1.0, 1.5, -1.0])
    expected = (-math.log(1 / (1 + math.exp(-1.0))) - math.log(1 / (1 + math.exp(1.0))) + math.log(2)) / 3
    assert abs(pairwise_loss(rc, rr).item() - expected) < 1e-6


def test_scores_at_eos_reads_last_real_token() -> None:
    values = torch.arange(12.0).reshape(2, 6)
    att = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]])
    assert scores_at_eos(values, att).tolist() == [3.0, 11.0]


def test_same_score_alone_batched_left_and_right_padded() -> None:
    stack = make_stack(("reward",))
    seqs = [[5, 6, 7, 8, EOS], [9, 10, 11, 12, 13, 14, 15, EOS], [3, 4, EOS]]
    masks = [[0] * len(s) for s in seqs]
    with torch.no_grad():
        alone = [rm_score(stack, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)).item() for s in seqs]
        for side in ("right", "left"):
            ids, att, _ = pad_batch(seqs, masks, PAD, side=side)
            batched = rm_score(stack, ids, att).tolist()
            for a, b in zip(alone, batched):
                assert abs(a - b) < 1e-5, (side, alone, batched)


def test_lm_term_uses_only_chosen_response_tokens() -> None:
    stack = make_stack(("reward",))
    chosen = [[5, 6, 7, 8, 9, EOS], [10, 11, 12, 13, EOS]]
    rejected = [[5, 6, 7, 20, 21, 22, EOS], [10, 11, 12, 30, EOS]]
    cmask = [[0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1]]
    rmask = [[0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1]]
    ids, att, lm = pad_batch(chosen + rejected, cmask + rmask, PAD)
    with torch.no_grad():
        with_lm, stats = rm_loss(stack, ids, att, lm, lm_coef=1.0)
        without, _ = rm_loss(stack, ids, att, lm, lm_coef=None)
        logits = stack.logits("reward", ids[:2], att[:2])
    # Hand computation: cross-entropy of the chosen rows' response tokens only.
    terms = []
    for b, (seq, m) in enumerate(zip(chosen, cmask)):
        for t in range(1, len(seq)):
            if m[t]:
                terms.append(F.cross_entropy(logits[b, t - 1][None], torch.tensor([seq[t]])).item())
    expected_lm = sum(terms) / len(terms)
    assert abs(stats["lm_loss"] - expected_lm) < 1e-5
    assert abs((with_lm - without).item() - expected_lm) < 1e-5


def test_training_on_separable_pairs_reaches_full_accuracy() -> None:
    torch.manual_seed(0)
    stack = make_stack(("reward",), randomize=False).train()
    g = torch.Generator().manual_seed(0)
    # chosen responses end in token 30, rejected in token 31: a separable signal.
    prompts = torch.randint(3, 25, (16, 4), generator=g)
    chosen = torch.cat([prompts, torch.full((16, 1), 30), torch.full((16, 1), EOS)], 1)
    rejected = torch.cat([prompts, torch.full((16, 1), 31), torch.full((16, 1), EOS)], 1)
    ids = torch.cat([chosen, rejected])
    att = torch.ones_like(ids)
    lm = torch.zeros_like(ids)
    opt = torch.optim.Adam(stack.adapter_parameters("reward"), lr=1e-2)
    for _ in range(40):
        loss, stats = rm_loss(stack, ids, att, lm, lm_coef=None)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        s = rm_score(stack.eval(), ids, att)
    assert (s[:16] > s[16:]).float().mean().item() == 1.0
    assert stats["rank_loss"] < 0.1


def test_agreement_and_pearson_on_known_values() -> None:
    import numpy as np

    assert agreement(np.array([1.0, -2.0, 3.0, 0.5]), np.array([2.0, -1.0, -1.0, 0.0])) == 2 / 3
    assert abs(pearson([1, 2, 3], [2, 4, 6]) - 1.0) < 1e-12
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))
