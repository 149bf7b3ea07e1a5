"""The PPO engine around the math: sampling, response-space alignment, one update, the detector, presets."""

from __future__ import annotations

import random
from dataclasses import fields

import pytest
import torch

from rlhf_lite.generation import sample
from rlhf_lite.ppo import core
from rlhf_lite.ppo.config import PRESETS, VANILLA, CollapseBands, PPOConfig, get_preset
from rlhf_lite.ppo.experience import Experience, response_logits, response_values
from rlhf_lite.ppo.monitors import detect_collapse
from tests.conftest import EOS, PAD


def _prompts() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([[PAD, PAD, 5, 6, 7], [8, 9, 10, 11, 12], [PAD, PAD, PAD, 13, 14]])
    return ids, (ids != PAD).long()


def _rollout(stack, seed: int = 0):
    ids, att = _prompts()
    with stack.activate("policy"):
        return sample(stack.base_model, ids, att, max_new_tokens=8, eos_id=EOS, pad_id=PAD,
                      generator=torch.Generator().manual_seed(seed))


def test_sampled_logprobs_equal_full_forward(stack) -> None:
    ro = _rollout(stack)
    P = ro.prompt_len
    with torch.no_grad():
        logits = response_logits(stack, "policy", ro.input_ids, ro.attention_mask, P)
    full = core.logprobs_from_logits(logits, ro.input_ids[:, P:])
    mask = ro.response_mask[:, P:].bool()
    assert mask.sum() > 3
    torch.testing.assert_close(full[mask], ro.logprobs[:, P:][mask], atol=1e-5, rtol=1e-5)
    # a row's response stops at its first EOS and the mask covers exactly up to it
    for row, m in zip(ro.response_ids.tolist(), mask.tolist()):
        n = sum(m)
        assert all(m[:n]) and not any(m[n:])
        if EOS in row:
            assert row.index(EOS) == n - 1


def test_logprobs_do_not_depend_on_padding(stack) -> None:
    ro = _rollout(stack)
    P = ro.prompt_len
    extra = 3  # the same batch with three more pad columns on the left
    ids = torch.cat([torch.full((3, extra), PAD), ro.input_ids], 1)
    att = torch.cat([torch.zeros(3, extra, dtype=torch.long), ro.attention_mask], 1)
    with torch.no_grad():
        a = core.logprobs_from_logits(response_logits(stack, "policy", ro.input_ids, ro.attention_mask, P),
                                      ro.input_ids[:, P:])
        b = core.logprobs_from_logits(response_logits(stack, "policy", ids, att, P + extra), ids[:, P + extra:])
        va = response_values(stack, ro.input_ids, ro.attention_mask, P)
        vb = response_values(stack, ids, att, P + extra)
    m = ro.response_mask[:, P:].bool()
    torch.testing.assert_close(a[m], b[m], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(va[m], vb[m], atol=1e-5, rtol=1e-5)


def test_sampling_is_seeded(stack) -> None:
    assert torch.equal(_rollout(stack, 3).input_ids, _rollout(stack, 3).input_ids)


def test_one_update_lowers_the_surrogate_on_its_batch(stack) -> None:
    ro = _rollout(stack)
    P = ro.prompt_len
    mask = ro.response_mask[:, P:].float()
    adv = torch.randn(mask.shape, generator=torch.Generator().manual_seed(0)) * mask
    old = ro.logprobs[:, P:]
    params = stack.adapter_parameters("policy")
    opt = torch.optim.Adam(params, lr=1e-2)

    def surrogate() -> torch.Tensor:
        logp = core.logprobs_from_logits(response_logits(stack, "policy", ro.input_ids, ro.attention_mask, P),
                                         ro.input_ids[:, P:])
        return core.policy_loss(logp, old, adv, mask, 0.2)[0]

    before = surrogate()
    opt.zero_grad()
    before.backward()
    opt.step()
    with torch.no_grad():
        after = surrogate()
    assert after.item() < before.item() - 1e-4


def test_minibatches_partition_the_buffer() -> None:
    B, N = 8, 3
    t = torch.arange(B * N, dtype=torch.float).reshape(B, N)
    exp = Experience(t.long(), t.long(), 1, t, t, t, t, t, t, t)
    mbs = exp.minibatches(4, random.Random(0))
    assert len(mbs) == 2
    rows = sorted(r.tolist() for mb in mbs for r in mb["mask"])
    assert rows == sorted(r.tolist() for r in t)


def _hist(n: int, **over) -> list[dict]:
    rows = []
    for i in range(1, n + 1):
        r = {"iteration": i, "response_length": 8.0, "kl_per_token": 0.01, "ref_perplexity": 3.0, "reward": 0.0}
        for k, f in over.items():
            r[k] = f(i)
        rows.append(r)
    return rows


def test_collapse_detector_flags_length_and_gold_hacking() -> None:
    bands = CollapseBands()
    assert detect_collapse(_hist(20), bands) is None
    it, reason = detect_collapse(_hist(20, response_length=lambda i: 8.0 if i < 10 else 20.0), bands)
    assert it == 11 and "length" in reason
    hist = _hist(20, reward=lambda i: 0.1 * i,
                 gold_score=lambda i: 0.8 if i <= 5 else 0.8 - 0.05 * (i - 5))
    it, reason = detect_collapse(hist, bands)
    assert "gold" in reason and it > 5


def test_presets_differ_only_in_their_documented_fields() -> None:
    for name, preset in PRESETS.items():
        cfg = preset.config()
        cfg.validate()
        parent = VANILLA if preset.parent == "base" else PRESETS[preset.parent].config()
        changed = {f.name for f in fields(PPOConfig) if getattr(cfg, f.name) != getattr(parent, f.name)}
        assert changed == set(preset.changes), name
    vanilla = get_preset("vanilla")
    assert vanilla.kl_coef is None and vanilla.reward_norm == "none" and vanilla.value_clip is None
    assert vanilla.max_grad_norm is None and vanilla.adv_norm_clip is None
    ppo_max = get_preset("ppo_max")
    assert ppo_max.kl_coef and ppo_max.reward_clip and ppo_max.value_clip and ppo_max.max_grad_norm
    assert ppo_max.reward_norm == "normalize"
    # presets are changes to a profile's own vanilla PPO: its budgets stay, the tricks come on top
    from dataclasses import replace

    base = replace(VANILLA, iterations=7, rollout_batch=8, minibatch_size=4, policy_lr=1e-5)
    on_base = get_preset("ppo_max", base)
    assert (on_base.iterations, on_base.rollout_batch, on_base.policy_lr) == (7, 8, 1e-5)
    assert on_base.kl_coef == ppo_max.kl_coef and on_base.critic_init == "rm"
    assert get_preset("critic_from_sft", base).critic_init == "sft" and get_preset("critic_from_sft", base).kl_coef
    assert ppo_max.critic_init == "rm" and ppo_max.critic_pretrain_iterations > 0 and ppo_max.ptx_coef


@pytest.mark.parametrize("changes, field", [
    ({"policy_lr": -1e-4}, "policy_lr"),
    ({"clip_eps": 0.0}, "clip_eps"),
    ({"rollout_batch": 64, "minibatch_size": 24}, "divisible"),
    ({"reward_clip": 0.0}, "reward_clip"),
    ({"reward_norm": "whiten"}, "reward_norm"),
    ({"temperature": float("nan")}, "temperature must be a finite"),
    ({"critic_init": "bogus"}, "critic_init"),
])
def test_impossible_configs_fail_naming_the_field(changes, field) -> None:
    from dataclasses import replace

    with pytest.raises(ValueError, match=field):
        replace(VANILLA, **changes).validate()
    with pytest.raises(ValueError, match="context length"):
        VANILLA.validate(context_length=16)
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("nope")
