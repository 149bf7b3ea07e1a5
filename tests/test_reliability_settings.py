"""Reliability, class 3: settings. Every bad value of every config is a one-line error naming the field before
any model loads (a zero that would be ignored, an infinite float, betas out of range, collapse bands that
switch the detector off, batch sizes larger than the data); a setting that works but not as meant is a
one-line warning. Each case runs the real command line.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import replace
from pathlib import Path

import pytest

from rlhf_lite import cli
from rlhf_lite.profiles import TINY
from rlhf_lite.sft import SFTConfig, lr_lambda
from tests.conftest import SMALL, SMALL_LORA
from tests.reliability import (
    cli_error,
    no_models,
    one_line,
    quiet_progress,  # noqa: F401 (autouse: no progress bars on stderr)
    small_world,
    write_rm,
    write_sft,
)

SFT_BASE = ["--batch-size", "8", "--n-eval-prompts", "8"]
RM_BASE = ["--batch-size", "8", "--n-fresh-prompts", "4", "--n-eval-pairs", "8"]
PPO_BASE = ["--iterations", "4", "--rollout-batch", "8", "--minibatch-size", "4"]

# (id, stage, flags, the one-line error it must give)
ERRORS = [
    ("sft-batch-zero", "sft", ["--batch-size", "0"], r"SFTConfig\.batch_size must be positive, got 0"),
    ("sft-lr-infinite", "sft", ["--lr", "1e999"], r"SFTConfig\.lr must be a finite number, got inf"),
    ("sft-lr-negative", "sft", ["--lr", "-0.001"], r"SFTConfig\.lr must be positive, got -0\.001"),
    ("sft-lr-text", "sft", ["--lr", "fast"], r"profile\.sft\.lr: expected float, got str 'fast'"),
    ("sft-warmup-zero", "sft", ["--warmup-steps", "0"], r"SFTConfig\.warmup_steps must be >= 1, got 0"),
    ("sft-weight-decay-negative", "sft", ["--weight-decay", "-0.1"], r"SFTConfig\.weight_decay must be >= 0"),
    ("sft-max-len-one", "sft", ["--max-len", "1"], r"SFTConfig\.max_len must be > 1 or None, got 1"),
    ("sft-steps-negative", "sft", ["--sft-steps", "-1"], r"SFTConfig\.sft_steps must be >= 0, got -1"),
    ("sft-nothing-trains", "sft", ["--sft-steps", "0", "--pretrain-steps", "0"],
     r"SFTConfig\.sft_steps and pretrain_steps are both 0: nothing would train"),
    ("sft-log-every-zero", "sft", ["--log-every", "0"], r"SFTConfig\.log_every must be positive"),
    ("sft-eval-every-zero", "sft", ["--eval-every", "0"], r"SFTConfig\.eval_every must be positive"),
    ("sft-eval-prompts-zero", "sft", ["--n-eval-prompts", "0"], r"SFTConfig\.n_eval_prompts must be positive"),
    ("sft-new-tokens-zero", "sft", ["--max-new-tokens", "0"], r"SFTConfig\.max_new_tokens must be positive"),
    ("sft-batch-over-data", "sft", ["--batch-size", "65"],
     r"SFTConfig\.batch_size exceeds the 64 demonstrations of sft\.jsonl, got 65"),
    ("sft-pretrain-batch-over-data", "sft", ["--batch-size", "64", "--data", "{few_pairs}"],
     r"SFTConfig\.batch_size exceeds the 32 pretraining texts of prefs_train\.jsonl, got 64"),
    ("sft-eval-prompts-over-data", "sft", ["--n-eval-prompts", "17"],
     r"SFTConfig\.n_eval_prompts exceeds the 16 test prompts of prompts_test\.jsonl, got 17"),
    ("rm-steps-zero", "rm", ["--steps", "0"], r"RMConfig\.steps must be positive, got 0"),
    ("rm-batch-zero", "rm", ["--batch-size", "0"], r"RMConfig\.batch_size must be positive"),
    ("rm-lr-infinite", "rm", ["--lr=-1e999"], r"RMConfig\.lr must be a finite number, got -inf"),
    ("rm-lm-coef-zero-ignored", "rm", ["--lm-coef", "0"], r"RMConfig\.lm_coef must be > 0, or None \(off\), got 0\.0"),
    ("rm-lm-coef-negative", "rm", ["--lm-coef", "-1"], r"RMConfig\.lm_coef must be > 0, or None \(off\), got -1\.0"),
    ("rm-warmup-zero", "rm", ["--warmup-steps", "0"], r"RMConfig\.warmup_steps must be >= 1"),
    ("rm-eval-batch-zero", "rm", ["--eval-batch-size", "0"], r"RMConfig\.eval_batch_size must be positive"),
    ("rm-fresh-prompts-zero", "rm", ["--n-fresh-prompts", "0"], r"RMConfig\.n_fresh_prompts must be positive"),
    ("rm-eval-pairs-zero", "rm", ["--n-eval-pairs", "0"], r"RMConfig\.n_eval_pairs must be positive"),
    ("rm-max-len-zero", "rm", ["--max-len", "0"], r"RMConfig\.max_len must be > 1 or None, got 0"),
    ("rm-batch-over-data", "rm", ["--batch-size", "65"],
     r"RMConfig\.batch_size exceeds the 64 preference pairs of prefs_train\.jsonl, got 65"),
    ("rm-fresh-prompts-over-data", "rm", ["--n-fresh-prompts", "17"],
     r"RMConfig\.n_fresh_prompts exceeds the 16 test prompts of prompts_test\.jsonl, got 17"),
    ("ppo-iterations-zero", "ppo", ["--iterations", "0"], r"PPOConfig\.iterations must be positive, got 0"),
    ("ppo-iterations-float", "ppo", ["--iterations", "2.5"], r"PPOConfig\.iterations: expected int, got float 2\.5"),
    ("ppo-minibatch-not-dividing", "ppo", ["--minibatch-size", "3"],
     r"PPOConfig\.rollout_batch must be divisible by minibatch_size \(3\), got 8"),
    ("ppo-minibatch-over-rollout", "ppo", ["--minibatch-size", "16"],
     r"PPOConfig\.rollout_batch must be divisible by minibatch_size \(16\), got 8"),
    ("ppo-top-p-zero", "ppo", ["--top-p", "0"], r"PPOConfig\.top_p must be in \(0, 1\], got 0\.0"),
    ("ppo-top-p-over-one", "ppo", ["--top-p", "1.5"], r"PPOConfig\.top_p must be in \(0, 1\], got 1\.5"),
    ("ppo-temperature-zero", "ppo", ["--temperature", "0"], r"PPOConfig\.temperature must be positive"),
    ("ppo-gamma-over-one", "ppo", ["--gamma", "1.5"], r"PPOConfig\.gamma must lie in \[0, 1\], got 1\.5"),
    ("ppo-lam-negative", "ppo", ["--lam", "-0.1"], r"PPOConfig\.lam must lie in \[0, 1\], got -0\.1"),
    ("ppo-clip-zero", "ppo", ["--clip-eps", "0"], r"PPOConfig\.clip_eps must be positive"),
    ("ppo-kl-zero-ignored", "ppo", ["--kl-coef", "0"], r"PPOConfig\.kl_coef must be > 0 or None \(off\), got 0\.0"),
    ("ppo-reward-clip-negative", "ppo", ["--reward-clip", "-1"], r"PPOConfig\.reward_clip must be > 0 or None"),
    ("ppo-betas-one", "ppo", ["--adam-betas", "(0.9, 1.0)"],
     r"PPOConfig\.adam_betas must both lie in \[0, 1\), got \(0\.9, 1\.0\)"),
    ("ppo-betas-negative", "ppo", ["--adam-betas", "(-0.1, 0.95)"], r"PPOConfig\.adam_betas must both lie in \[0, 1\)"),
    ("ppo-betas-one-value", "ppo", ["--adam-betas", "(0.9,)"], r"PPOConfig\.adam_betas: expected tuple, got tuple"),
    ("ppo-policy-lr-infinite", "ppo", ["--policy-lr", "1e999"], r"PPOConfig\.policy_lr must be a finite number"),
    ("ppo-critic-lr-negative", "ppo", ["--critic-lr", "-1"], r"PPOConfig\.critic_lr must be positive"),
    ("ppo-critic-pretrain-whole-run", "ppo", ["--critic-pretrain-iterations", "4"],
     r"PPOConfig\.critic_pretrain_iterations must be in \[0, iterations=4\), got 4"),
    ("ppo-checkpoint-every-negative", "ppo", ["--checkpoint-every", "-1"], r"PPOConfig\.checkpoint_every must be >= 0"),
    ("ppo-max-nonfinite-zero", "ppo", ["--max-nonfinite", "0"], r"PPOConfig\.max_nonfinite must be >= 1, got 0"),
    ("ppo-max-prompt-tokens-zero", "ppo", ["--max-prompt-tokens", "0"], r"PPOConfig\.max_prompt_tokens must be > 0"),
    ("ppo-entropy-target-negative", "ppo", ["--entropy-target", "-1"], r"PPOConfig\.entropy_target must be >= 0"),
    ("ppo-gold-every-zero", "ppo", ["--gold-every", "0"], r"PPOConfig\.gold_every must be positive"),
    ("ppo-old-policy-unknown", "ppo", ["--old-policy", "newest"],
     r"PPOConfig\.old_policy: expected one of 'rollout', 'reference', got 'newest'"),
    ("ppo-reward-norm-unknown", "ppo", ["--reward-norm", "whiten"], r"PPOConfig\.reward_norm: expected one of"),
    ("ppo-response-over-context", "ppo", ["--max-new-tokens", "64"],
     r"PPOConfig\.max_new_tokens must be below the model's context length \(64\), got 64"),
    ("ppo-rollout-over-data", "ppo", ["--rollout-batch", "40", "--minibatch-size", "8"],
     r"PPOConfig\.rollout_batch exceeds the 32 training prompts of prompts_train\.jsonl, got 40"),
    ("collapse-baseline-zero", "ppo", ["--collapse.baseline-iterations", "0"],
     r"CollapseBands\.baseline_iterations must be >= 1 \(the bands are relative to the first iterations\), got 0"),
    ("collapse-patience-zero", "ppo", ["--collapse.patience", "0"], r"CollapseBands\.patience must be >= 1, got 0"),
    ("collapse-length-ratio-one", "ppo", ["--collapse.length-ratio", "1"],
     r"CollapseBands\.length_ratio must be > 1 \(a multiple of the baseline\), got 1\.0"),
    ("collapse-perplexity-ratio-below-one", "ppo", ["--collapse.ref-perplexity-ratio", "0.5"],
     r"CollapseBands\.ref_perplexity_ratio must be > 1"),
    ("collapse-kl-zero", "ppo", ["--collapse.kl-max", "0"], r"CollapseBands\.kl_max must be positive, got 0\.0"),
    ("collapse-gold-drop-zero", "ppo", ["--collapse.gold-drop", "0"], r"CollapseBands\.gold_drop must be positive"),
    ("collapse-reward-rise-negative", "ppo", ["--collapse.reward-rise", "-1"], r"CollapseBands\.reward_rise must be >= 0"),
    ("collapse-length-ratio-infinite", "ppo", ["--collapse.length-ratio", "1e999"],
     r"PPOConfig\.collapse\.length_ratio must be a finite number, got inf"),
    ("model-device-unknown", "sft", ["--model.device", "gpu9"], r"ModelSpec\.device is not a torch device, got 'gpu9'"),
    ("model-max-params-zero", "sft", ["--model.max-params", "0"], r"ModelSpec\.max_params must be positive or None"),
    ("model-tiny-nf4", "sft", ["--model.quantization", "nf4"], r"ModelSpec\.quantization must be 'none' for the tiny"),
    ("model-tiny-odd-heads", "sft", ["--model.tiny.hidden-size", "30"],
     r"TinyModelConfig\.hidden_size must be an even multiple of num_heads \(4\)"),
    ("model-tiny-no-layers", "sft", ["--model.tiny.num-layers", "0"], r"TinyModelConfig\.num_layers must be positive"),
    ("lora-rank-zero", "sft", ["--lora.r", "0"], r"LoraSettings\.r must be positive, got 0"),
    ("lora-dropout-one", "sft", ["--lora.dropout", "1"], r"LoraSettings\.dropout must lie in \[0, 1\), got 1\.0"),
    ("lora-no-targets", "sft", ["--lora.target-modules", "()"], r"LoraSettings\.target_modules must name at least one"),
    ("lora-alpha-zero", "sft", ["--lora.alpha", "0"], r"LoraSettings\.alpha must be positive"),
    ("pipeline-iterations-zero-ignored", "pipeline", ["--iterations", "0"], r"PPOConfig\.iterations must be positive, got 0"),
    ("set-without-equals", "sft", ["--set", "lr"], r"--set expects name=value, got 'lr'"),
    ("set-unknown-field", "sft", ["--set", "learning_rate=1"], r"profile\.sft has no field 'learning_rate'; its fields: batch_size"),
    ("hh-limit-zero", "data", ["--hh", "{hh}", "--train-limit", "0"], r"limit must be a positive int or None, got 0"),
]

# (id, stage, flags, the warning it must print); the run then goes on (to the model, forbidden here)
WARNINGS = [
    ("sft-warmup-over-steps", "sft", ["--sft-steps", "20", "--pretrain-steps", "0", "--warmup-steps", "30",
                                      "--log-every", "5"],
     r"SFTConfig\.warmup_steps \(30\) exceeds a phase's steps \(20\): the learning rate never reaches SFTConfig\.lr"),
    ("sft-log-every-over-steps", "sft", ["--sft-steps", "20", "--pretrain-steps", "0", "--log-every", "50",
                                         "--warmup-steps", "5"],
     r"SFTConfig\.log_every \(50\) exceeds every phase's steps: no loss is logged"),
    ("rm-warmup-over-steps", "rm", ["--steps", "10"],
     r"RMConfig\.warmup_steps \(20\) exceeds steps \(10\): the learning rate never reaches RMConfig\.lr"),
    ("collapse-run-too-short", "ppo", ["--iterations", "3"],
     (r"CollapseBands\.baseline_iterations \(3\) with patience 2 lets the collapse detector fire from iteration 4 on, "
     r"after this run's 3")),
]

CASES = {f"settings/{c[0]}": "error" for c in ERRORS} | {f"settings/{c[0]}": "warning" for c in WARNINGS} | {
    "settings/lr-schedule-never-negative": "recovery"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("settings")
    hh = root / "hh.jsonl"
    hh.write_text('{"chosen": "\\n\\nHuman: a\\n\\nAssistant: b", "rejected": "\\n\\nHuman: a\\n\\nAssistant: c"}\n')
    return {"world": small_world(root / "world"), "few_pairs": small_world(root / "few", prefs_train=16),
            "hh": hh, "root": root}


@pytest.fixture(scope="module")
def folders(data) -> tuple[Path, Path]:
    profile = replace(TINY, lora=SMALL_LORA, model=replace(TINY.model, tiny=SMALL))
    sft = write_sft(data["root"] / "sft", data["world"])
    return sft, write_rm(data["root"] / "rm", sft, data["world"], TINY.rm, profile)


def _argv(stage: str, flags: list[str], data: dict, folders, out: Path) -> list[str]:
    flags = [f.format(**{k: str(v) for k, v in data.items()}) for f in flags]
    common = ["--out", str(out)] + (["--data", str(data["world"])] if "--data" not in flags and stage != "data" else [])
    small = ["--model.tiny.hidden-size", "64", "--model.tiny.num-layers", "2", "--model.tiny.num-heads", "2",
             "--model.tiny.intermediate-size", "128", "--model.tiny.max-positions", "64", "--lora.r", "4",
             "--lora.alpha", "8"]
    if stage == "sft":
        return ["sft", *common, *SFT_BASE, *flags]
    if stage == "rm":
        return ["rm", "--sft", str(folders[0]), *common, *RM_BASE, *flags]
    if stage == "ppo":
        return ["ppo", "--sft", str(folders[0]), "--rm", str(folders[1]), *common, *PPO_BASE, *small, *flags]
    if stage == "pipeline":
        return ["pipeline", *common, *flags]
    return ["data", *common, *flags]


@pytest.mark.parametrize("stage, flags, message", [pytest.param(*c[1:], id=c[0]) for c in ERRORS])
def test_bad_setting_is_one_line_naming_the_field(stage, flags, message, data, folders, tmp_path, capsys,
                                                  monkeypatch) -> None:
    no_models(monkeypatch)
    code, err = cli_error(_argv(stage, flags, data, folders, tmp_path / "out"), capsys)
    assert code == 2 and re.search(message, one_line(err)), err
    assert not (tmp_path / "out").exists() or stage == "data"  # refused before anything was written


@pytest.mark.parametrize("stage, flags, message", [pytest.param(*c[1:], id=c[0]) for c in WARNINGS])
def test_setting_not_as_meant_is_one_warning_line(stage, flags, message, data, folders, tmp_path, capsys,
                                                  monkeypatch) -> None:
    no_models(monkeypatch)
    with pytest.raises(AssertionError, match="a model was loaded"):  # accepted: the run goes on to the model
        cli.main(_argv(stage, flags, data, folders, tmp_path / "out"))
    warned = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert len(warned) == 1 and re.search(message, warned[0]), warned


def test_lr_schedule_never_negative() -> None:
    """The SFT schedule (linear warm-up, cosine decay to 0.1) stays in (0, 1] at every step, for every warm-up
    (one longer than the phase too, which the config warns about), and peaks at 1 where the warm-up ends."""
    for warmup, total in [(1, 1), (30, 400), (400, 400), (500, 20), (7, 3)]:
        f = lr_lambda(warmup, total)
        values = [f(s) for s in range(total)]
        assert all(0 < v <= 1 for v in values), (warmup, total)
        assert values[0] == pytest.approx(1 / warmup)
        if warmup <= total:
            assert values[warmup - 1] == 1.0 and min(values[warmup - 1:]) >= 0.1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warm-up as long as the phase is accepted without a warning
        SFTConfig(warmup_steps=400, sft_steps=400, pretrain_steps=0).validate()
