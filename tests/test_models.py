"""The model layer: one base hosting named adapters, in fp32 and in 4-bit on the CPU."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from rlhf_lite.batching import cheapest_cut, length_buckets
from rlhf_lite.loading import guard_bnb_repack, load_causal_lm
from rlhf_lite.models import AdapterStack, LoraSettings, TinyModelConfig, build_tiny_model, read_lora_settings
from tests.conftest import randomize_adapters

LORA = LoraSettings(r=4, alpha=8)
CFG = TinyModelConfig(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, max_positions=64)


def _batch(seed: int = 0, B: int = 3, T: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 50, (B, T), generator=g)
    att = torch.ones_like(ids)
    att[0, :3] = 0  # one left-padded row
    ids[0, :3] = 0
    return ids, att


def _base(seed: int = 0):
    return build_tiny_model(vocab_size=50, pad_id=0, eos_id=1, cfg=CFG, seed=seed)


def test_disabled_adapters_equal_base_logits() -> None:
    base = _base()
    ids, att = _batch()
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = base(input_ids=ids, attention_mask=att, position_ids=pos).logits
    stack = AdapterStack(base, ["policy", "critic"], LORA)
    randomize_adapters(stack)
    with torch.no_grad():
        disabled = stack.logits(None, ids, att)
        policy = stack.logits("policy", ids, att)
    torch.testing.assert_close(disabled, ref)
    assert (policy - ref).abs().max() > 1e-3  # the adapter really changes the model


def test_each_loss_trains_only_its_adapter() -> None:
    stack = AdapterStack(_base(), ["policy", "critic", "reward"], LORA)
    randomize_adapters(stack)
    ids, att = _batch()
    stack.values("critic", ids, att).sum().backward()
    for name in ("policy", "critic", "reward"):
        grads = [p.grad for p in stack.adapter_parameters(name)]
        if name == "critic":
            assert all(g is not None and g.abs().sum() > 0 for g in grads)
        else:
            assert all(g is None for g in grads), name
    assert all(p.grad is None for p in stack.base_model.parameters() if not p.requires_grad)


def test_copy_and_save_adapter_round_trip(tmp_path) -> None:
    stack = AdapterStack(_base(), ["critic", "reward"], LORA)
    randomize_adapters(stack)
    ids, att = _batch()
    stack.copy_adapter("reward", "critic")
    with torch.no_grad():
        torch.testing.assert_close(stack.values("critic", ids, att), stack.values("reward", ids, att))
    stack.save_adapter("reward", tmp_path / "rm")
    other = AdapterStack(_base(), ["reward"], LORA)
    other.load_adapter("reward", tmp_path / "rm")
    with torch.no_grad():
        torch.testing.assert_close(other.values("reward", ids, att), stack.values("reward", ids, att))
    with pytest.raises(ValueError, match="trained with"):
        AdapterStack(_base(), ["reward"], LoraSettings(r=8)).load_adapter("reward", tmp_path / "rm")
    # peft's own format: the config names our settings, and a folder without one is named in the error
    assert read_lora_settings(tmp_path / "rm") == LORA
    assert sorted(p.name for p in (tmp_path / "rm").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "head.safetensors"]
    with pytest.raises(FileNotFoundError, match="holds no adapter"):
        other.load_adapter("reward", tmp_path)


def test_left_padding_does_not_change_outputs() -> None:
    stack = AdapterStack(_base(), ["policy"], LORA)
    randomize_adapters(stack)
    ids = torch.randint(3, 50, (1, 8))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], 1)
    att = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 8, dtype=torch.long)], 1)
    with torch.no_grad():
        plain = stack.logits("policy", ids, torch.ones_like(ids))
        left = stack.logits("policy", padded, att)[:, 4:]
    torch.testing.assert_close(left, plain, atol=1e-5, rtol=1e-4)


def test_length_buckets_group_by_span_and_trim_padding() -> None:
    att = torch.zeros(5, 10, dtype=torch.long)
    for row, (lo, hi) in enumerate([(0, 9), (0, 3), (2, 10), (0, 4), (5, 8)]):
        att[row, lo:hi] = 1
    # spans 9, 3, 8, 4, 3 -> stable order by span: rows 1, 4, 3, 2, 0
    buckets = length_buckets(att, rows_per_bucket=2)
    assert [b[0].tolist() for b in buckets] == [[1, 4], [3, 2], [0]]
    assert [(b[1], b[2]) for b in buckets] == [(0, 8), (0, 10), (0, 9)]
    (rows, lo, hi), = length_buckets(att[[1, 3]], rows_per_bucket=None)  # one bucket, still trimmed
    assert rows.tolist() == [0, 1] and (lo, hi) == (0, 4)


def test_cheapest_cut_is_exact_and_splits_off_long_rows() -> None:
    """The cost-based cut equals a brute force over every cut of the sorted rows, and pays for itself."""
    rng = np.random.default_rng(0)
    for trial in range(40):
        B = int(rng.integers(1, 8))
        first = rng.integers(0, 6, B)
        last = first + rng.integers(0, 12, B)
        overhead, cap = int(rng.integers(0, 20)), [None, 2, 3][trial % 3]

        def cost(ends: list[int], first=first, last=last, overhead=overhead) -> int:
            return sum(overhead + (e - s) * (last[s:e].max() - first[s:e].min() + 1)
                       for s, e in zip([0, *ends[:-1]], ends))

        cuts = [[*c, B] for k in range(B) for c in itertools.combinations(range(1, B), k)]
        cuts = [c for c in cuts if cap is None or all(e - s <= cap for s, e in zip([0, *c[:-1]], c))]
        assert cost(cheapest_cut(first, last, overhead, cap)) == min(cost(c) for c in cuts)
    # A minibatch of short rows and one long one: the long row goes alone, the short ones together.
    att = torch.zeros(8, 60, dtype=torch.long)
    att[:7, 20:40] = 1
    att[7, :] = 1
    buckets = length_buckets(att, overhead=64)
    assert [(b[0].tolist(), b[1], b[2]) for b in buckets] == [(list(range(7)), 20, 40), ([7], 0, 60)]
    assert len(length_buckets(att, overhead=10_000)) == 1  # a pass costing more than the padding: one bucket


def test_bucketed_forward_equals_one_padded_pass() -> None:
    """Length buckets change the cost of a pass, not its values or gradients at real tokens."""
    stack = AdapterStack(_base(), ["critic"], LORA)
    randomize_adapters(stack)
    stack.double()  # float64, so that any difference is a real one rather than summation order
    g = torch.Generator().manual_seed(3)
    B, T = 9, 14
    ids = torch.randint(3, 50, (B, T), generator=g)
    att = torch.zeros(B, T, dtype=torch.long)
    for row in range(B):  # mixed left and right padding, as in PPO rollouts
        lo = int(torch.randint(0, 4, (1,), generator=g))
        hi = int(torch.randint(lo + 2, T + 1, (1,), generator=g))
        att[row, lo:hi] = 1
    results = []
    for rows, overhead in [(None, None), (2, None), (None, 0), (None, 64), (3, 4)]:  # the first: one pass
        stack.bucket_rows, stack.bucket_overhead = rows, overhead
        stack.zero_grad()
        values = stack.values("critic", ids, att)
        (values * att).sum().backward()
        grads = [p.grad.clone() for p in stack.adapter_parameters("critic")]
        results.append((values * att, grads))
    for values, grads in results[1:]:
        torch.testing.assert_close(values, results[0][0], atol=1e-10, rtol=1e-9)
        for a, b in zip(grads, results[0][1]):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)


def test_merged_inference_equals_adapter_pass_and_restores_the_base() -> None:
    stack = AdapterStack(_base(), ["policy", "critic"], LORA)
    randomize_adapters(stack)
    ids, att = _batch(B=4, T=9)
    weights = {n: p for n, p in stack.peft.named_parameters() if "base_layer" in n}
    before = {n: p.detach().clone() for n, p in weights.items()}
    stack.merge_adapters = False
    with torch.no_grad():
        plain = stack.values("critic", ids, att), stack.logits("policy", ids, att)
    stack.merge_adapters = True
    with torch.no_grad():
        merged = stack.values("critic", ids, att), stack.logits("policy", ids, att)
        with stack.causal_lm("policy") as policy:  # the context the sampler runs in
            direct = policy(input_ids=ids, attention_mask=att).logits
            with stack.causal_lm("policy") as again:  # nested: the inner exit keeps the outer's merge
                assert again is policy
            torch.testing.assert_close(policy(input_ids=ids, attention_mask=att).logits, direct)
        with stack.causal_lm(None) as reference:
            torch.testing.assert_close(reference(input_ids=ids, attention_mask=att).logits,
                                       stack.logits(None, ids, att))
    torch.testing.assert_close(merged[0], plain[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(merged[1], plain[1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(direct, stack.logits("policy", ids, att).detach(), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(plain[1], stack.logits(None, ids, att).detach(), atol=1e-3)  # the adapter matters
    after = {n: p for n, p in stack.peft.named_parameters() if "base_layer" in n}
    assert all(after[n] is weights[n] and torch.equal(after[n], before[n]) for n in weights)  # bit-exact base
    # The views share every tensor with the base: no parameter is copied.
    base_tensors = {p.data_ptr() for p in stack.parameters()}
    with torch.no_grad(), stack.causal_lm("critic") as critic:
        assert {p.data_ptr() for p in critic.parameters()} <= base_tensors


def test_merged_training_pass_gives_peft_gradients() -> None:
    """With gradients on, adapters run as W + s B A inside autograd: same values and gradients as peft's
    layer-by-layer LoRA, for every adapter, also after a reference pass (peft's disable_adapter)."""
    stack = AdapterStack(_base(), ["policy", "critic"], LORA)
    randomize_adapters(stack)
    stack.double()
    ids, att = _batch(B=4, T=9)
    results = {}
    for merge in (False, True):
        stack.merge_adapters = merge
        stack.zero_grad(set_to_none=True)
        with torch.no_grad():
            stack.logits(None, ids, att)  # a reference pass in between must not switch gradients off
        loss = stack.logits("policy", ids, att).pow(2).mean() + stack.values("critic", ids, att).sum()
        loss.backward()
        results[merge] = loss.detach(), {n: p.grad.clone() for n, p in stack.named_parameters() if p.grad is not None}
    torch.testing.assert_close(results[True][0], results[False][0])
    assert results[True][1].keys() == results[False][1].keys()
    assert len(results[True][1]) == len(stack.adapter_parameters("policy")) + len(stack.adapter_parameters("critic"))
    for n, g in results[False][1].items():
        torch.testing.assert_close(results[True][1][n], g, msg=n)


@pytest.fixture(scope="module")
def four_bit_dir(tmp_path_factory):
    pytest.importorskip("bitsandbytes")
    path = tmp_path_factory.mktemp("tiny4bit")
    _base().save_pretrained(path)
    return path


def test_four_bit_lora_two_adapters_forward_backward_generate(four_bit_dir) -> None:
    import bitsandbytes as bnb

    base = load_causal_lm(four_bit_dir, "nf4", torch.float32)
    layers = [m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers, "the base was not quantized"
    assert all(m.support_avx512bf16_for_cpu is False for m in layers)  # the repack trap is guarded
    stack = AdapterStack(base, ["policy", "critic"], LORA)
    randomize_adapters(stack)
    ids, att = _batch()
    # The trap: an eval-mode, no-grad forward (like generation or reference logits) first...
    stack.eval()
    with torch.no_grad():
        ref = stack.logits(None, ids, att)
        out = stack.base_model.generate(input_ids=ids[1:], attention_mask=att[1:], max_new_tokens=4,
                                        do_sample=False, pad_token_id=0)
    assert out.shape == (2, 14)
    stack.train()
    # ... then backward: every policy LoRA matrix must still get a gradient, and no critic one.
    logits = stack.logits("policy", ids, att)
    (logits - ref).pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in stack.adapter_parameters("policy"))
    assert all(p.grad is None for p in stack.adapter_parameters("critic"))
    stack.values("critic", ids, att).sum().backward()
    assert all(p.grad is not None for p in stack.adapter_parameters("critic"))
    # A 4-bit base cannot hold merged weights: no-grad adapter passes run unmerged there.
    assert not stack.mergeable()
    with torch.no_grad():
        torch.testing.assert_close(stack.logits("policy", ids, att), logits.detach())


def test_four_bit_disabled_adapters_equal_four_bit_base(four_bit_dir) -> None:
    base = load_causal_lm(four_bit_dir, "nf4", torch.float32)
    ids, att = _batch()
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = base(input_ids=ids, attention_mask=att, position_ids=pos).logits
    stack = AdapterStack(base, ["policy", "reward"], LORA)
    randomize_adapters(stack)
    with torch.no_grad():
        torch.testing.assert_close(stack.logits(None, ids, att), ref)


def test_guard_counts_only_four_bit_layers() -> None:
    assert guard_bnb_repack(_base()) == 0
