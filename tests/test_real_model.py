"""One code path for every model: profiles, loading, HH-RLHF data, chat formatting, and the CLI on a model folder.

No real model or dataset can be downloaded here, so the "hub model" is a tiny Llama saved to a folder with a
ChatML chat template (as SmolLM2 and Qwen have), loaded in 4-bit NF4 on the CPU, and HH-RLHF rows are
hand-written in the real format.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from rlhf_lite import cli, data
from rlhf_lite.data import ASSISTANT, HUMAN, DataError
from rlhf_lite.hh_rlhf import import_hh, load_hh_rlhf
from rlhf_lite.loading import ModelSpec, load_base, make_optimizer, pick_compute_dtype, resolve_optimizer
from rlhf_lite.memory import GIB, ModelArch, estimate_memory, fits
from rlhf_lite.models import AdapterStack, LoraSettings
from rlhf_lite.profiles import COLAB_T4, CONSUMER_24GB, PROFILES, TINY, get_profile, with_model
from rlhf_lite.settings import SettingError
from rlhf_lite.text import Prompt, format_prompts, hh_messages, last_user_turn, model_prompt, model_response
from tests.conftest import randomize_adapters, save_chat_llama

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


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ----- HH-RLHF into the data layout -------------------------------------------------------------------
def test_hh_loader_strict_and_skip_and_count(tmp_path: Path) -> None:
    path = _write(tmp_path / "train.jsonl", [GOOD_ROWS[0], *BAD_ROWS, GOOD_ROWS[1]])
    with pytest.raises(DataError, match=r"train.jsonl:2: 'chosen': transcript ends with a Human turn"):
        load_hh_rlhf(path)  # the strict loader stops at the first bad row ...
    pairs, skipped = load_hh_rlhf(tmp_path, split="train", strict=False)  # ... a real-data import skips it
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
        (P1, " How about Max or Pip?", " No."),
        (P2, " Each line starts with Human: or Assistant: and the text.", " Dunno."),
    ]
    assert skipped == {"ends with a Human turn": 1, "empty response": 1}
    assert load_hh_rlhf(path, limit=1, strict=False)[0] == pairs[:1]
    with pytest.raises(DataError, match=r"no usable HH-RLHF rows \(skipped: \{'empty response': 1\}\)"):
        load_hh_rlhf(_write(tmp_path / "bad.jsonl", BAD_ROWS[1:]), strict=False)
    with pytest.raises(FileNotFoundError, match="no test.jsonl"):
        load_hh_rlhf(tmp_path, split="test", strict=False)


def test_import_hh_writes_the_layout_every_stage_reads(tmp_path: Path) -> None:
    src = tmp_path / "hh"
    src.mkdir()
    _write(src / "train.jsonl", [GOOD_ROWS[0], BAD_ROWS[0], GOOD_ROWS[1]])
    _write(src / "test.jsonl", GOOD_ROWS[1:])
    counts = import_hh(src, tmp_path / "layout")
    assert counts == {"train_pairs": 2, "test_pairs": 1, "skipped_train": {"ends with a Human turn": 1},
                      "skipped_test": {}}
    out = tmp_path / "layout"
    back = data.load_preference_pairs(out / "prefs_train.jsonl")
    assert [(p.prompt, p.chosen) for p in back] == [(P1, " How about Max or Pip?"),
                                                    (P2, " Each line starts with Human: or Assistant: and the text.")]
    assert data.load_prompts(out / "prompts_train.jsonl") == [{"prompt": P1}, {"prompt": P2}]
    assert data.load_prompts(out / "prompts_test.jsonl") == [{"prompt": P2}]
    assert data.load_sft(out / "sft.jsonl")[0] == {"prompt": P1, "response": " How about Max or Pip?"}
    assert data.data_kind(out) == "hh-rlhf" and data.data_kind(Path(__file__).parents[1] / "data") == "world"
    code = cli.main(["data", "--hh", str(src), "--out", str(tmp_path / "cli"), "--train-limit", "1"])
    assert code is None and len(data.load_sft(tmp_path / "cli" / "sft.jsonl")) == 1


# ----- text: one module for the HH format and chat templates -------------------------------------------
def test_hh_messages_and_chat_template(tmp_path: Path) -> None:
    assert hh_messages(P1) == [
        {"role": "user", "content": "What is a good name for a cat?"},
        {"role": "assistant", "content": "Luna or Milo."},
        {"role": "user", "content": "Shorter?"},
    ]
    with pytest.raises(ValueError, match="not an HH prompt"):
        hh_messages(P1 + " Max.")
    _, tok = save_chat_llama(tmp_path / "chat")
    text = model_prompt(tok, P2)
    assert text == "<|im_start|>system You are a helpful assistant. <|im_end|> <|im_start|>user How do chat logs " \
                   "look? <|im_end|> <|im_start|>assistant"
    assert model_prompt(tok, P2, system_prompt=False).startswith("<|im_start|>system  <|im_end|>")
    assert model_response(tok, " Like this.") == "Like this." and model_response(object(), " x") == " x"
    qwen = "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>user\nShorter?" \
           "<|im_end|>\n<|im_start|>assistant\n"
    assert [last_user_turn(t) for t in (P1, qwen, " plain ")] == ["Shorter?", "Shorter?", "plain"]


def test_format_prompts_drops_whole_earlier_turns(world_tok) -> None:
    prompt = "\n\nHuman: what is 5 plus 7 ?\n\nAssistant: 12 .\n\nHuman: what is 2 plus 2 ?\n\nAssistant:"
    n = len(world_tok(prompt, add_special_tokens=False)["input_ids"])
    assert format_prompts(world_tok, [prompt], n) == ([Prompt(prompt, prompt)], 0)
    kept, dropped = format_prompts(world_tok, [prompt, prompt], n - 1)
    assert dropped == 0 and [p.text for p in kept] == [prompt[prompt.rindex(HUMAN):]] * 2
    assert all(p.raw == prompt for p in kept)  # the judge still reads the whole conversation
    assert format_prompts(world_tok, [prompt], 3) == ([], 1)
    assert prompt.endswith(ASSISTANT)


def test_encoding_truncates_the_prompt_from_the_left(world_tok) -> None:
    from rlhf_lite.text import encode_pair_texts

    prompt = "\n\nHuman: what is 5 plus 7 ?\n\nAssistant: 12 .\n\nHuman: what is 2 plus 2 ?\n\nAssistant:"
    full = world_tok(prompt + " 4 .", add_special_tokens=False)["input_ids"] + [world_tok.eos_token_id]
    assert encode_pair_texts(world_tok, [prompt], [" 4 ."], 64) == [(full, [0] * (len(full) - 3) + [1, 1, 1])]
    with pytest.raises(ValueError, match="exceeds the limit of 10"):
        encode_pair_texts(world_tok, [prompt], [" 4 ."], 10)
    [(ids, mask)] = encode_pair_texts(world_tok, [prompt], [" 4 ."], 10, truncate=True)
    assert ids == full[-10:] and sum(mask) == 3  # the earliest prompt tokens went, the response stayed
    [(ids, mask)] = encode_pair_texts(world_tok, [prompt], [" 4" + " ." * 20], 10, truncate=True)
    assert len(ids) == 10 and sum(mask) == 5 and ids[-1] == world_tok.eos_token_id  # response capped at half


# ----- profiles and the memory estimate -----------------------------------------------------------------
def test_profiles_compose_and_validate() -> None:
    assert list(PROFILES) == ["tiny", "smol", "colab_t4", "consumer_24gb"]
    for p in PROFILES.values():
        p.validate()
        cfg = p.ppo_config("ppo_max")
        assert (cfg.iterations, cfg.rollout_batch, cfg.max_new_tokens) == (p.ppo.iterations, p.ppo.rollout_batch,
                                                                           p.ppo.max_new_tokens)
        assert cfg.kl_coef and cfg.reward_norm == "normalize" and cfg.critic_init == "rm"  # PPO-max on its budgets
    assert get_profile("colab_t4") is COLAB_T4
    with pytest.raises(ValueError, match="choose one of: tiny, smol, colab_t4, consumer_24gb"):
        get_profile("a100")
    assert 1.5e9 < COLAB_T4.model.arch.total_params <= COLAB_T4.model.max_params  # Qwen2.5-1.5B: 1.54B
    assert 7.0e9 < CONSUMER_24GB.model.arch.total_params <= CONSUMER_24GB.model.max_params  # Qwen2.5-7B: 7.62B
    with pytest.raises(SettingError, match="max_prompt_tokens must be set for a pretrained model"):
        replace(COLAB_T4, ppo=replace(COLAB_T4.ppo, max_prompt_tokens=None)).validate()
    with pytest.raises(SettingError, match="ModelSpec.quantization must be 'none' for the tiny model"):
        replace(TINY.model, quantization="nf4").validate()
    moved = with_model(TINY, "some/folder")
    assert moved.model.source == "some/folder" and moved.sft.pretrain_steps == 0 and moved.model.arch is None
    assert with_model(COLAB_T4, "x").sft == COLAB_T4.sft and with_model(TINY, None) is TINY


def test_lora_parameter_count_by_hand() -> None:
    arch = ModelArch(hidden_size=8, num_layers=2, intermediate_size=16, num_heads=2, num_kv_heads=1,
                     vocab_size=10, tie_embeddings=True)
    # per layer: q, o 8->8; k, v 8->4; gate, up 8->16; down 16->8; r = 2
    assert arch.lora_params(LoraSettings(r=2)) == 2 * 2 * (16 + 12 + 12 + 16 + 24 + 24 + 24)
    assert arch.lora_params(LoraSettings(r=2, target_modules=("q_proj",))) == 2 * 2 * 16
    with pytest.raises(ValueError, match="not linear layers"):
        arch.lora_params(LoraSettings(target_modules=("qkv",)))


def test_estimate_memory_of_a_small_profile_by_hand() -> None:
    """Every component of a 2-layer model's estimate, worked out by hand (not with the estimate's formula)."""
    arch = ModelArch(hidden_size=8, num_layers=2, intermediate_size=16, num_heads=2, num_kv_heads=1,
                     vocab_size=10, tie_embeddings=True)
    from rlhf_lite.ppo.config import PPOConfig
    from rlhf_lite.profiles import Profile

    p = Profile("hand", "", ModelSpec(source="x", quantization="nf4", gradient_checkpointing=False, arch=arch),
                LoraSettings(r=2), ppo=PPOConfig(rollout_batch=2, minibatch_size=1, max_new_tokens=3,
                                                 max_prompt_tokens=5))
    est = {k: v * GIB if isinstance(v, float) else v for k, v in estimate_memory(p, 2, "cuda").items()}
    # linear weights: 2 layers x (64+32+32+64+128+128+128) = 1152 weights, 4-bit with double quantization
    assert est["weights_linear_4bit"] == pytest.approx(1152 * (0.5 + 1 / 64 + 4 / 16384))
    # embedding (tied) 80 + norms (2*2+1)*8 = 40 -> 120 parameters in bf16
    assert est["weights_embedding_lm_head"] == pytest.approx(240)
    assert est["lora_adapters_x3_fp32"] == pytest.approx(3 * 512 * 4)  # lora = 512 params, see above
    assert est["optimizer_states"] == pytest.approx(2 * 512 * 2)  # 8-bit paged AdamW on CUDA
    # rollout: K and V of 2 layers, 2 rows, 8 positions, 1 kv head of 4 dims, bf16; last logits 2 x 10 x 10 B
    assert est["kv_cache"] == pytest.approx(2 * 2 * 2 * 8 * 4 * 2 + 2 * 10 * 10)
    # one block keeps (7*8 + 3*4 + 4*16) * 2 B + fp32 copies (8*8 + 16) * 4 B = 264 + 320 = 584 B per token
    assert est["activations_scoring"] == pytest.approx(2 * 8 * 584)
    # update: 1 row x (8 + 8 ptx tokens), every block stored (no checkpointing)
    assert est["activations_update"] == pytest.approx(2 * 16 * 584)
    assert est["logits_update"] == pytest.approx(1 * (3 + 8) * 10 * 14)
    assert est["peak_phase"] == "update"
    persistent = sum(est[k] for k in ("weights_linear_4bit", "weights_embedding_lm_head", "lora_adapters_x3_fp32",
                                      "lora_grads_policy_critic", "optimizer_states", "heads"))
    assert est["total"] == pytest.approx((persistent + 2 * 16 * 584 + 1540) * 1.1 + 0.5e9)


def test_the_presets_fit_their_cards() -> None:
    est = estimate_memory(COLAB_T4, dtype_bytes=2)
    assert est["total"] * GIB < 15e9 and fits(COLAB_T4, 16)
    assert estimate_memory(CONSUMER_24GB)["total"] * GIB < 22e9 and fits(CONSUMER_24GB, 24)
    no_gc = replace(CONSUMER_24GB, model=replace(CONSUMER_24GB.model, gradient_checkpointing=False))
    assert estimate_memory(no_gc)["activations_update"] > 5 * estimate_memory(CONSUMER_24GB)["activations_update"]
    assert not fits(no_gc, 24)
    assert not fits(replace(CONSUMER_24GB, model=replace(CONSUMER_24GB.model, quantization="none")), 16)
    assert resolve_optimizer("auto", "cuda") == "paged_adamw_8bit" and resolve_optimizer("auto", "cpu") == "adam"
    cpu = estimate_memory(COLAB_T4, dtype_bytes=4, device_type="cpu")
    assert "cuda_context" not in cpu and cpu["optimizer_states"] == pytest.approx(4 * est["optimizer_states"])


def test_pick_compute_dtype_t4_is_fp16(monkeypatch: pytest.MonkeyPatch) -> None:
    """A T4 (compute capability 7.5) only *emulates* bf16; torch's is_bf16_supported() counts emulation."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert pick_compute_dtype("cuda") is torch.float16


# ----- the 4-bit base on the CPU --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    pytest.importorskip("bitsandbytes")
    return save_chat_llama(tmp_path_factory.mktemp("hub_model"))


NF4 = ModelSpec(source="x", quantization="nf4", device="cpu", gradient_checkpointing=True)


def test_nf4_base_forward_backward_generate(chat_model) -> None:
    import bitsandbytes as bnb

    folder, tok = chat_model
    base = load_base(NF4, folder)
    layers = [m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 7 * 2 and all(m.support_avx512bf16_for_cpu is False for m in layers)  # guarded
    stack = AdapterStack(base, ["policy", "critic", "reward"], LoraSettings(r=4, alpha=8))
    randomize_adapters(stack)
    enc = tok([model_prompt(tok, P2), model_prompt(tok, P1)], return_tensors="pt", padding=True,
              add_special_tokens=False)
    ids, att = enc["input_ids"], enc["attention_mask"]
    stack.eval()  # generation and reference logits first: the repack trap
    with torch.no_grad(), stack.causal_lm("policy") as policy:
        out = policy.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
        ref = stack.logits(None, ids, att)
    assert out.shape == (2, ids.shape[1] + 4)
    stack.train()
    opt = make_optimizer(stack.adapter_parameters("policy"), lr=1e-2)
    loss = (stack.logits("policy", ids, att) - ref).pow(2).mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in stack.adapter_parameters("policy"))
    assert all(p.grad is None for p in stack.adapter_parameters("critic") + stack.adapter_parameters("reward"))
    opt.step()
    with torch.no_grad():
        assert (stack.logits("policy", ids, att) - ref).pow(2).mean() != loss  # the step changed the policy


def test_gradient_checkpointing_gives_the_same_gradients(chat_model) -> None:
    grads = []
    for gc in (True, False):
        stack = AdapterStack(load_base(replace(NF4, gradient_checkpointing=gc), chat_model[0]), ["critic"],
                             LoraSettings(r=4, alpha=8))
        randomize_adapters(stack)
        stack.train()
        ids = torch.tensor([[5, 6, 7, 8, 9, 10], [0, 0, 5, 7, 9, 11]])
        stack.values("critic", ids, (ids != 0).long()).pow(2).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in stack.adapter_parameters("critic")]))
    torch.testing.assert_close(grads[0], grads[1])


def test_a_model_bigger_than_the_profile_is_refused(chat_model) -> None:
    with pytest.raises(ValueError, match=r"more than the profile is sized for \(0\.00B, ModelSpec.max_params\)"):
        load_base(replace(NF4, max_params=1000), chat_model[0])


# ----- the same CLI on a model folder --------------------------------------------------------------------
TEST_BUDGET = [
    "--sft.sft-steps", "4", "--sft.batch-size", "4", "--sft.eval-every", "4", "--sft.n-eval-prompts", "8",
    "--sft.max-new-tokens", "6", "--rm.steps", "3", "--rm.batch-size", "4", "--rm.eval-every", "3",
    "--rm.n-eval-pairs", "8", "--rm.n-fresh-prompts", "4", "--rm.max-new-tokens", "6",
    "--ppo.iterations", "2", "--ppo.rollout-batch", "4", "--ppo.minibatch-size", "2", "--ppo.max-new-tokens", "6",
    "--ppo.max-prompt-tokens", "64", "--ppo.critic-pretrain-iterations", "1", "--ppo.gold-every", "2",
    "--lora.r", "4", "--lora.alpha", "8", "--model.device", "cpu",
]


def test_pipeline_on_a_4bit_model_folder_writes_every_artifact(chat_model, small_world, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder = chat_model[0]
    out = tmp_path / "run"
    cli.main(["pipeline", "--profile", "colab_t4", "--model", str(folder), "--model.quantization", "nf4",
              "--data", str(small_world), "--out", str(out), *TEST_BUDGET])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["profile"] == "colab_t4" and summary["sft"]["base_source"] == str(folder)
    for stage in ("sft", "rm", "vanilla", "ppo_max"):
        assert (out / stage / "summary.json").is_file() and (out / stage / "metrics.jsonl").is_file()
    assert (out / "sft" / "model" / "config.json").is_file() and (out / "sft" / "sft_adapter").is_dir()
    assert sorted(p.name for p in (out / "rm" / "reward").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "head.safetensors"]
    for run in ("vanilla", "ppo_max"):
        s = summary[run]
        assert s["iterations"] == 2 and s["final_gold_score"] is not None  # the world's judge, on chat text
        assert (out / run / "policy" / "adapter_model.safetensors").is_file() and (out / run / "critic").is_dir()
    assert summary["ppo_max"]["config"]["kl_coef"] == 0.2 and summary["vanilla"]["config"]["kl_coef"] is None
    assert "gold_agreement" in summary["rm"] and (out / "report.md").is_file()
    # the merged SFT model is a plain model folder, and the policy a plain peft adapter on it
    base = AutoModelForCausalLM.from_pretrained(out / "sft" / "model")
    PeftModel.from_pretrained(base, str(out / "ppo_max" / "policy"))


def test_ppo_help_lists_every_config_field(capsys) -> None:
    from dataclasses import fields

    from rlhf_lite.ppo.config import CollapseBands, PPOConfig
    from rlhf_lite.settings import field_docs

    with pytest.raises(SystemExit):
        cli.main(["ppo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f in fields(PPOConfig):
        if f.name in ("seed", "collapse"):
            continue
        assert f"--{f.name.replace('_', '-')}" in text, f.name
        assert " ".join(field_docs(PPOConfig)[f.name].split()[:4]) in text, f.name
    for f in fields(CollapseBands):
        assert f"--collapse.{f.name.replace('_', '-')}" in text
    assert "--seed" in text and "--model.quantization" in text and "--lora.r" in text
