"""Reliability, class 5 (continued): corrupt model, adapter and summary files, weights that are not finite, a
loss that diverges, and faults of the process itself. Each is one line naming the file (before any model
loads where the file can be read without one), or the run's exit code; a programming error is not hidden.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rlhf_lite import cli
from rlhf_lite.profiles import TINY
from rlhf_lite.stage import model_fingerprint
from tests.conftest import SMALL, SMALL_LORA
from tests.reliability import cli_error, no_models, one_line, small_world, write_rm, write_sft

SMALL_FLAGS = ["--lora.r", "4", "--lora.alpha", "8", "--model.tiny.hidden-size", "64", "--model.tiny.num-layers", "2",
               "--model.tiny.num-heads", "2", "--model.tiny.intermediate-size", "128", "--model.tiny.max-positions",
               "64"]
PPO = ["--iterations", "4", "--rollout-batch", "8", "--minibatch-size", "4", "--max-new-tokens", "6", *SMALL_FLAGS]
from tests.reliability import quiet_progress  # noqa: F401 (autouse: no progress bars on stderr)


@pytest.fixture(autouse=True)
def no_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("plot_ppo", "plot_sft", "plot_rm"):
        monkeypatch.setattr(f"rlhf_lite.plotting.{name}", lambda *a, **k: None)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return small_world(tmp_path_factory.mktemp("files") / "world")


@pytest.fixture
def folders(world, tmp_path) -> tuple[Path, Path]:
    profile = replace(TINY, lora=SMALL_LORA, model=replace(TINY.model, tiny=SMALL))
    sft = write_sft(tmp_path / "sft", world)
    return sft, write_rm(tmp_path / "rm", sft, world, TINY.rm, profile)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _nan_weight(path: Path, key_part: str) -> None:
    state = load_file(str(path))
    key = next(k for k in state if key_part in k)
    state[key] = state[key].clone()
    state[key].view(-1)[0] = float("nan")
    save_file(state, str(path), metadata={"format": "pt"})


def _rerecord(sft: Path, rm: Path, _=None) -> None:
    """The RM was trained on this (diverged) SFT model: its summary records the new fingerprint."""
    summary = json.loads((rm / "summary.json").read_text())
    summary["provenance"]["sft_model"] = model_fingerprint(sft / "model")
    (rm / "summary.json").write_text(json.dumps(summary))


# (id, what to break in (sft, rm), the one-line error, whether a model may load first)
BROKEN = [
    ("rm-adapter-truncated", lambda s, r: _truncate(r / "reward" / "adapter_model.safetensors"),
     r"rm/reward/adapter_model\.safetensors is not a whole safetensors file \(truncated or corrupt\?\)", False),
    ("rm-head-truncated", lambda s, r: _truncate(r / "reward" / "head.safetensors"),
     r"rm/reward/head\.safetensors is not a whole safetensors file", False),
    ("rm-adapter-config-corrupt", lambda s, r: (r / "reward" / "adapter_config.json").write_text('{"r": 4'),
     r"rm/reward/adapter_config\.json is not a valid LoRA adapter config \(JSONDecodeError", False),
    ("rm-adapter-config-not-lora", lambda s, r: (r / "reward" / "adapter_config.json").write_text('{"r": 4}'),
     r"rm/reward/adapter_config\.json is not a valid LoRA adapter config \(KeyError: 'target_modules'\)", False),
    ("rm-summary-corrupt", lambda s, r: (r / "summary.json").write_text('{"stage": "rm", '),
     r"rm/summary\.json is not valid JSON \(corrupt or truncated\?\)", False),
    ("rm-summary-without-provenance", lambda s, r: (r / "summary.json").write_text('{"stage": "rm"}'),
     r"rm/summary\.json records no provenance \(not a run of this version of rlhf_lite\)", False),
    ("sft-config-corrupt", lambda s, r: (s / "model" / "config.json").write_text("{"),
     r"sft/model/config\.json is not valid JSON", False),
    ("sft-weights-truncated", lambda s, r: _truncate(s / "model" / "model.safetensors"),
     (r"sft/model/model\.safetensors is not a whole safetensors file \(truncated or corrupt\?\): Error while "
     r"deserializing header"), False),
    ("sft-config-without-context", lambda s, r: (s / "model" / "config.json").write_text(json.dumps(
        {k: v for k, v in json.loads((s / "model" / "config.json").read_text()).items()
         if k != "max_position_embeddings"})),
     r"sft/model/config\.json has no usable max_position_embeddings \(None\)", False),
    ("sft-tokenizer-corrupt", lambda s, r: (s / "model" / "tokenizer.json").write_text('{"version": '),
     r"the tokenizer files of \S+sft/model are corrupt", False),
    ("sft-weights-not-finite", lambda s, r: _rerecord(s, r, _nan_weight(s / "model" / "model.safetensors",
                                                                          "embed_tokens")),
     r"sft/model holds non-finite weights \(model\.embed_tokens\.weight\): the run that wrote it diverged", True),
    ("rm-weights-not-finite", lambda s, r: _nan_weight(r / "reward" / "head.safetensors", "weight"),
     r"rm/reward holds non-finite weights \(heads\.reward\.weight\)", True),
]

CASES = {f"faults/{c[0]}": "error" for c in BROKEN} | {f"faults/{n}": "error" for n in (
    "export-adapter-truncated", "export-without-summary", "ctrl-c-during-sft", "unreadable-file-mid-run",
    "sft-loss-not-finite", "rm-loss-not-finite")} | {"faults/programming-error-not-hidden": "recovery"}


@pytest.mark.parametrize("breaks, message, loads", [pytest.param(*c[1:], id=c[0]) for c in BROKEN])
def test_broken_input_file_is_named(breaks, message, loads, folders, world, tmp_path, capsys, monkeypatch) -> None:
    sft, rm = folders
    breaks(sft, rm)
    if not loads:
        no_models(monkeypatch)
    code, err = cli_error(["ppo", "--sft", sft, "--rm", rm, "--out", tmp_path / "out", "--data", world, *PPO], capsys)
    assert code == 2 and re.search(message, one_line(err)), err
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def _ppo_run(folder: Path, base: Path) -> Path:
    folder.mkdir()
    (folder / "policy").mkdir()
    (folder / "policy" / "adapter_config.json").write_text(json.dumps({"r": 4}))
    (folder / "policy" / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    (folder / "summary.json").write_text(json.dumps({"stage": "ppo", "provenance": {"policy_base": str(base)}}))
    return folder


def test_export_adapter_truncated(folders, tmp_path, capsys, monkeypatch) -> None:
    no_models(monkeypatch)
    run = _ppo_run(tmp_path / "run", folders[0] / "model")
    code, err = cli_error(["export", "--run", run, "--out", tmp_path / "hf"], capsys)
    assert code == 2 and re.search(r"run/policy/adapter_model\.safetensors is not a whole safetensors file",
                                   one_line(err)), err


def test_export_without_summary(folders, tmp_path, capsys, monkeypatch) -> None:
    no_models(monkeypatch)
    run = _ppo_run(tmp_path / "run", folders[0] / "model")
    shutil.copy(folders[1] / "reward" / "adapter_model.safetensors", run / "policy" / "adapter_model.safetensors")
    (run / "summary.json").unlink()
    code, err = cli_error(["export", "--run", run, "--out", tmp_path / "hf"], capsys)
    assert code == 2 and one_line(err) == f"error: {run / 'summary.json'} not found"


SFT = ["--sft-steps", "2", "--pretrain-steps", "2", "--batch-size", "4", "--n-eval-prompts", "4", "--warmup-steps", "1",
       "--log-every", "1", "--eval-every", "2", "--max-new-tokens", "4", *SMALL_FLAGS]


def test_ctrl_c_during_sft(world, tmp_path, capsys, monkeypatch) -> None:
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("rlhf_lite.sft.train_phase", interrupted)
    code, err = cli_error(["sft", "--out", tmp_path / "out", "--data", world, *SFT], capsys)
    assert code == 130 and one_line(err).startswith("error: interrupted; a stage stopped this way leaves no "
                                                    "summary.json: run it again with --overwrite")


def test_unreadable_file_mid_run(world, tmp_path, capsys, monkeypatch) -> None:
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "out" / "metrics.jsonl"))

    monkeypatch.setattr("rlhf_lite.sft.MetricsLog", denied)
    code, err = cli_error(["sft", "--out", tmp_path / "out", "--data", world, *SFT], capsys)
    assert code == 2 and one_line(err) == f"error: [Errno 13] Permission denied: '{tmp_path / 'out' / 'metrics.jsonl'}'"


def test_programming_error_not_hidden(world, tmp_path, monkeypatch) -> None:
    def bug(*args, **kwargs):
        raise TypeError("unsupported operand type(s)")

    monkeypatch.setattr("rlhf_lite.sft.train_phase", bug)
    with pytest.raises(TypeError, match="unsupported operand"):  # a traceback, as a bug deserves
        cli.main(["sft", "--out", str(tmp_path / "out"), "--data", str(world), *SFT])


def test_sft_loss_not_finite(world, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr("rlhf_lite.sft.lm_loss", lambda *a, **k: torch.tensor(float("nan"), requires_grad=True))
    code, err = cli_error(["sft", "--out", tmp_path / "out", "--data", world, *SFT], capsys)
    assert code == 1 and one_line(err) == ("error: SFT pretrain step 1: the loss is nan; nothing was saved: lower "
                                           "SFTConfig.lr (0.002) and run the stage again")
    assert not (tmp_path / "out" / "summary.json").exists() and not (tmp_path / "out" / "model").exists()


def test_rm_loss_not_finite(folders, world, tmp_path, capsys, monkeypatch) -> None:
    def nan_loss(*args, **kwargs):
        return torch.tensor(float("nan"), requires_grad=True), {"loss": float("nan")}

    monkeypatch.setattr("rlhf_lite.rm.rm_loss", nan_loss)
    code, err = cli_error(["rm", "--sft", folders[0], "--out", tmp_path / "out", "--data", world, "--steps", "2",
                           "--batch-size", "4", "--n-fresh-prompts", "4", "--warmup-steps", "1", *SMALL_FLAGS], capsys)
    assert code == 1 and one_line(err) == ("error: RM step 1: the loss is nan; nothing was saved: lower RMConfig.lr "
                                           "(0.002) and run the stage again")
    assert not (tmp_path / "out" / "reward").exists()
