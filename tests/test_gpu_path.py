"""The gpu profile's path, on the CPU: HH-RLHF data into the RM and PPO stages, and the 4-bit stack.

Real HH-RLHF and real models cannot be downloaded here, so the rows are hand-written in the real format
and the "hub model" is a tiny Llama saved to a folder (shared/STACK.md). tests/test_data.py covers the
strict loader; these tests cover what the real-model path adds on top of it.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from rlhf_lite import data, hh
from rlhf_lite.data import ASSISTANT, HUMAN, DataError, PreferencePair
from rlhf_lite.models import LoraSettings, TinyModelConfig, pick_compute_dtype
from rlhf_lite.profiles import (
    COLAB_T4,
    CONSUMER_24GB,
    CPU_SMOKE,
    GIB,
    PROFILES,
    ModelArch,
    count_parameters,
    estimate_memory,
    fits,
    get_profile,
    load_gpu_stack,
    make_optimizer,
    resolve_optimizer,
    save_tiny_llama,
)
from tests.conftest import randomize_adapters

# Real HH-RLHF rows (format of Anthropic/hh-rlhf): multi-turn, a response quoting "Human:", and rows the
# strict loader rejects: a missing final "Assistant:" turn and an empty final response.
P1 = "\n\nHuman: What is a good name for a cat?\n\nAssistant: Luna or Milo.\n\nHuman: Shorter?\n\nAssistant:"
P2 = "\n\nHuman: How do chat logs look?\n\nAssistant:"
GOOD_ROWS = [
    {"chosen": P1 + " How about Max or Pip?", "rejected": P1 + " No."},
    {"chosen": P2 + " Each line starts with Human: or Assistant: and the text.", "rejected": P2 + " Dunno."},
]
BAD_ROWS = [
    {"chosen": P2 + " Fine.\n\nHuman: And then?", "rejected": P2 + " Ok."},  # final turn is Human's
    {"chosen": P2 + " ", "rejected": P2 + " Something."},  # empty final response
]
TINY = TinyModelConfig(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, max_positions=128)


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ----- HH data ----------------------------------------------------------------------------------------
def test_load_hh_pairs_skips_and_counts_rows_the_strict_loader_rejects(tmp_path: Path) -> None:
    path = _write(tmp_path / "train.jsonl", [GOOD_ROWS[0], *BAD_ROWS, GOOD_ROWS[1]])
    with pytest.raises(DataError, match=r"train.jsonl:2: 'chosen': transcript ends with a Human turn"):
        data.load_hh_rlhf(path)  # the strict loader stops at the first bad row ...
    pairs, skipped = hh.load_hh_pairs(tmp_path, split="train")  # ... a real-data run skips it
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
        (P1, " How about Max or Pip?", " No."),
        (P2, " Each line starts with Human: or Assistant: and the text.", " Dunno."),
    ]
    assert skipped == {"ends with a Human turn": 1, "empty response": 1}
    assert hh.load_hh_pairs(path, limit=1)[0] == pairs[:1]


def test_load_hh_pairs_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no usable HH-RLHF rows \(skipped: \{'empty response': 1\}\)"):
        hh.load_hh_pairs(_write(tmp_path / "bad.jsonl", BAD_ROWS[1:]))
    with pytest.raises(FileNotFoundError, match="no test.jsonl"):
        hh.load_hh_pairs(tmp_path, split="test")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        hh.load_hh_pairs("./missing.jsonl")


def test_write_hh_layout_round_trips_through_the_stage_loaders(tmp_path: Path) -> None:
    pairs = hh.load_hh_pairs(_write(tmp_path / "hh.jsonl", GOOD_ROWS))[0]
    paths = hh.write_hh_layout(pairs, pairs[1:], tmp_path / "layout")
    back = data.load_preference_pairs(paths["prefs_train"])
    assert [(p.prompt, p.chosen, p.rejected) for p in back] == [(p.prompt, p.chosen, p.rejected) for p in pairs]
    assert data.load_prompts(paths["prompts_train"]) == [{"prompt": P1}, {"prompt": P2}]
    assert data.load_prompts(paths["prompts_test"]) == [{"prompt": P2}]


def test_hh_messages_and_chat_template() -> None:
    assert hh.hh_messages(P1) == [
        {"role": "user", "content": "What is a good name for a cat?"},
        {"role": "assistant", "content": "Luna or Milo."},
        {"role": "user", "content": "Shorter?"},
    ]
    with pytest.raises(ValueError, match="not an HH prompt"):
        hh.hh_messages(P1 + " Max.")

    class ChatTok:  # the two things model_prompt uses from an instruct model's tokenizer
        chat_template = "..."

        @staticmethod
        def apply_chat_template(msgs, tokenize: bool, add_generation_prompt: bool) -> str:
            assert not tokenize and add_generation_prompt
            return "".join(f"<{m['role']}>{m['content']}</s>" for m in msgs) + "<assistant>"

    assert hh.model_prompt(ChatTok(), P2) == "<user>How do chat logs look?</s><assistant>"
    assert hh.model_response(ChatTok(), " Like this.") == "Like this."
    qwen = "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>user\nShorter?" \
           "<|im_end|>\n<|im_start|>assistant\n"
    assert [hh.last_user_turn(t) for t in (P1, qwen, " plain ")] == ["Shorter?", "Shorter?", "plain"]


@pytest.fixture(scope="module")
def world_tok():
    from rlhf_lite.tokenizer import load_tokenizer
    from rlhf_lite.utils import DATA_DIR

    return load_tokenizer(DATA_DIR / "tokenizer.json")


def test_encode_hh_example_truncates_the_prompt_from_the_left(world_tok) -> None:
    prompt = "\n\nHuman: what is 5 plus 7 ?\n\nAssistant: 12 .\n\nHuman: what is 2 plus 2 ?\n\nAssistant:"
    ids, mask = hh.encode_hh_example(world_tok, prompt, " 4 .", max_len=64)
    full = world_tok(prompt + " 4 .", add_special_tokens=False)["input_ids"] + [world_tok.eos_token_id]
    assert ids == full and mask == [0] * (len(full) - 3) + [1, 1, 1]
    ids, mask = hh.encode_hh_example(world_tok, prompt, " 4 .", max_len=10)
    assert ids == full[-10:] and sum(mask) == 3  # the earliest prompt tokens went, the response stayed
    ids, mask = hh.encode_hh_example(world_tok, prompt, " 4" + " ." * 20, max_len=10)
    assert len(ids) == 10 and sum(mask) == 5 and ids[-1] == world_tok.eos_token_id  # response capped at half


def test_fit_prompt_drops_whole_earlier_turns(world_tok) -> None:
    prompt = "\n\nHuman: what is 5 plus 7 ?\n\nAssistant: 12 .\n\nHuman: what is 2 plus 2 ?\n\nAssistant:"
    n = len(world_tok(prompt, add_special_tokens=False)["input_ids"])
    assert hh.fit_prompt(world_tok, prompt, n) == prompt
    assert hh.fit_prompt(world_tok, prompt, n - 1) == "\n\nHuman: what is 2 plus 2 ?\n\nAssistant:"
    assert hh.fit_prompt(world_tok, prompt, 3) is None
    assert hh.prepare_prompts(world_tok, [prompt, prompt], n - 1) == [prompt[prompt.rindex(HUMAN):]] * 2
    assert prompt.endswith(ASSISTANT)


# ----- profiles and the memory estimate -------------------------------------------------------------
def test_profiles_are_valid_and_sized_as_documented() -> None:
    for p in PROFILES.values():
        p.validate()
        cfg = p.ppo_config()
        cfg.validate()
        assert (cfg.iterations, cfg.rollout_batch, cfg.max_new_tokens) == (p.ppo_iterations, p.rollout_batch,
                                                                           p.max_new_tokens)
        assert cfg.kl_coef and cfg.reward_norm_clip and cfg.critic_init == "rm"  # still PPO-max
    assert get_profile("colab_t4") is COLAB_T4
    with pytest.raises(ValueError, match="choose one of: colab_t4, consumer_24gb, cpu_smoke"):
        get_profile("a100")
    assert COLAB_T4.arch.total_params <= COLAB_T4.max_params <= 2.0e9
    assert 1.5e9 < COLAB_T4.arch.total_params  # Qwen2.5-1.5B: 1.54B
    assert 7.0e9 < CONSUMER_24GB.arch.total_params <= CONSUMER_24GB.max_params  # Qwen2.5-7B: 7.62B
    with pytest.raises(ValueError, match="max_prompt_tokens must be below max_len"):
        replace(COLAB_T4, max_prompt_tokens=COLAB_T4.max_len).validate()


def test_lora_parameter_count_by_hand() -> None:
    arch = ModelArch(hidden_size=8, num_layers=2, intermediate_size=16, num_heads=2, num_kv_heads=1,
                     vocab_size=10, tie_embeddings=True)
    # per layer: q, o 8->8; k, v 8->4; gate, up 8->16; down 16->8; r = 2
    assert arch.lora_params(LoraSettings(r=2)) == 2 * 2 * (16 + 12 + 12 + 16 + 24 + 24 + 24)
    assert arch.lora_params(LoraSettings(r=2, target_modules=("q_proj",))) == 2 * 2 * 16
    with pytest.raises(ValueError, match="not linear layers"):
        arch.lora_params(LoraSettings(target_modules=("qkv",)))


def test_estimate_memory_components_by_hand() -> None:
    est = estimate_memory(COLAB_T4, dtype_bytes=2)
    a = COLAB_T4.arch
    lora = a.lora_params(COLAB_T4.lora)
    assert est["weights_linear_4bit"] == pytest.approx(a.linear_params * (0.5 + 1 / 64 + 4 / (64 * 256)) / GIB)
    assert est["lora_adapters_x3_fp32"] == pytest.approx(3 * lora * 4 / GIB)
    assert est["optimizer_states"] == pytest.approx(2 * lora * 2 / GIB)  # paged 8-bit AdamW on CUDA
    assert est["kv_cache"] > 2 * a.num_layers * 8 * 384 * 256 * 2 / GIB
    assert est["peak_phase"] == "update"
    # the presets' promises (docs/what_fits_where.md): T4 16 GB, consumer card 24 GB
    assert est["total"] * GIB < 15e9 and fits(COLAB_T4, 16)
    assert estimate_memory(CONSUMER_24GB)["total"] * GIB < 22e9 and fits(CONSUMER_24GB, 24)
    # gradient checkpointing and 4-bit are what make it fit
    no_gc = estimate_memory(replace(CONSUMER_24GB, gradient_checkpointing=False))
    assert no_gc["activations_update"] > 5 * estimate_memory(CONSUMER_24GB)["activations_update"]
    assert fits(CONSUMER_24GB, 16) and not fits(replace(CONSUMER_24GB, quantize_4bit=False), 16)
    assert not fits(replace(COLAB_T4, gradient_checkpointing=False), 16)
    assert not fits(replace(CONSUMER_24GB, gradient_checkpointing=False), 24)
    assert resolve_optimizer("auto", "cuda") == "paged_adamw_8bit" and resolve_optimizer("auto", "cpu") == "adam"
    cpu = estimate_memory(COLAB_T4, dtype_bytes=4, device_type="cpu")
    assert "cuda_context" not in cpu and cpu["optimizer_states"] == pytest.approx(4 * est["optimizer_states"])


def test_pick_compute_dtype_t4_is_fp16(monkeypatch: pytest.MonkeyPatch) -> None:
    """A T4 (compute capability 7.5) only *emulates* bf16; torch's is_bf16_supported() counts emulation."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert pick_compute_dtype("cuda") is torch.float16


# ----- the 4-bit stack on the CPU -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def smoke_profile(tmp_path_factory):
    pytest.importorskip("bitsandbytes")
    folder = save_tiny_llama(tmp_path_factory.mktemp("tiny_hub_model"), cfg=TINY)
    return replace(CPU_SMOKE, model_name=str(folder), lora=LoraSettings(r=4, alpha=8))


def test_load_gpu_stack_cpu_forward_backward_generate(smoke_profile, world_tok) -> None:
    import bitsandbytes as bnb

    stack, tok = load_gpu_stack(smoke_profile, device="cpu")
    assert tok.pad_token == "<pad>" and tok.eos_token == "<eos>" and tok.padding_side == "left"
    assert tok("\n\nHuman: hi", add_special_tokens=False)["input_ids"] == \
        world_tok("\n\nHuman: hi", add_special_tokens=False)["input_ids"]
    layers = [m for m in stack.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 7 * TINY.num_layers and all(m.support_avx512bf16_for_cpu is False for m in layers)
    lora = sum(p.numel() for p in stack.base_model.parameters() if p.requires_grad)
    assert count_parameters(stack.base_model) - lora \
        == ModelArch.from_config(stack.base_model.config).total_params
    assert stack.base_model.model.layers[0].gradient_checkpointing
    randomize_adapters(stack)
    prompts = ["\n\nHuman: what is 2 plus 2 ?\n\nAssistant:", "\n\nHuman: hi\n\nAssistant:"]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    ids, att = enc["input_ids"], enc["attention_mask"]
    stack.eval()  # generation and reference logits first: the repack trap of shared/STACK.md
    with torch.no_grad(), stack.activate("policy"):
        out = stack.base_model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape == (2, ids.shape[1] + 4)
    with torch.no_grad():
        ref = stack.logits(None, ids, att)
    stack.train()
    opt = make_optimizer(stack.adapter_parameters("policy"), lr=1e-2, device="cpu")
    assert type(opt) is torch.optim.Adam
    loss = (stack.logits("policy", ids, att) - ref).pow(2).mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in stack.adapter_parameters("policy"))
    assert all(p.grad is None for p in stack.adapter_parameters("critic") + stack.adapter_parameters("reward"))
    opt.step()
    with torch.no_grad():
        assert (stack.logits("policy", ids, att) - ref).pow(2).mean() != loss  # the step changed the policy
    values = stack.values("critic", ids, att)
    assert values.shape == ids.shape
    values.sum().backward()
    assert all(p.grad is not None for p in stack.adapter_parameters("critic"))


def test_gradient_checkpointing_gives_the_same_gradients(smoke_profile) -> None:
    grads = []
    for gc in (True, False):
        stack, _ = load_gpu_stack(replace(smoke_profile, gradient_checkpointing=gc))
        randomize_adapters(stack)
        stack.train()
        ids = torch.tensor([[5, 6, 7, 8, 9, 10], [0, 0, 5, 7, 9, 11]])
        att = (ids != 0).long()
        stack.values("critic", ids, att).pow(2).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in stack.adapter_parameters("critic")]))
    torch.testing.assert_close(grads[0], grads[1])


def test_load_gpu_stack_refuses_a_model_bigger_than_the_profile(smoke_profile) -> None:
    with pytest.raises(ValueError, match=r"more than profile 'cpu_smoke' is sized for"):
        load_gpu_stack(replace(smoke_profile, max_params=1000))


def test_rm_and_ppo_on_hh_rows_end_to_end(smoke_profile, tmp_path: Path) -> None:
    """HH pairs -> RM adapter -> PPO-max through PPOTrainer with no gold judge: every stage runs and logs."""
    pairs = [PreferencePair(f"\n\nHuman: what is {i} plus 2 ?\n\nAssistant:", f" {i + 2} .", " no .")
             for i in range(1, 9)]
    stack, tok = load_gpu_stack(smoke_profile)
    rm_cfg = hh.HHRMConfig.from_profile(smoke_profile, steps=4, batch_size=4, eval_every=2, n_eval_pairs=4)
    summary = hh.train_rm_hh(stack, tok, pairs, pairs[:4], rm_cfg, tmp_path / "rm")
    assert summary["train_pairs"] == 8 and summary["test_pairs"] == 4
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    assert (tmp_path / "rm" / "adapter" / "adapter.pt").exists()
    cfg = smoke_profile.ppo_config(iterations=2, rollout_batch=4, minibatch_size=2, max_new_tokens=4,
                                   critic_pretrain_iterations=1)
    setup = hh.build_hh_setup(stack, tok, smoke_profile, cfg, [p.prompt for p in pairs], [pairs[0].prompt],
                              pairs)
    assert setup.gold_fn is None and len(setup.sft_examples) == 8
    with torch.no_grad():  # PPO-max #4: the critic starts as the RM
        ids = torch.tensor([[5, 6, 7, 8]])
        torch.testing.assert_close(stack.values("critic", ids, torch.ones_like(ids)),
                                   stack.values("reward", ids, torch.ones_like(ids)))
    result = hh.run_ppo_hh(cfg, setup, tmp_path / "ppo")
    rows = [json.loads(line) for line in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows if "reward" in r] == [1, 2]
    assert not any("gold_score" in r or "train_gold_score" in r for r in rows)
    assert result["final_gold_score"] is None and result["iterations"] == 2
    assert [r["policy_updated"] for r in rows if "reward" in r] == [False, True]
