"""bench/gpu_check.py: its dry run (the script's code path on the CPU with tiny shapes) and its offline models."""

from __future__ import annotations

import importlib.util
import json
import math
import warnings
from dataclasses import replace

import pytest
import torch

from rlhf_lite.memory import GIB, QWEN25_1_5B, QWEN25_7B, ModelArch, estimate_memory
from rlhf_lite.profiles import COLAB_T4, CONSUMER_24GB
from rlhf_lite.utils import REPO_ROOT
from tests.conftest import make_stack

_spec = importlib.util.spec_from_file_location("gpu_check", REPO_ROOT / "bench" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)

SHAPE_PARTS = {"colab_t4": COLAB_T4, "fp16_t4": COLAB_T4, "consumer_24gb": CONSUMER_24GB}


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    """One dry run of every part: (exit code, the JSON, the markdown)."""
    out = tmp_path_factory.mktemp("gpu_check")
    with warnings.catch_warnings():  # fp16's first steps overflow at scale 2^16: the trainer skips them, warning
        warnings.filterwarnings("ignore", message=".*non-finite gradient norm.*", category=RuntimeWarning)
        rc = gpu_check.main(["--dry-run", "--out", str(out)])
    return rc, json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text()


def test_dry_run_runs_every_part_without_cuda_figures(dry) -> None:
    rc, report, _ = dry
    assert rc == 0
    assert report["dry_run"] is True and report["iterations"] == 2
    assert {p: r["status"] for p, r in report["parts"].items()} == dict.fromkeys(gpu_check.PARTS, "ok")
    env = report["environment"]
    assert env["device"] == "cpu" and env["gpu"] is None and env["cuda_context_gib"] is None


@pytest.mark.parametrize("part", list(SHAPE_PARTS))
def test_shape_runs_two_metered_iterations_at_full_length(dry, part) -> None:
    r = dry[1]["parts"][part]
    assert [(p["iteration"], p["phase"]) for p in r["phases"]] == [
        (i, ph) for i in (1, 2) for ph in ("rollout", "scoring", "update")]
    assert all(p["peak_allocated_gib"] is None and p["peak_reserved_gib"] is None for p in r["phases"])
    assert r["comparison"] is None and r["paged_optimizer_gib"] is None and r["after_load_allocated_gib"] is None
    # the EOS is masked: every response has max_new_tokens; ptx demonstrations fill prompt + response budget
    assert [it["response_length"] for it in r["iterations"]] == [gpu_check.DRY_PPO["max_new_tokens"]] * 2
    assert r["ptx_tokens"] == gpu_check.DRY_PPO["max_prompt_tokens"] + gpu_check.DRY_PPO["max_new_tokens"]
    assert all(p <= gpu_check.DRY_PPO["max_prompt_tokens"] for p in r["rollout_prompt_tokens"])
    assert len(r["rollout_prompt_tokens"]) == 2
    assert r["finite"] and all(math.isfinite(it[k]) for it in r["iterations"]
                               for k in ("pg_loss", "value_loss", "ptx_loss", "grad_norm"))
    assert r["quantization"] == "nf4" and r["gradient_checkpointing"] and r["lora_dtype"] == "float32"
    assert r["ppo"]["critic_pretrain_iterations"] == 0 and r["ppo"]["ptx_coef"] == 0.5
    assert r["arch"] == gpu_check.asdict(gpu_check.DRY_ARCHS["consumer_24gb" if part == "consumer_24gb" else "colab_t4"])


@pytest.mark.parametrize("part", list(SHAPE_PARTS))
def test_shape_estimates_are_the_profiles(dry, part) -> None:
    r = dry[1]["parts"][part]
    base = SHAPE_PARTS[part]
    budgets = {k: r["ppo"][k] for k in ("rollout_batch", "minibatch_size", "max_new_tokens", "max_prompt_tokens")}
    profile = replace(base, model=replace(base.model, arch=ModelArch(**r["arch"])), ppo=replace(base.ppo, **budgets))
    assert r["estimate"] == pytest.approx(estimate_memory(profile))
    P = max(r["rollout_prompt_tokens"])
    at_measured = estimate_memory(replace(profile, ppo=replace(profile.ppo, max_prompt_tokens=P)),
                                  ptx_tokens=r["ptx_tokens"])
    assert r["estimate_at_measured_lengths"] == pytest.approx(at_measured)
    # by hand: K and V of every layer for the rollout batch in bf16, plus last-position logits (2 + 8 bytes)
    a, N, B = r["arch"], r["ppo"]["max_new_tokens"], r["ppo"]["rollout_batch"]
    head_dim = a["hidden_size"] // a["num_heads"]
    kv = 2 * a["num_layers"] * B * (P + N) * a["num_kv_heads"] * head_dim * 2 + B * a["vocab_size"] * 10
    assert r["estimate_at_measured_lengths"]["kv_cache"] == pytest.approx(kv / GIB)


def test_fp16_path_scales_the_loss(dry) -> None:
    r = dry[1]["parts"]["fp16_t4"]
    assert r["dtype"] == "float16" and r["finite"]
    scale = r["loss_scale"]
    assert scale["initial"] == 2.0**16 and scale["final"] <= scale["initial"]
    # GradScaler halves the scale at each overflow (and grows it only after 2000 good steps), and the trainer
    # skips each overflowing step: the halvings are the skipped steps
    assert math.log2(scale["initial"] / scale["final"]) == r["skipped_updates"]
    u = r["gradient_underflow"]
    assert u["scales"][0] == 1.0 and u["scales"][2] == scale["final"] and u["finite"]
    # powers of two change no rounding: at these shapes the three gradients agree to fp16 noise
    assert u["relative_difference_unscaled"] < 1e-2 and u["relative_difference_middle"] < 1e-2
    assert 0.0 <= u["flushed_fraction_unscaled"] < 1e-3


def test_tiny_pipeline_part_runs_every_stage(dry) -> None:
    r = dry[1]["parts"]["tiny_pipeline"]
    assert set(r["stage_s"]) == {"sft", "rm", "vanilla", "ppo_max"}
    assert {k: v["iterations"] for k, v in r["ppo"].items()} == {"vanilla": 6, "ppo_max": 6}
    assert r["budgets"]["sft"] == gpu_check.TINY_BUDGETS["sft"][1] and r["budgets"]["rm"] == gpu_check.TINY_BUDGETS["rm"][1]
    assert 0.0 <= r["rm_test_accuracy"] <= 1.0 and math.isfinite(r["sft_gold"])


def test_markdown_table_shows_the_json(dry) -> None:
    _, report, md = dry
    assert md.startswith("# GPU check (dry run on the CPU; torch ")
    for part in SHAPE_PARTS:
        r = report["parts"][part]
        est = r["estimate_at_measured_lengths"]
        row = next(line for line in md.splitlines() if line.startswith(f"| {part} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1:3] == ["ok", r["dtype"]]
        assert cells[5:7] == ["n/a", "n/a"] and cells[8] == "n/a"
        assert cells[7] == format(est["persistent"] + est["peak_phase_transient"], ".3g")
    assert f"({report['parts']['fp16_t4']['skipped_updates']} steps skipped on overflow)" in md
    for stage, s in report["parts"]["tiny_pipeline"]["stage_s"].items():
        assert f"| {stage} | {s:.1f} |" in md


def test_unknown_part_is_refused() -> None:
    with pytest.raises(SystemExit):
        gpu_check.main(["--dry-run", "--parts", "colab_t4,nope"])


@pytest.mark.parametrize(("arch", "params"), [(QWEN25_1_5B, 1_543_714_304), (QWEN25_7B, 7_615_616_512)])
def test_offline_qwen_configs_have_the_published_parameter_counts(arch, params) -> None:
    """Qwen2.5-1.5B and -7B as their model cards count them (q/k/v biases included, tied embeddings once)."""
    from transformers import AutoModelForCausalLM

    config = gpu_check.qwen2_config(arch, gpu_check.chatml_tokenizer())
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == params
    assert ModelArch.from_config(config) == arch
    assert config.rope_parameters["rope_theta"] == 1e6 and config.rms_norm_eps == 1e-6


def test_chatml_tokenizer_is_byte_level_with_turn_tokens() -> None:
    tok = gpu_check.chatml_tokenizer()
    text = tok.apply_chat_template([{"role": "user", "content": "hi é"}], tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi é<|im_end|>\n"
                    "<|im_start|>assistant\n")
    ids = tok("hi é", add_special_tokens=False)["input_ids"]
    assert len(ids) == len("hi é".encode()) == 5 and max(ids) < 256
    assert (tok.pad_token_id, tok.eos_token_id, len(tok)) == (256, 258, 259)
    assert tok.decode(ids) == "hi é"


def test_eos_masked_changes_only_the_eos_logit() -> None:
    stack = make_stack()
    ids = torch.tensor([[3, 4, 5, 6]])
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "logits_to_keep": 1}
    with torch.no_grad():
        with stack.causal_lm("policy") as lm:
            plain = lm(**kwargs).logits
        with gpu_check.eos_masked(stack, eos_id=1), stack.causal_lm("policy") as lm:
            masked = lm(**kwargs).logits
    assert masked[..., 1].item() == float("-inf")
    keep = torch.arange(plain.shape[-1]) != 1
    assert torch.equal(masked[..., keep], plain[..., keep])
    assert "causal_lm" not in stack.__dict__  # the instance is restored
