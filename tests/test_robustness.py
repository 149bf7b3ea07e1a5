"""Robustness of the PPO stage (issue 7): exact resume, non-finite guards, validation before any training.

Everything runs on tiny random models with the real tokenizer and prompts; nothing here trains for real.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from rlhf_lite import cli, sft_models
from rlhf_lite import rm as rm_mod
from rlhf_lite.data import DataError, load_prompts, load_sft
from rlhf_lite.models import AdapterStack, build_tiny_model
from rlhf_lite.ppo import core
from rlhf_lite.ppo import experience as experience_mod
from rlhf_lite.ppo import stage as stage_mod
from rlhf_lite.ppo import trainer as trainer_mod
from rlhf_lite.ppo.checkpoint import check_checkpoint, trim_metrics
from rlhf_lite.ppo.config import VANILLA, PPOConfig
from rlhf_lite.ppo.stage import build_setup, run_ppo
from rlhf_lite.ppo.trainer import NonFiniteError, PPOSetup, PPOTrainer
from rlhf_lite.settings import SettingError, parse_overrides, replace_fields
from rlhf_lite.sft import train_sft
from rlhf_lite.stage import model_fingerprint, world_judge
from rlhf_lite.text import Prompt, encode_pair_texts
from rlhf_lite.tokenizer import load_tokenizer
from rlhf_lite.utils import DATA_DIR, read_metrics, write_json
from tests.conftest import EOS, PAD, SMALL, SMALL_LORA, make_stack

TOK = load_tokenizer(DATA_DIR / "tokenizer.json")
TRAIN_PROMPTS = [r["prompt"] for r in load_prompts(DATA_DIR / "prompts_train.jsonl", limit=64)]
TEST_PROMPTS = [r["prompt"] for r in load_prompts(DATA_DIR / "prompts_test.jsonl", limit=4)]
SFT_ROWS = load_sft(DATA_DIR / "sft.jsonl", limit=8)

# Small and fast, with the tricks that carry state across iterations (running reward moments, the
# ptx batches drawn from the trainer's RNG, Adam moments, gradient clipping).
CFG = replace(VANILLA, iterations=4, rollout_batch=8, minibatch_size=4, ppo_epochs=1, max_new_tokens=6,
              gold_every=100, sample_every=100, checkpoint_every=0, reward_norm="normalize", reward_clip=0.8,
              kl_coef=0.1, max_grad_norm=1.0, ptx_coef=0.5, critic_pretrain_iterations=0, max_nonfinite=3)


def tiny_setup() -> PPOSetup:
    """The real tokenizer and prompts on a 2-layer random Llama; the same weights on every call."""
    stack = make_stack(vocab=len(TOK))
    examples = encode_pair_texts(TOK, [r["prompt"] for r in SFT_ROWS], [r["response"] for r in SFT_ROWS],
                                 SMALL.max_positions)
    return PPOSetup(stack, TOK, [Prompt(p, p) for p in TRAIN_PROMPTS], [Prompt(p, p) for p in TEST_PROMPTS],
                    examples, judge=world_judge())


@pytest.fixture(autouse=True)
def no_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("rlhf_lite.plotting.plot_ppo", lambda *a, **k: None)


def numeric_rows(path: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "wall_seconds"} for r in read_metrics(path)]


def adapter_states(t: PPOTrainer) -> dict[str, torch.Tensor]:
    return {f"{a}/{k}": v for a in ("policy", "critic") for k, v in t.stack.adapter_state(a).items()}


# ----- checkpoint and resume ----------------------------------------------------------------------
def test_interrupted_and_resumed_run_equals_uninterrupted_run(tmp_path: Path, monkeypatch) -> None:
    straight = PPOTrainer(CFG, tiny_setup(), tmp_path / "straight")
    straight.train()

    first = PPOTrainer(CFG, tiny_setup(), tmp_path / "resumed")
    step = first.step

    def step_then_ctrl_c() -> dict:  # a real SIGINT after iteration 2, while the loop runs
        row = step()
        if first.iteration == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return row

    monkeypatch.setattr(first, "step", step_then_ctrl_c)
    handler = signal.getsignal(signal.SIGINT)
    summary = first.train()
    assert summary["interrupted"] and summary["iterations"] == 2
    assert json.loads((tmp_path / "resumed/checkpoint/meta.json").read_text())["iteration"] == 2
    assert signal.getsignal(signal.SIGINT) is handler  # Ctrl-C works as before once the run is over

    second = PPOTrainer(CFG, tiny_setup(), tmp_path / "resumed")
    second.load_checkpoint(tmp_path / "resumed/checkpoint")
    summary = second.train()
    assert not summary["interrupted"] and summary["iterations"] == 4

    a, b = numeric_rows(tmp_path / "straight/metrics.jsonl"), numeric_rows(tmp_path / "resumed/metrics.jsonl")
    assert [r["iteration"] for r in b] == [0, 1, 2, 3, 4]  # one baseline row, no iteration repeated
    assert a == b
    assert b[-1]["pg_loss"] != b[-2]["pg_loss"] and "gold_score" in b[-1]
    sa, sb = adapter_states(straight), adapter_states(second)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert second.reward_moments.state_dict() == straight.reward_moments.state_dict()
    assert (tmp_path / "straight/samples.jsonl").read_text() == (tmp_path / "resumed/samples.jsonl").read_text()


def test_threaded_update_equals_sequential_update(tmp_path: Path, monkeypatch) -> None:
    """The policy's and the critic's steps in two threads (rlhf_lite.parallel) give the very metrics and
    weights of the same steps one after the other, at one intra-op thread each."""
    threads_used: dict[str, set[str]] = {}
    backward = trainer_mod.backward

    def recording_backward(*args, **kwargs):
        threads_used.setdefault(run, set()).add(threading.current_thread().name)
        return backward(*args, **kwargs)

    monkeypatch.setattr(trainer_mod, "backward", recording_backward)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainers = {}
        for run, workers in (("sequential", 1), ("threaded", 2)):
            trainers[run] = PPOTrainer(CFG, tiny_setup(), tmp_path / run, workers=workers)
            trainers[run].train()
    finally:
        torch.set_num_threads(threads)
    assert threads_used["sequential"] == {threading.main_thread().name}
    assert len(threads_used["threaded"]) == 2 and threading.main_thread().name not in threads_used["threaded"]
    a, b = (numeric_rows(tmp_path / run / "metrics.jsonl") for run in ("sequential", "threaded"))
    assert a == b and len(a) == CFG.iterations + 1
    sa, sb = adapter_states(trainers["sequential"]), adapter_states(trainers["threaded"])
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_threads_need_merged_weights(tmp_path: Path) -> None:
    setup = tiny_setup()
    setup.stack.merge_adapters = False  # as on a 4-bit base: peft's adapter switching is global state
    with pytest.raises(ValueError, match="merged weights"):
        PPOTrainer(CFG, setup, tmp_path, workers=2)
    assert PPOTrainer(CFG, setup, tmp_path).workers.n == 1


def test_checkpoint_config_must_match_except_iterations(tmp_path: Path) -> None:
    trainer = PPOTrainer(CFG, tiny_setup(), tmp_path)
    trainer.iteration = 3
    trainer.save_checkpoint(tmp_path / "checkpoint")
    assert check_checkpoint(tmp_path / "checkpoint", replace(CFG, iterations=10))["iteration"] == 3
    with pytest.raises(ValueError, match=r"kl_coef: 0\.1 in the checkpoint, 0\.3 requested"):
        check_checkpoint(tmp_path / "checkpoint", replace(CFG, kl_coef=0.3))
    with pytest.raises(ValueError, match=r"iterations \(2\) is below the iteration it reached \(3\)"):
        check_checkpoint(tmp_path / "checkpoint", replace(CFG, iterations=2))
    other = PPOTrainer(replace(CFG, seed=1), tiny_setup(), tmp_path / "other")
    before = adapter_states(other)
    with pytest.raises(ValueError, match="seed: 0 in the checkpoint, 1 requested"):
        other.load_checkpoint(tmp_path / "checkpoint")
    assert other.iteration == 0 and all(torch.equal(before[k], v) for k, v in adapter_states(other).items())
    with pytest.raises(FileNotFoundError, match="holds no complete checkpoint"):
        check_checkpoint(tmp_path / "nothing", CFG)


def test_trim_metrics_drops_rows_after_the_checkpoint(tmp_path: Path) -> None:
    rows = [{"iteration": i, "reward": float(i)} for i in range(6)]
    rows.insert(4, {"iteration": 3, "event": "collapse", "reason": "x"})
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    trim_metrics(path, 3)
    assert read_metrics(path) == rows[:5]


# ----- non-finite guards --------------------------------------------------------------------------
def test_nan_policy_loss_skips_exactly_that_step(tmp_path: Path, monkeypatch) -> None:
    cfg = replace(CFG, max_grad_norm=None, ptx_coef=None)  # 2 steps per iteration, as in vanilla PPO
    trainer = PPOTrainer(cfg, tiny_setup(), tmp_path)
    calls = {"n": 0}
    policy_loss = core.policy_loss

    def nan_for_three_calls(*args, **kwargs):
        calls["n"] += 1
        loss, stats = policy_loss(*args, **kwargs)
        return (loss * float("nan"), stats) if calls["n"] <= 3 else (loss, stats)

    monkeypatch.setattr(core, "policy_loss", nan_for_three_calls)
    before = adapter_states(trainer)
    with pytest.warns(RuntimeWarning, match="non-finite policy loss"):
        row = trainer.step()  # both steps NaN: nothing may move
    assert row["skipped_updates"] == 2 and "pg_loss" not in row
    assert all(torch.equal(before[k], v) for k, v in adapter_states(trainer).items())
    assert trainer.policy_opt.state == {} and trainer.critic_opt.state == {}  # Adam never stepped
    with pytest.warns(RuntimeWarning, match="non-finite policy loss and gradient norm"):
        row = trainer.step()  # first step NaN, second fine
    p = trainer.policy_params[0]
    assert row["skipped_updates"] == 1 and trainer.policy_opt.state[p]["step"].item() == 1
    assert all(torch.isfinite(v).all() for v in adapter_states(trainer).values())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        row = trainer.step()  # training continues normally
    assert row["skipped_updates"] == 0 and trainer.policy_opt.state[p]["step"].item() == 3
    assert [e["iteration"] for e in trainer.events] == [1, 1, 2]
    assert trainer.events[0]["what"] == "policy loss and gradient norm (epoch 0, minibatch 0)"


def test_nan_rewards_in_a_row_stop_with_a_checkpoint(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(experience_mod, "rm_scores", lambda stack, ids, att: torch.full((ids.shape[0],), torch.nan))
    cfg = replace(CFG, iterations=6, max_nonfinite=2)
    trainer = PPOTrainer(cfg, tiny_setup(), tmp_path)
    before = adapter_states(trainer)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(NonFiniteError) as err:
        warnings.simplefilter("always")
        trainer.train()
    assert str(tmp_path / "checkpoint") in str(err.value) and "RM reward (8 of 8 scores)" in str(err.value)
    assert [str(w.message) for w in caught if w.category is RuntimeWarning] == [
        f"PPO iteration {i}: non-finite RM reward (8 of 8 scores); update skipped" for i in (1, 2)]
    assert json.loads((tmp_path / "checkpoint/meta.json").read_text())["iteration"] == 2
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["skipped_updates"] for r in rows if "skipped_updates" in r] == [2, 2]  # every minibatch step
    assert [(r["iteration"], r["what"]) for r in rows if r.get("event") == "nonfinite"] == [
        (1, "RM reward (8 of 8 scores)"), (2, "RM reward (8 of 8 scores)")]
    assert trainer.reward_moments.count == 0  # the NaN never reached the running statistics
    assert all(torch.equal(before[k], v) for k, v in adapter_states(trainer).items())


# ----- validation before any training -------------------------------------------------------------
def _boom(*args, **kwargs):
    raise AssertionError("a model was loaded before the inputs were checked")


def _write_sft(folder: Path, seed: int) -> None:
    model = build_tiny_model(len(TOK), PAD, EOS, SMALL, seed)
    model.save_pretrained(folder / "model")
    TOK.save_pretrained(folder / "model")


@pytest.fixture
def profile():
    """The tiny profile with the test model's shape and LoRA settings."""
    from rlhf_lite.profiles import TINY

    return replace(TINY, lora=SMALL_LORA, model=replace(TINY.model, tiny=SMALL))


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny SFT folder and an RM folder trained (here: initialised) on it, as the stages write them."""
    sft, rm = tmp_path / "sft", tmp_path / "rm"
    _write_sft(sft, 0)
    AdapterStack(build_tiny_model(len(TOK), PAD, EOS, SMALL, 0), ["reward"], SMALL_LORA).save_adapter(
        "reward", rm / "reward")
    write_json(rm / "summary.json", {"provenance": {"sft_model": model_fingerprint(sft / "model")}})
    return sft, rm


def test_build_setup_accepts_matching_folders(folders, profile) -> None:
    setup = build_setup(CFG, *folders, profile=profile, n_test_prompts=4)
    assert len(setup.train_prompts) == 2000 and len(setup.test_prompts) == 4 and len(setup.sft_examples) > 0
    assert setup.stack.adapter_names == ["policy", "critic", "reward"]
    assert setup.judge is not None and setup.provenance["sft_model"] == model_fingerprint(folders[0] / "model")
    assert all(p.text == p.raw for p in setup.train_prompts)  # the tiny model reads the HH text itself


def test_fresh_adapters_do_not_depend_on_the_process_history(folders, profile) -> None:
    """The same seed gives the same run in a fresh process and after other work (the pipeline trains
    SFT and RM first, a notebook kernel runs other cells): adapter initialization is seeded."""
    first = build_setup(CFG, *folders, profile=profile, n_test_prompts=4).stack
    torch.manual_seed(12345)
    torch.rand(1000)  # other work moves torch's global RNG
    second = build_setup(CFG, *folders, profile=profile, n_test_prompts=4).stack
    for name in ("policy", "critic"):
        a, b = first.adapter_state(name), second.adapter_state(name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    other = build_setup(replace(CFG, seed=1), *folders, profile=profile, n_test_prompts=4).stack
    assert not all(torch.equal(first.adapter_state("policy")[k], v) for k, v in other.adapter_state("policy").items())


def test_rm_trained_on_another_sft_model_is_refused(folders, profile, tmp_path: Path, monkeypatch) -> None:
    sft, rm = folders
    _write_sft(tmp_path / "other_sft", seed=1)
    monkeypatch.setattr(stage_mod, "load_base", _boom)
    with pytest.raises(ValueError, match=f"trained on the SFT model {sft.resolve() / 'model'}"):
        build_setup(CFG, tmp_path / "other_sft", rm, profile=profile)
    with pytest.raises(ValueError, match="has LoRA settings"):  # an RM of another profile
        build_setup(CFG, sft, rm)


def test_missing_folders_are_named(folders, profile, tmp_path: Path, monkeypatch) -> None:
    sft, rm = folders
    monkeypatch.setattr(stage_mod, "load_base", _boom)
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'none' / 'model'} has no model"):
        build_setup(CFG, tmp_path / "none", rm, profile=profile)
    with pytest.raises(FileNotFoundError, match="summary.json not found"):  # no pretrained model, no record of one
        build_setup(replace(CFG, policy_init="pretrained"), sft, rm, profile=profile)
    with pytest.raises(FileNotFoundError, match="holds no reward model"):
        build_setup(CFG, sft, tmp_path / "none", profile=profile)


def _data_folder(tmp_path: Path, keep: tuple[str, ...]) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    for name in ("stats.json", "tokenizer.json", *keep):
        (data / name).symlink_to(DATA_DIR / name)
    return data


def test_bad_data_row_fails_with_file_and_line_before_models(folders, profile, tmp_path: Path, monkeypatch) -> None:
    data = _data_folder(tmp_path, ("prompts_test.jsonl", "sft.jsonl"))
    good = json.dumps({"prompt": TRAIN_PROMPTS[0]})
    (data / "prompts_train.jsonl").write_text(f"{good}\n{good}\n{json.dumps({'prompt': 'no marker'})}\n")
    monkeypatch.setattr(stage_mod, "load_base", _boom)
    with pytest.raises(DataError, match=r"prompts_train\.jsonl:3: 'prompt' must start with"):
        build_setup(CFG, *folders, data_dir=data, profile=profile)


@pytest.mark.parametrize("changes, message", [
    ({"max_new_tokens": 63}, (r"prompts_train\.jsonl:1: prompt of \d+ tokens exceeds the model's context minus "
                             r"PPOConfig\.max_new_tokens \(63\) = 1 tokens")),
    ({"max_new_tokens": 64}, r"max_new_tokens must be below the model's context length \(64\), got 64"),
])
def test_response_over_the_context_fails_before_models(folders, profile, monkeypatch, changes, message) -> None:
    monkeypatch.setattr(stage_mod, "load_base", _boom)
    with pytest.raises(ValueError, match=message):
        build_setup(replace(CFG, **changes), *folders, profile=profile)


def test_run_ppo_checks_settings_and_checkpoint_first(folders, profile, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(stage_mod, "load_base", _boom)
    with pytest.raises(ValueError, match="PPOConfig.clip_eps must be positive"):  # before the folders are read
        run_ppo(tmp_path / "out", tmp_path / "none", tmp_path / "none", replace(CFG, clip_eps=0.0))
    with pytest.raises(ValueError, match="PPOConfig.max_nonfinite must be >= 1"):
        run_ppo(tmp_path / "out", *folders, replace(CFG, max_nonfinite=0), profile=profile)
    with pytest.raises(FileNotFoundError, match="holds no complete checkpoint"):
        run_ppo(tmp_path / "out", *folders, CFG, resume=True, profile=profile)


def test_sft_and_rm_stages_check_data_before_models(tmp_path: Path, monkeypatch) -> None:
    data = _data_folder(tmp_path, ())
    (data / "sft.jsonl").write_text(json.dumps(SFT_ROWS[0]) + "\n" + json.dumps({"prompt": "x"}) + "\n")
    (data / "prefs_train.jsonl").write_text("{not json\n")
    monkeypatch.setattr(sft_models, "build_tiny_model", _boom)
    with pytest.raises(DataError, match=r"sft\.jsonl:2: "):
        train_sft(tmp_path / "sft", data_dir=data)
    monkeypatch.setattr(rm_mod, "build_rm_stack", _boom)
    with pytest.raises(DataError, match=r"prefs_train\.jsonl:1: "):
        rm_mod.train_rm(tmp_path / "rm", tmp_path / "sft", data_dir=data)


# ----- the command line ---------------------------------------------------------------------------
def _cli_error(argv: list[str], capsys) -> tuple[int | str, str]:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    return exit_info.value.code, capsys.readouterr().err


def test_cli_errors_are_one_clear_line(folders, tmp_path: Path, capsys, monkeypatch) -> None:
    sft, rm = folders
    base = ["ppo", "--sft", str(sft), "--rm", str(rm), "--out", str(tmp_path / "out")]
    code, err = _cli_error([*base, "--preset", "nope"], capsys)
    assert code == 2 and err.startswith("error: unknown preset 'nope'") and err.count("\n") == 1
    code, err = _cli_error([*base, "--set", "policy_lr=abc"], capsys)
    assert code == 2 and err == "error: PPOConfig.policy_lr: expected float, got str 'abc'\n"
    code, err = _cli_error([*base, "--iterations", "2.5"], capsys)
    assert code == 2 and err == "error: PPOConfig.iterations: expected int, got float 2.5\n"
    code, err = _cli_error([*base, "--collapse.patience", "x"], capsys)
    assert code == 2 and err == "error: PPOConfig.collapse.patience: expected int, got str 'x'\n"
    code, err = _cli_error([*base, "--critic-init", "nope"], capsys)
    assert code == 2 and err == "error: PPOConfig.critic_init: expected one of 'sft', 'rm', got 'nope'\n"
    code, err = _cli_error(["ppo", "--sft", str(sft), "--rm", str(rm), "--resume", str(tmp_path / "out")], capsys)
    assert code == 2 and "holds no complete checkpoint" in err and err.count("\n") == 1
    code, _ = _cli_error([*base, "--resume", str(tmp_path / "elsewhere")], capsys)
    assert "continues the run in that folder" in code

    def nonfinite(*args, **kwargs):
        raise NonFiniteError("3 consecutive PPO iterations ...; checkpoint saved in out/checkpoint")

    monkeypatch.setattr(stage_mod, "run_ppo", nonfinite)
    code, err = _cli_error(base, capsys)
    assert code == 1 and err == "error: 3 consecutive PPO iterations ...; checkpoint saved in out/checkpoint\n"


def test_set_overrides_keep_types() -> None:
    cfg = replace_fields(VANILLA, parse_overrides(["policy_lr=1", "kl_coef=0.05", "value_clip=None",
                                                   "adam_betas=[0.9, 0.99]", "critic_init=rm", "collapse.patience=4"]))
    assert isinstance(cfg, PPOConfig) and cfg.policy_lr == 1.0 and isinstance(cfg.policy_lr, float)
    assert cfg.kl_coef == 0.05 and cfg.value_clip is None and cfg.adam_betas == (0.9, 0.99)
    assert cfg.critic_init == "rm" and cfg.collapse.patience == 4 and cfg.collapse.kl_max == VANILLA.collapse.kl_max
    with pytest.raises(SettingError, match="PPOConfig has no field 'nope'"):
        replace_fields(VANILLA, {"nope": 1})
