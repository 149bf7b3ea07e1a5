"""The dpo, grpo and bon stages check what the PPO stage checks (they share rlhf_lite.policy_setup), before any
model loads: every data row they read, the token budgets, the config against the data's size, the output
folder, and that the RM was trained on the SFT model. Each error is one line naming the culprit."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest

from rlhf_lite.profiles import TINY
from tests.conftest import SMALL, SMALL_LORA
from tests.reliability import (
    cli_error,
    copy_data,
    edit_line,
    no_models,
    one_line,
    quiet_progress,  # noqa: F401 (autouse: no progress bars on stderr)
    small_world,
    write_rm,
    write_sft,
)

LORA = ["--lora.r", "4", "--lora.alpha", "8", "--model.tiny.max-positions", "64"]
FLAGS = {"dpo": ["--batch-size", "8", "--steps", "2", "--max-new-tokens", "6"],
         "grpo": ["--prompts-per-iteration", "2", "--group-size", "2", "--minibatch-size", "2", "--max-new-tokens", "6"],
         "bon": ["--n-max", "4", "--ns", "(1, 2, 4)", "--n-test-prompts", "8", "--max-new-tokens", "6"]}
LONG = " the zorb is blue ." * 30  # 150 world tokens


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return small_world(tmp_path_factory.mktemp("data") / "world")


@pytest.fixture(scope="module")
def folders(world, tmp_path_factory) -> tuple[Path, Path, Path]:
    """An SFT model, an RM trained on it, and a second SFT model the RM was not trained on."""
    root = tmp_path_factory.mktemp("beyond_runs")
    profile = replace(TINY, lora=SMALL_LORA, model=replace(TINY.model, tiny=SMALL))
    sft = write_sft(root / "sft", world)
    return sft, write_rm(root / "rm", sft, world, TINY.rm, profile), write_sft(root / "other_sft", world, seed=1)


def _argv(stage: str, folders, data: Path, out: Path, *extra) -> list:
    sft, rm, _ = folders
    return [stage, "--sft", sft, "--rm", rm, "--data", data, "--out", out, *LORA, *FLAGS[stage], *extra]


@pytest.mark.parametrize("stage", ["dpo", "grpo", "bon"])
def test_a_bad_prompt_row_is_named_before_any_model_loads(stage, world, folders, tmp_path, capsys, monkeypatch):
    no_models(monkeypatch)
    data = copy_data(world, tmp_path / "data")
    edit_line(data / "prompts_test.jsonl", 5, lambda r: {**r, "prompt": "\n\nHuman: what is the meaning of life ?"
                                                                  "\n\nAssistant:"})
    code, err = cli_error(_argv(stage, folders, data, tmp_path / "out"), capsys)
    path = re.escape(str(data / "prompts_test.jsonl"))
    assert code == 2 and re.search(f"^error: {path}:5: the prompt is not a question of the synthetic world",
                                   one_line(err)), err


def test_dpo_checks_the_length_of_every_preference_pair(world, folders, tmp_path, capsys, monkeypatch) -> None:
    no_models(monkeypatch)
    data = copy_data(world, tmp_path / "data")
    edit_line(data / "prefs_train.jsonl", 7, lambda r: {**r, "chosen": r["chosen"] + LONG})
    code, err = cli_error(_argv("dpo", folders, data, tmp_path / "out"), capsys)
    assert code == 2 and re.search(
        rf"^error: {re.escape(str(data / 'prefs_train.jsonl'))}:7: prompt and response \(with EOS\) of \d+ tokens "
        r"exceeds the model's context = 64 tokens", one_line(err)), err


def test_prompts_longer_than_the_budget_are_named(world, folders, tmp_path, capsys, monkeypatch) -> None:
    no_models(monkeypatch)
    code, err = cli_error(_argv("grpo", folders, world, tmp_path / "out", "--max-prompt-tokens", "8"), capsys)
    assert code == 2 and re.search(r"prompts_train\.jsonl:1: prompt of \d+ tokens exceeds GRPOConfig\.max_prompt_tokens "
                                   "= 8 tokens", one_line(err)), err


@pytest.mark.parametrize("stage, flag, field, rows", [("grpo", "--prompts-per-iteration", "prompts_per_iteration",
                                                       "32 training prompts of prompts_train.jsonl"),
                                                      ("dpo", "--batch-size", "batch_size",
                                                       "64 preference pairs of prefs_train.jsonl")])
def test_a_batch_larger_than_the_data_fails_naming_the_field(stage, flag, field, rows, world, folders, tmp_path, capsys,
                                                             monkeypatch) -> None:
    no_models(monkeypatch)
    code, err = cli_error(_argv(stage, folders, world, tmp_path / "out", flag, "100"), capsys)
    assert code == 2 and one_line(err) == f"error: {stage.upper()}Config.{field} exceeds the {rows}, got 100", err


@pytest.mark.parametrize("stage", ["dpo", "grpo", "bon"])
def test_an_earlier_run_is_replaced_only_with_overwrite(stage, world, folders, tmp_path, capsys, monkeypatch) -> None:
    no_models(monkeypatch)
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text(json.dumps({"stage": stage}))
    code, err = cli_error(_argv(stage, folders, world, out), capsys)
    assert code == 2 and re.search(f"already holds a finished {stage} run .*pass --overwrite", one_line(err)), err
    (out / "notes.txt").write_text("mine")
    code, err = cli_error(_argv(stage, folders, world, out, "--overwrite"), capsys)
    assert code == 2 and "holds files this project did not write (notes.txt)" in one_line(err), err
    assert (out / "notes.txt").read_text() == "mine" and (out / "summary.json").is_file()


@pytest.mark.parametrize("stage", ["grpo", "bon"])
def test_an_rm_of_another_sft_model_is_refused(stage, world, folders, tmp_path, capsys, monkeypatch) -> None:
    no_models(monkeypatch)
    _, rm, other = folders
    code, err = cli_error([stage, "--sft", other, "--rm", rm, "--data", world, "--out", tmp_path / "out", *LORA,
                           *FLAGS[stage]], capsys)
    assert code == 2 and "was trained on the SFT model" in one_line(err), err
