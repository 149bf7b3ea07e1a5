"""PPO-max tricks at the trainer level (issue 5): critic pretraining, the ptx term, global clipping."""

from __future__ import annotations

from dataclasses import replace

import torch

from rlhf_lite.ppo import core
from rlhf_lite.ppo.trainer import PPOTrainer
from tests.test_robustness import CFG, tiny_setup


def _params(t: PPOTrainer, name: str) -> list[torch.Tensor]:
    return [p.detach().clone() for p in t.stack.adapter_parameters(name)]


def _changed(before: list[torch.Tensor], after: list[torch.Tensor]) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, after))


def test_critic_pretraining_changes_only_the_critic(tmp_path) -> None:
    cfg = replace(CFG, critic_pretrain_iterations=2)
    t = PPOTrainer(cfg, tiny_setup(), tmp_path)
    policy0, critic0, reward0 = _params(t, "policy"), _params(t, "critic"), _params(t, "reward")
    rows = [t.step(), t.step()]
    assert not _changed(policy0, _params(t, "policy"))  # the policy waits while the critic learns
    assert _changed(critic0, _params(t, "critic"))
    assert not _changed(reward0, _params(t, "reward"))  # the RM is frozen throughout
    assert [r["policy_updated"] for r in rows] == [False, False]
    assert "pg_loss" not in rows[0]
    row = t.step()  # the third iteration trains the policy too
    assert row["policy_updated"] and _changed(policy0, _params(t, "policy"))


def test_ptx_term_is_the_lm_loss_on_sft_response_tokens_only(tmp_path, monkeypatch) -> None:
    """The ptx batch's loss mask covers exactly the response tokens (and EOS) of SFT demonstrations."""
    t = PPOTrainer(replace(CFG, ptx_coef=1.0), tiny_setup(), tmp_path)
    seen = {}
    real = core.ptx_loss

    def spy(logits, labels, loss_mask):
        seen["mask"], seen["labels"] = loss_mask.clone(), labels.clone()
        return real(logits, labels, loss_mask)

    monkeypatch.setattr(core, "ptx_loss", spy)
    t.step()
    eos = t.tok.eos_token_id
    mask, labels = seen["mask"].bool(), seen["labels"]
    for m, lab in zip(mask, labels):
        covered = lab[m].tolist()
        assert covered and covered[-1] == eos  # ends at the demonstration's EOS
        # every covered token lies after the prompt's last "\n\nAssistant:" marker
        marker = t.tok.convert_tokens_to_ids("\n\nAssistant:")
        first = int(m.nonzero()[0])
        assert marker in lab[:first].tolist() and marker not in covered


def test_global_clipping_bounds_the_joint_norm(tmp_path) -> None:
    t = PPOTrainer(replace(CFG, max_grad_norm=1e-3), tiny_setup(), tmp_path)
    row = t.step()
    assert row["grad_norm"] > 1e-3  # the pre-clip norm is reported ...
    params = t.policy_params + t.critic_params
    for p in params:  # ... and after one more clipped backward the joint norm is within the bound
        p.grad = torch.ones_like(p)
    pre = core.clip_grad_norm_global(params, 1e-3)
    post = torch.sqrt(sum((p.grad ** 2).sum() for p in params)).item()
    assert pre > 1e-3 and post <= 1e-3 * (1 + 1e-5)


def test_no_gold_judge_skips_gold_metrics(tmp_path) -> None:
    """Real data (HH-RLHF) has no gold judge: the run logs the RM reward and the monitors only."""
    setup = tiny_setup()
    setup.gold_fn = None
    t = PPOTrainer(replace(CFG, gold_every=1, iterations=1), setup, tmp_path)
    row = t.step()
    assert "gold_score" not in row and "train_gold_score" not in row
    assert "reward" in row and "kl_per_token" in row
    assert t.gold_eval() == {}
