"""The dpo, grpo and bon commands end to end: on the tiny profile, and on a ChatML model folder with the smol
profile (the tiny Llama of conftest, saved as a hub model folder), at test budgets."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from rlhf_lite import cli
from rlhf_lite.beyond.bon import bon_kl
from rlhf_lite.models import AdapterStack, LoraSettings, TinyModelConfig, build_tiny_model
from rlhf_lite.stage import model_fingerprint
from rlhf_lite.utils import read_json, read_metrics, write_json
from tests.conftest import randomize_adapters, save_chat_llama

LORA = ["--lora.r", "4", "--lora.alpha", "8", "--model.device", "cpu"]
MODEL = TinyModelConfig(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, max_positions=128)
DPO = ["--steps", "3", "--batch-size", "4", "--eval-every", "3", "--max-new-tokens", "6"]
GRPO = ["--iterations", "2", "--prompts-per-iteration", "2", "--group-size", "2", "--minibatch-size", "2",
        "--max-new-tokens", "6", "--gold-every", "2"]
BON = ["--n-max", "4", "--ns", "(1, 2, 4)", "--n-test-prompts", "8", "--max-new-tokens", "6"]


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory) -> tuple[Path, Path]:
    """A random tiny SFT model with the world's tokenizer, and a random reward adapter on it (as the stages
    write them)."""
    from rlhf_lite.tokenizer import load_tokenizer
    from rlhf_lite.utils import DATA_DIR

    root = tmp_path_factory.mktemp("tiny")
    tok = load_tokenizer(DATA_DIR / "tokenizer.json")
    build_tiny_model(len(tok), tok.pad_token_id, tok.eos_token_id, MODEL, 0).save_pretrained(root / "sft" / "model")
    tok.save_pretrained(root / "sft" / "model")
    stack = AdapterStack(build_tiny_model(len(tok), tok.pad_token_id, tok.eos_token_id, MODEL, 0), ["reward"],
                         LoraSettings(r=4, alpha=8))
    randomize_adapters(stack, head_scale=0.3)
    stack.save_adapter("reward", root / "rm" / "reward")
    write_json(root / "rm" / "summary.json", {"provenance": {"sft_model": model_fingerprint(root / "sft" / "model")}})
    return root / "sft", root / "rm"


def _run(command: str, sft: Path, rm: Path | None, data: Path, out: Path, *flags: str) -> dict:
    cli.main([command, "--sft", str(sft), *(["--rm", str(rm)] if rm else []), "--data", str(data), "--out", str(out),
              *LORA, *flags])
    return read_json(out / "summary.json")


def test_dpo_on_the_tiny_profile_and_its_export(tiny_folders, small_world, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    sft, rm = tiny_folders
    s = _run("dpo", sft, rm, small_world, tmp_path / "dpo", *DPO)
    rows = read_metrics(tmp_path / "dpo" / "metrics.jsonl")
    # the policy starts as the reference (LoRA B = 0): every implicit reward is 0 and the loss is log 2
    assert rows[1]["step"] == 1 and rows[1]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[1]["reward_accuracy"] == 0.0 and rows[1]["margin"] == 0.0
    assert abs(rows[0]["eval_kl_per_sequence"]) < 1e-4 and rows[0]["iteration"] == 0
    assert [r["step"] for r in rows if "gold_score" in r] == [0, 3]
    assert s["stage"] == "dpo" and s["steps"] == 3 and s["config"]["batch_size"] == 4
    assert s["provenance"]["policy_base"] == str((sft / "model").resolve()) and "rm" in s["provenance"]
    assert s["final_gold_score"] == rows[-1]["gold_score"] and s["initial_reward"] == rows[0]["eval_reward"]
    cli.main(["export", "--run", str(tmp_path / "dpo"), "--out", str(tmp_path / "hf")])
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sft / "model"), str(tmp_path / "dpo" / "policy"))
        exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
        torch.testing.assert_close(exported(ids).logits, peft(ids).logits, atol=1e-5, rtol=1e-5)
    assert (tmp_path / "dpo" / "dpo_monitors.png").is_file()
    from rlhf_lite.beyond import sweep

    stored = sweep.compact("dpo", 0, tmp_path / "dpo")  # what results/beyond_ppo keeps of a run
    assert set(stored["fingerprints"]) == {"sft_model", "rm", "data"}
    assert stored["fingerprints"]["sft_model"] == model_fingerprint(sft / "model")["sha256"]
    assert [p["iteration"] for p in stored["series"]] == [r["step"] for r in rows]
    assert "provenance" not in stored["summary"] and stored["config"] == s["config"]


def test_grpo_and_bon_on_the_tiny_profile(tiny_folders, small_world, tmp_path: Path) -> None:
    sft, rm = tiny_folders
    s = _run("grpo", sft, rm, small_world, tmp_path / "grpo", *GRPO)
    rows = read_metrics(tmp_path / "grpo" / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == [0, 1, 2] and "gold_score" in rows[0] and "gold_score" in rows[2]
    assert abs(rows[1]["kl_per_token"]) < 1e-4  # the first rollout comes from the reference itself
    assert s["stage"] == "grpo" and s["config"]["kl_coef"] == 0.04 and s["iterations"] == 2
    assert (tmp_path / "grpo" / "policy" / "adapter_model.safetensors").is_file()
    b = _run("bon", sft, rm, small_world, tmp_path / "bon", *BON)
    assert [r["n"] for r in b["rows"]] == [1, 2, 4] and b["samples"] == 8 * 4
    assert [r["kl_bon"] for r in b["rows"]] == pytest.approx([0.0, bon_kl(2), bon_kl(4)])
    rewards = [r["reward"] for r in b["rows"]]
    assert rewards[0] <= rewards[1] <= rewards[2]  # the expected best of n grows with n
    assert abs(b["sft_kl_per_sequence"]) < 1e-4  # the samples are the reference's own


def test_presets_flags_and_one_line_errors(tiny_folders, small_world, tmp_path: Path, capsys) -> None:
    cli.main(["grpo", "--list-presets"])
    assert "grpo_no_kl" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="grpo needs --rm"):
        cli.main(["grpo", "--sft", "x", "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as e:
        cli.main(["dpo", "--sft", str(tiny_folders[0]), "--out", str(tmp_path / "d"), "--beta", "-1"])
    assert e.value.code == 2 and "DPOConfig.beta must be positive" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["dpo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--beta", "--label-smoothing", "--steps", "--collapse.patience", "--lora.r"):
        assert flag in text


@pytest.fixture(scope="module")
def chat_runs(tmp_path_factory, small_world) -> dict:
    """SFT and RM of the smol profile on the ChatML model folder, at test budgets, through the CLI."""
    root = tmp_path_factory.mktemp("chat")
    folder, _ = save_chat_llama(root / "hub")
    common = ["--profile", "smol", "--model", str(folder), "--data", str(small_world), *LORA]
    cli.main(["sft", *common, "--out", str(root / "sft"), "--sft-steps", "4", "--batch-size", "4", "--eval-every", "4",
              "--n-eval-prompts", "8", "--max-new-tokens", "6"])
    cli.main(["rm", *common, "--sft", str(root / "sft"), "--out", str(root / "rm"), "--steps", "3", "--batch-size",
              "4", "--eval-every", "3", "--n-eval-pairs", "8", "--n-fresh-prompts", "4", "--max-new-tokens", "6"])
    return {"root": root, "common": common}


def test_the_three_stages_on_a_chat_model_folder(chat_runs) -> None:
    root, common = chat_runs["root"], chat_runs["common"]
    budget = ["--max-prompt-tokens", "64"]
    for command, flags in (("dpo", DPO), ("grpo", GRPO), ("bon", BON)):
        cli.main([command, *common, "--sft", str(root / "sft"), "--rm", str(root / "rm"), "--out", str(root / command),
                  *flags, *budget])
    dpo, grpo, bon = (read_json(root / c / "summary.json") for c in ("dpo", "grpo", "bon"))
    assert dpo["profile"] == "smol" and dpo["final_gold_score"] is not None  # the world's judge, on chat text
    assert dpo["config"]["lr"] == 1e-4 and grpo["config"]["temperature"] == 0.8  # the smol profile's settings
    assert grpo["iterations"] == 2 and bon["rows"][0]["n"] == 1
    first = json.loads((root / "dpo" / "samples.jsonl").read_text().splitlines()[0])
    assert set(first) == {"category", "prompt", "response", "gold"}
