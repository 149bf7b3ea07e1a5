"""Reliability, class 1: finished work is never overwritten without a word. Every stage of the command line
refuses an ``--out`` that holds a run, names what it holds (pointing to ``--resume`` for a stopped PPO run,
to ``--reuse`` for a pipeline), and ``--overwrite`` replaces only this project's own files, once the new
run's checks have passed. Nothing here loads a model.
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import pytest

from rlhf_lite import cli
from rlhf_lite.outdir import clear_out
from rlhf_lite.ppo.config import VANILLA
from tests.reliability import (
    cli_error,
    copy_data,
    edit_line,
    no_models,
    one_line,
    quiet_progress,  # noqa: F401 (autouse: no progress bars on stderr)
    small_world,
)


def fake_run(folder: Path, kind: str) -> Path:
    """A folder as a stage leaves it (only the files the folder checks look at)."""
    folder.mkdir(parents=True)
    if kind in ("sft", "rm", "ppo", "pipeline"):
        (folder / "summary.json").write_text(json.dumps({"stage": kind, "interrupted": False}))
        (folder / "metrics.jsonl").write_text('{"step": 1}\n')
        (folder / {"sft": "model", "rm": "reward", "ppo": "policy", "pipeline": "sft"}[kind]).mkdir()
    if kind in ("ppo", "stopped"):
        ckpt = folder / "checkpoint"
        ckpt.mkdir()
        (ckpt / "meta.json").write_text(json.dumps({"iteration": 3, "config": VANILLA.to_dict(), "preset": "vanilla"}))
        with zipfile.ZipFile(ckpt / "trainer.pt", "w") as z:
            z.writestr("state", "x")
    if kind == "unfinished_pipeline":
        (folder / "sft").mkdir()
    if kind == "model":
        (folder / "config.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(b"x")
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return small_world(tmp_path_factory.mktemp("folders") / "world")


@pytest.fixture
def runs(tmp_path: Path, world: Path) -> dict[str, Path]:
    made = {kind: fake_run(tmp_path / kind, kind) for kind in
            ("sft", "rm", "ppo", "stopped", "pipeline", "unfinished_pipeline", "model")}
    made["data"] = copy_data(world, tmp_path / "data")
    made["file"] = tmp_path / "a_file"
    made["file"].write_text("x")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    made["foreign"] = tmp_path / "foreign"
    (tmp_path / "repo" / "rlhf_lite").mkdir(parents=True)
    (tmp_path / "repo" / "README.md").write_text("a repository")
    made["repo"] = tmp_path / "repo"
    made["hh"] = tmp_path / "hh.jsonl"
    made["hh"].write_text('{"chosen": "\\n\\nHuman: a\\n\\nAssistant: b", "rejected": "\\n\\nHuman: a\\n\\nAssistant: c"}\n')
    return made


SMALL = ["--batch-size", "8", "--n-eval-prompts", "8"]
# (id, argv with {kind} placeholders, the one-line error)
REFUSED = [
    ("sft-out-finished-sft", ["sft", "--out", "{sft}", *SMALL],
     (r"--out \S+/sft already holds a finished sft run \(\S+/sft/summary\.json\): pass --overwrite to replace it, or "
     r"choose another --out")),
    ("sft-out-rm-run", ["sft", "--out", "{rm}"], r"--out \S+/rm already holds a finished rm run"),
    ("rm-out-sft-run", ["rm", "--sft", "{sft}", "--out", "{sft}"], r"--out \S+/sft already holds a finished sft run"),
    ("ppo-out-finished-ppo", ["ppo", "--sft", "{sft}", "--rm", "{rm}", "--out", "{ppo}"],
     r"--out \S+/ppo already holds a finished ppo run \(\S+summary\.json\): pass --overwrite"),
    ("ppo-out-stopped-run", ["ppo", "--sft", "{sft}", "--rm", "{rm}", "--out", "{stopped}"],
     (r"--out \S+/stopped already holds a PPO run stopped at iteration 3 \(\S+/stopped/checkpoint\): continue it with "
     r"`--resume \S+/stopped`, or pass --overwrite to replace it")),
    ("ppo-out-sft-run", ["ppo", "--sft", "{sft}", "--rm", "{rm}", "--out", "{sft}"], r"holds a finished sft run"),
    ("pipeline-out-finished", ["pipeline", "--out", "{pipeline}"],
     (r"--out \S+/pipeline already holds a finished pipeline run \(\S+\): pass --reuse to keep its finished stages, "
     r"or pass --overwrite to replace it")),
    ("pipeline-out-unfinished", ["pipeline", "--out", "{unfinished_pipeline}"],
     r"already holds an unfinished pipeline run \(sft\): pass --reuse to keep its finished stages"),
    ("pipeline-reuse-out-sft-run", ["pipeline", "--reuse", "--out", "{sft}"],
     r"--out \S+/sft holds a finished sft run, not a pipeline run: --reuse keeps the stages of an earlier pipeline"),
    ("data-out-data", ["data", "--out", "{data}"], r"--out \S+/data already holds a data folder \(stats\.json\)"),
    ("data-hh-out-data", ["data", "--hh", "{hh}", "--out", "{data}"], r"already holds a data folder"),
    ("export-out-model", ["export", "--run", "{ppo}", "--out", "{model}"],
     r"--out \S+/model already holds a model folder \(config\.json\): pass --overwrite"),
    ("out-is-a-file", ["sft", "--out", "{file}"], r"--out \S+/a_file is a file, not a folder"),
    ("out-under-a-file", ["sft", "--out", "{file}/run"], r"--out \S+/a_file/run cannot be created: \S+/a_file is a file"),
    ("out-foreign-files-overwrite", ["sft", "--out", "{foreign}", "--overwrite"],
     r"--out \S+/foreign holds files this project did not write \(notes\.txt\): choose a new or empty folder"),
    ("out-repository-overwrite", ["data", "--out", "{repo}", "--overwrite"],
     r"--out \S+/repo holds files this project did not write \(rlhf_lite\)"),
    ("resume-with-another-out", ["ppo", "--resume", "{stopped}", "--out", "{ppo}"], None),
]

CASES = {f"folders/{c[0]}": "error" for c in REFUSED} | {f"folders/{n}": kind for n, kind in [
    ("out-not-writable", "error"), ("out-empty-accepted", "recovery"), ("out-lock-only-accepted", "recovery"),
    ("overwrite-keeps-old-run-when-checks-fail", "recovery"), ("overwrite-clears-only-our-files", "recovery"),
    ("data-overwrite-replaces-stale-files", "recovery"), ("export-failure-keeps-old-model", "recovery"),
    ("ppo-overwrite-keeps-checkpoint-until-models-load", "recovery")]}


@pytest.mark.parametrize("argv, message", [pytest.param(*c[1:], id=c[0]) for c in REFUSED])
def test_out_holding_work_is_refused(argv, message, runs, capsys, monkeypatch) -> None:
    no_models(monkeypatch)
    before = {p: p.read_bytes() for p in Path(runs["sft"]).parent.rglob("*") if p.is_file()}
    code, err = cli_error([a.format(**runs) for a in argv], capsys)
    if message is None:  # argparse-level refusal: its own message, exit 1
        assert "continues the run in that folder; drop --out" in str(code)
    else:
        assert code == 2 and re.search(message, one_line(err)), err
    assert {p: p.read_bytes() for p in Path(runs["sft"]).parent.rglob("*") if p.is_file()} == before  # untouched


def test_out_not_writable(tmp_path: Path, capsys, monkeypatch) -> None:
    no_models(monkeypatch)
    (tmp_path / "ro").mkdir()
    monkeypatch.setattr("rlhf_lite.outdir.os.access", lambda path, mode: Path(path) != tmp_path / "ro")
    code, err = cli_error(["sft", "--out", tmp_path / "ro"], capsys)
    assert code == 2 and one_line(err) == f"error: --out {tmp_path / 'ro'} is not writable"
    code, err = cli_error(["sft", "--out", tmp_path / "ro" / "new"], capsys)
    assert code == 2 and one_line(err) == f"error: --out {tmp_path / 'ro' / 'new'} cannot be created: {tmp_path / 'ro'} " \
                                          "is not writable"


@pytest.mark.parametrize("setup", ["out-empty-accepted", "out-lock-only-accepted"])
def test_empty_out_is_accepted(setup, tmp_path: Path, world: Path, monkeypatch) -> None:
    no_models(monkeypatch)
    out = tmp_path / "out"
    out.mkdir()
    if setup == "out-lock-only-accepted":
        (out / ".lock").write_text("123")  # the notebooks' stage lock is not a run
    with pytest.raises(AssertionError, match="a model was loaded"):  # every check passed: on to the model
        cli.main(["sft", "--out", str(out), "--data", str(world), *SMALL])


def test_overwrite_keeps_old_run_when_checks_fail(runs, world: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    no_models(monkeypatch)
    bad = copy_data(world, tmp_path / "bad")
    edit_line(bad / "sft.jsonl", 5, lambda r: {**r, "response": " "})
    code, err = cli_error(["sft", "--out", runs["sft"], "--overwrite", "--data", bad, *SMALL], capsys)
    assert code == 2 and re.search(r"sft\.jsonl:5: 'response' is empty", one_line(err))
    assert sorted(p.name for p in runs["sft"].iterdir()) == ["metrics.jsonl", "model", "summary.json"]


def test_overwrite_clears_only_our_files(tmp_path: Path) -> None:
    run = fake_run(tmp_path / "run", "stopped")
    for name in ("checkpoint.old", "checkpoint.tmp", "policy"):
        (run / name).mkdir()
    (run / "metrics.jsonl").write_text("{}\n")
    (run / ".lock").write_text("1")
    clear_out(run)
    assert [p.name for p in run.iterdir()] == [".lock"]  # a stale checkpoint.old can no longer be resumed


def test_data_overwrite_replaces_stale_files(runs, capsys) -> None:
    cli.main(["data", "--hh", str(runs["hh"]), "--out", str(runs["data"]), "--overwrite"])
    assert not (runs["data"] / "tokenizer.json").exists() and not (runs["data"] / "README.md").exists()
    assert json.loads((runs["data"] / "stats.json").read_text())["kind"] == "hh-rlhf"
    assert len((runs["data"] / "prefs_train.jsonl").read_text().splitlines()) == 1


def test_export_failure_keeps_old_model(runs, tmp_path: Path, capsys) -> None:
    code, err = cli_error(["export", "--run", tmp_path / "nothing", "--out", runs["model"], "--overwrite"], capsys)
    assert code == 2 and re.search(r"nothing/policy holds no policy adapter", one_line(err))
    assert sorted(p.name for p in runs["model"].iterdir()) == ["config.json", "model.safetensors"]


def test_ppo_overwrite_keeps_checkpoint_until_models_load(runs, world, capsys, monkeypatch) -> None:
    """--overwrite on a stopped PPO run is accepted; its checkpoint is deleted only once the new run's models
    are loaded (here the model load fails: the old checkpoint is still there)."""
    no_models(monkeypatch)
    code, err = cli_error(["ppo", "--sft", runs["sft"], "--rm", runs["rm"], "--out", runs["stopped"], "--overwrite",
                           "--data", world], capsys)
    assert code == 2 and re.search(r"sft/model has no model|holds no model weights|config\.json", one_line(err))
    assert (runs["stopped"] / "checkpoint" / "meta.json").is_file()
