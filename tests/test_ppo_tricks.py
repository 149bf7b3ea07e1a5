"""The trainer's branches, each checked where it acts: critic pretraining, the ptx term, global clipping inside
the update, the rollout buffer of make_experience, reward and advantage normalization, the entropy term, the
reference as old policy, and the on-policy first minibatch."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from rlhf_lite.generation import encode_prompts, sample
from rlhf_lite.ppo import core
from rlhf_lite.ppo.experience import make_experience
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

    def spy(logits, labels, loss_mask, *mean):
        seen["mask"], seen["labels"] = loss_mask.clone(), labels.clone()
        return real(logits, labels, loss_mask, *mean)

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


def test_update_clips_the_joint_norm_before_each_step(tmp_path) -> None:
    """Global clipping (PPO-max #6) happens inside update: at every optimizer step the joint norm of the policy
    and critic gradients is within the bound, while the row reports the norm before clipping."""
    t = PPOTrainer(replace(CFG, max_grad_norm=1e-3), tiny_setup(), tmp_path)
    params = t.policy_params + t.critic_params
    seen = []
    for opt in (t.policy_opt, t.critic_opt):
        step = opt.step

        def recording_step(*args, _step=step, **kwargs):
            seen.append(torch.sqrt(sum((p.grad ** 2).sum() for p in params if p.grad is not None)).item())
            return _step(*args, **kwargs)

        opt.step = recording_step
    row = t.step()
    assert len(seen) == 2 * CFG.ppo_epochs * (CFG.rollout_batch // CFG.minibatch_size)
    assert max(seen) <= 1e-3 * (1 + 1e-4) and row["grad_norm"] > 1e-2  # clipped hard, reported before


def test_without_clipping_the_step_sees_the_full_norm(tmp_path) -> None:
    t = PPOTrainer(replace(CFG, max_grad_norm=None), tiny_setup(), tmp_path)
    params = t.policy_params + t.critic_params
    seen = []
    step = t.critic_opt.step

    def recording_step(*args, **kwargs):
        seen.append(core.global_grad_norm(params))
        return step(*args, **kwargs)

    t.critic_opt.step = recording_step
    t.step()
    assert min(seen) > 1e-2  # the same set-up's gradients are far above the bound of the test before


def test_make_experience_on_a_real_rollout(tmp_path) -> None:
    """Phases 2-4 wired end to end: the RM score lands on each response's last token, the KL penalty is on
    response tokens only, and every entry off the response is 0."""
    cfg = replace(CFG, kl_coef=0.1, reward_norm="none", reward_clip=None)
    t = PPOTrainer(cfg, tiny_setup(), tmp_path)
    ids, att = encode_prompts(t.tok, [p.text for p in t.setup.train_prompts[:8]])
    calls = {"n": 0}

    def early_eos(policy):  # rows 0-3 end with EOS at their third token: responses of unequal length
        def forward(**kw):
            out = policy(**kw)
            if calls["n"] == 2:
                out.logits[:4, -1, t.tok.eos_token_id] += 50.0
            calls["n"] += 1
            return out
        return forward

    with torch.no_grad(), t.stack.causal_lm("policy") as policy:
        ro = sample(early_eos(policy), ids, att, cfg.max_new_tokens, t.tok.eos_token_id, t.tok.pad_token_id,
                    generator=torch.Generator().manual_seed(0))
    exp, stats = make_experience(cfg, t.stack, t.stack, ro, core.RunningMoments())
    P = ro.prompt_len
    mask = ro.response_mask[:, P:].float()
    assert 0 < mask.sum() < mask.numel()  # some responses end early (EOS), so padding is present
    with torch.no_grad():
        for i in range(len(ro.finished)):  # the RM alone on each unpadded sequence
            ids = ro.input_ids[i][ro.attention_mask[i].bool()][None]
            score = t.stack.values("reward", ids, torch.ones_like(ids))[0, -1]
            last = int(mask[i].sum()) - 1
            kl = (exp.old_logprobs[i] - exp.ref_logprobs[i]) * mask[i]
            expected = -0.1 * kl
            expected[last] += score
            torch.testing.assert_close(exp.rewards[i], expected, atol=1e-5, rtol=1e-5)
    off = mask == 0
    for name in ("rewards", "old_logprobs", "ref_logprobs", "old_values"):
        assert (getattr(exp, name)[off] == 0).all(), name
    assert stats["kl_per_token"] == pytest.approx(core.masked_mean(exp.old_logprobs - exp.ref_logprobs, mask).item())
    assert stats["response_length"] == pytest.approx(mask.sum(-1).mean().item())


def test_reward_normalization_branches_and_reference_old_policy(tmp_path) -> None:
    t = PPOTrainer(CFG, tiny_setup(), tmp_path)
    ro = t.rollout(t.setup.train_prompts[:8])
    results = {}
    for mode, clip in (("none", None), ("scale", None), ("normalize", None), ("normalize", 0.2)):
        cfg = replace(CFG, kl_coef=None, reward_norm=mode, reward_clip=clip)
        moments = core.RunningMoments()
        results[mode, clip] = make_experience(cfg, t.stack, t.stack, ro, moments)
        assert moments.count == 8  # every mode keeps the running statistics
    raw = results["none", None][0].rewards.sum(-1)
    torch.testing.assert_close(results["scale", None][0].rewards.sum(-1), raw / (raw.std() + 1e-8))
    torch.testing.assert_close(results["normalize", None][0].rewards.sum(-1), (raw - raw.mean()) / (raw.std() + 1e-8))
    assert results["normalize", 0.2][0].rewards.abs().max() <= 0.2 + 1e-6
    assert results["none", None][1]["reward_used"] == pytest.approx(raw.mean().item(), abs=1e-6)
    # advantage whitening and clipping, and the "importance sampling" variant's old policy
    cfg = replace(CFG, adv_norm_clip=0.5, old_policy="reference")
    exp, _ = make_experience(cfg, t.stack, t.stack, ro, core.RunningMoments())
    plain, _ = make_experience(replace(cfg, adv_norm_clip=None), t.stack, t.stack, ro, core.RunningMoments())
    torch.testing.assert_close(exp.advantages, core.normalize_and_clip_advantages(plain.advantages, exp.mask, 0.5))
    assert exp.advantages.abs().max() <= 0.5 + 1e-6
    torch.testing.assert_close(exp.old_logprobs, exp.ref_logprobs)  # the ratio's old policy is the reference
    assert not torch.equal(plain.ref_logprobs, results["none", None][0].old_logprobs)


def test_entropy_term_enters_the_policy_loss(tmp_path) -> None:
    cfg = replace(CFG, entropy_coef=0.05, entropy_target=0.1, ptx_coef=None)
    t = PPOTrainer(cfg, tiny_setup(), tmp_path)
    exp, _ = make_experience(cfg, t.stack, t.stack, t.rollout(t.setup.train_prompts[:8]), core.RunningMoments())
    mb = exp.minibatches(4, t.rng)[0]
    loss, stats = t.policy_step_loss(mb, exp.prompt_len)
    assert loss.item() == pytest.approx(stats["pg_loss"] + 0.05 * abs(stats["entropy"] - 0.1), rel=1e-5)
    loss.backward()  # the bonus is differentiable: it reaches the policy adapter
    assert all(p.grad is not None for p in t.policy_params)
    plain = PPOTrainer(replace(cfg, entropy_coef=None), tiny_setup(), tmp_path / "plain")
    loss, stats = plain.policy_step_loss(mb, exp.prompt_len)
    assert loss.item() == pytest.approx(stats["pg_loss"]) and "entropy" in stats


def test_first_minibatch_is_on_policy_with_the_papers_sampling(tmp_path, monkeypatch) -> None:
    """At temperature 0.8 and top-p 0.9 the first minibatch's ratio is exactly 1 (the sampler records the
    log-probs the update recomputes), so nothing is clipped."""
    cfg = replace(CFG, temperature=0.8, top_p=0.9, ptx_coef=None)
    t = PPOTrainer(cfg, tiny_setup(), tmp_path)
    calls = []
    real = core.policy_loss

    def spy(logp, old, adv, mask, eps, *mean):
        loss, st = real(logp, old, adv, mask, eps, *mean)
        calls.append((logp.detach(), old, mask.bool(), st["clipfrac"].item()))
        return loss, st

    monkeypatch.setattr(core, "policy_loss", spy)
    t.step()
    logp, old, mask, clipfrac = calls[0]
    torch.testing.assert_close(logp[mask], old[mask], atol=1e-5, rtol=0)
    assert clipfrac == 0.0
    assert any(c[3] > 0 or not torch.allclose(c[0][c[2]], c[1][c[2]], atol=1e-5) for c in calls[1:])  # then off-policy


def test_no_gold_judge_skips_gold_metrics(tmp_path) -> None:
    """Real data (HH-RLHF) has no gold judge: the run logs the RM reward and the monitors only."""
    setup = tiny_setup()
    setup.judge = None
    t = PPOTrainer(replace(CFG, gold_every=1, iterations=1), setup, tmp_path)
    row = t.step()
    assert "gold_score" not in row and "train_gold_score" not in row
    assert "reward" in row and "kl_per_token" in row
    assert t.gold_eval() == {}
