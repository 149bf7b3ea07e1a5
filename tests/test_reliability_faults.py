"""Reliability, class 5: checkpoints are durable and every fault is one line naming the file.

A kill at every point of a checkpoint swap, SIGTERM mid-iteration, a second Ctrl-C and a kill between
checkpoints are each followed by an exact resume (the metrics and weights of a run that never stopped);
non-finite weights are rolled back and the run stops with a checkpoint of the last finite state, which a
resume with a lower learning rate continues. Corrupt checkpoint, adapter, meta, summary and model files give
one line naming the file. Everything runs on the tiny random models of tests/test_robustness.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from rlhf_lite.ppo import checkpoint as ckpt_mod
from rlhf_lite.ppo.checkpoint import find_checkpoint, swap_steps, trim_metrics
from rlhf_lite.ppo.trainer import NonFiniteError, PPOTrainer
from tests.test_robustness import CFG, adapter_states, numeric_rows, tiny_setup

FAST = replace(CFG, iterations=3, checkpoint_every=1)
from tests.reliability import quiet_progress  # noqa: F401 (autouse: no progress bars on stderr)


class Killed(BaseException):
    """A kill -9 at that point: nothing after it runs (not even ``except Exception``)."""


@pytest.fixture(autouse=True)
def no_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("rlhf_lite.plotting.plot_ppo", lambda *a, **k: None)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The run that never stops: its metrics rows and final adapter weights."""
    out = tmp_path_factory.mktemp("straight")
    t = PPOTrainer(FAST, tiny_setup(), out)
    t.train()
    return {"rows": numeric_rows(out / "metrics.jsonl"), "states": adapter_states(t)}


def assert_exact(folder: Path, trainer: PPOTrainer, reference: dict) -> None:
    assert numeric_rows(folder / "metrics.jsonl") == reference["rows"]
    states = adapter_states(trainer)
    assert states.keys() == reference["states"].keys()
    assert all(torch.equal(states[k], reference["states"][k]) for k in states)


def resume(folder: Path, cfg=FAST) -> PPOTrainer:
    t = PPOTrainer(cfg, tiny_setup(), folder)
    t.load_checkpoint(folder / "checkpoint")
    return t


@pytest.fixture(scope="module")
def killed_before_swap(tmp_path_factory) -> Path:
    """A run killed just after writing checkpoint 2 aside: checkpoint (iteration 1), checkpoint.tmp (2, whole)."""
    out = tmp_path_factory.mktemp("killed") / "run"
    t = PPOTrainer(FAST, tiny_setup(), out)
    real = ckpt_mod.swap_in

    def swap_or_die(tmp, path):
        if t.iteration == 2:
            raise Killed
        real(tmp, path)

    ckpt_mod.swap_in = swap_or_die
    try:
        with pytest.raises(Killed):
            t.train()
    finally:
        ckpt_mod.swap_in = real
    return out


def _kill_after(steps: int, stale_old: bool, half_retire: bool = False):
    def kill(run: Path) -> None:
        path, tmp = run / "checkpoint", run / "checkpoint.tmp"
        if stale_old:  # an earlier swap was killed before it deleted its .old
            shutil.copytree(path, run / "checkpoint.old")
        plan = swap_steps(tmp, path)
        for _, step in plan[:steps]:
            step()
        if half_retire:  # killed inside the last step: meta.json already gone, the rest not yet
            (run / "checkpoint.old" / "meta.json").unlink()
    return kill


def _half_written(run: Path) -> None:
    (run / "checkpoint.tmp" / "meta.json").unlink()  # meta.json is written last


# (id, the state the kill leaves, the iteration the resume starts from)
KILL_POINTS = [
    ("while-writing-the-new-checkpoint", _half_written, 1),
    *[(f"after-step-{k}-of-6", _kill_after(k, stale_old=True), 2) for k in range(7)],
    ("inside-the-final-retire", _kill_after(4, stale_old=False, half_retire=True), 2),
]

CASES = {f"faults/kill-{c[0]}": "recovery" for c in KILL_POINTS} | {f"faults/{n}": k for n, k in [
    ("sigterm-mid-iteration", "recovery"), ("second-ctrl-c", "recovery"), ("kill-between-checkpoints", "recovery"),
    ("nonfinite-weights-rolled-back", "recovery"), ("corrupt-meta-falls-back-to-old", "recovery"),
    ("corrupt-meta", "error"), ("truncated-trainer-state", "error"), ("garbage-trainer-state", "error"),
    ("corrupt-policy-adapter", "error"), ("corrupt-critic-config", "error"), ("missing-critic-head", "error"),
    ("corrupt-metrics-row", "error")]}


@pytest.mark.parametrize("kill, start", [pytest.param(*c[1:], id=c[0]) for c in KILL_POINTS])
def test_kill_at_every_point_of_a_swap_resumes_exactly(kill, start, killed_before_swap, reference, tmp_path) -> None:
    run = shutil.copytree(killed_before_swap, tmp_path / "run")
    kill(run)
    assert find_checkpoint(run / "checkpoint") is not None  # never no complete checkpoint
    t = resume(run)
    assert t.iteration == start
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint"]  # recovered
    t.train()
    assert_exact(run, t, reference)


def test_sigterm_mid_iteration_resumes_exactly(reference, tmp_path, monkeypatch) -> None:
    first = PPOTrainer(FAST, tiny_setup(), tmp_path)
    update = first.update

    def update_then_sigterm(*args, **kwargs):  # a real SIGTERM in the middle of iteration 2
        if first.iteration == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return update(*args, **kwargs)

    monkeypatch.setattr(first, "update", update_then_sigterm)
    handler = signal.getsignal(signal.SIGTERM)
    summary = first.train()
    assert summary["interrupted"] and summary["iterations"] == 2 and signal.getsignal(signal.SIGTERM) is handler
    assert json.loads((tmp_path / "checkpoint/meta.json").read_text())["iteration"] == 2
    t = resume(tmp_path)
    t.train()
    assert_exact(tmp_path, t, reference)


def test_second_ctrl_c_resumes_exactly(reference, tmp_path, monkeypatch) -> None:
    """Two Ctrl-C in iteration 3 abort it at once: no checkpoint of the half iteration, the one of 2 stays."""
    first = PPOTrainer(FAST, tiny_setup(), tmp_path)
    update = first.update

    def update_after_two_signals(*args, **kwargs):
        if first.iteration == 3:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return update(*args, **kwargs)

    monkeypatch.setattr(first, "update", update_after_two_signals)
    assert first.train()["interrupted"]
    assert json.loads((tmp_path / "checkpoint/meta.json").read_text())["iteration"] == 2
    t = resume(tmp_path)
    t.train()
    assert_exact(tmp_path, t, reference)


def test_kill_between_checkpoints_resumes_exactly(reference, tmp_path, monkeypatch) -> None:
    """Killed after logging iteration 3 (checkpoints every 2): its rows, and a half-written one, are dropped."""
    first = PPOTrainer(replace(FAST, checkpoint_every=2), tiny_setup(), tmp_path)
    save = first.save_checkpoint

    def die_at_3(path):
        if first.iteration == 3:
            with (tmp_path / "metrics.jsonl").open("a") as fh:
                fh.write('{"iteration": 4, "rew')  # the row being written when the kill came
            raise Killed
        save(path)

    monkeypatch.setattr(first, "save_checkpoint", die_at_3)
    with pytest.raises(Killed):
        first.train()
    t = resume(tmp_path, replace(FAST, checkpoint_every=2))
    assert t.iteration == 2
    t.train()
    assert_exact(tmp_path, t, reference)


def test_nonfinite_weights_rolled_back_and_resumed_with_a_lower_lr(tmp_path, monkeypatch) -> None:
    cfg = replace(FAST, max_nonfinite=1)
    t = PPOTrainer(cfg, tiny_setup(), tmp_path)
    step, after_1 = t.policy_opt.step, {}

    def step_to_nan(*args, **kwargs):  # a step with finite inputs that leaves a NaN weight (iteration 2)
        if t.iteration == 2 and not after_1:
            after_1.update(adapter_states(t))  # before iteration 2's first step: the weights after iteration 1
        out = step(*args, **kwargs)
        if t.iteration == 2:
            with torch.no_grad():
                t.policy_params[0].view(-1)[0] = float("nan")
        return out

    monkeypatch.setattr(t.policy_opt, "step", step_to_nan)
    with pytest.warns(RuntimeWarning, match="non-finite policy weights after the step of epoch 0, minibatch 0"), \
            pytest.raises(NonFiniteError, match=r"checkpoint saved in \S+checkpoint; .*--resume \S+ --policy-lr 0\.0001"):
        t.train()
    # the whole update of iteration 2 was rolled back to the state after iteration 1
    assert all(torch.equal(v, after_1[k]) for k, v in adapter_states(t).items())
    events = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "event" in r]
    assert events == [{"iteration": 2, "event": "nonfinite",
                       "what": "policy weights after the step of epoch 0, minibatch 0 (update rolled back)"}]
    lower = replace(cfg, policy_lr=1e-4)
    t2 = resume(tmp_path, lower)
    assert all(torch.equal(v, after_1[k]) for k, v in adapter_states(t2).items())  # the last finite state
    assert [g["lr"] for g in t2.policy_opt.param_groups] == [1e-4]
    assert t2.train()["iterations"] == 3
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in rows if r.get("event") == "resume"] == [
        {"iteration": 2, "event": "resume", "changed": {"policy_lr": {"from": 1e-3, "to": 1e-4}}}]
    assert json.loads((tmp_path / "checkpoint/meta.json").read_text())["config"]["policy_lr"] == 1e-4
    assert all(torch.isfinite(v).all() for v in adapter_states(t2).values())


@pytest.fixture
def stopped(killed_before_swap, tmp_path) -> Path:
    """A run with one complete checkpoint (iteration 1)."""
    run = shutil.copytree(killed_before_swap, tmp_path / "run")
    shutil.rmtree(run / "checkpoint.tmp")
    return run


def test_corrupt_meta_falls_back_to_old(stopped, reference, capsys) -> None:
    shutil.copytree(stopped / "checkpoint", stopped / "checkpoint.old")
    (stopped / "checkpoint" / "meta.json").write_text('{"iteration": 2, "conf')
    t = resume(stopped)
    assert t.iteration == 1 and "resuming from checkpoint.old (iteration 1)" in capsys.readouterr().err
    t.train()
    assert_exact(stopped, t, reference)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garbage_zip(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", b"not a pickle")


# (id, what to break in the checkpoint, the error, naming the file)
CORRUPT = [
    ("corrupt-meta", lambda c: (c / "meta.json").write_text("[1, 2"),
     r"checkpoint holds no complete checkpoint \(checkpoint: meta\.json missing or unreadable\): nothing to resume"),
    ("truncated-trainer-state", lambda c: _truncate(c / "trainer.pt"),
     r"checkpoint holds no complete checkpoint \(checkpoint: trainer\.pt missing or not whole\)"),
    ("garbage-trainer-state", lambda c: _garbage_zip(c / "trainer.pt"), r"checkpoint/trainer\.pt is corrupt \("),
    ("corrupt-policy-adapter", lambda c: _truncate(c / "policy" / "adapter_model.safetensors"),
     r"checkpoint/policy/adapter_model\.safetensors is not a whole safetensors file \(truncated or corrupt\?\)"),
    ("corrupt-critic-config", lambda c: (c / "critic" / "adapter_config.json").write_text("{"),
     r"checkpoint/critic/adapter_config\.json is not a valid LoRA adapter config"),
    ("missing-critic-head", lambda c: (c / "critic" / "head.safetensors").unlink(),
     r"checkpoint/critic/head\.safetensors is missing: the critic adapter needs its head"),
]


@pytest.mark.parametrize("breaks, message", [pytest.param(*c[1:], id=c[0]) for c in CORRUPT])
def test_corrupt_checkpoint_file_is_named(breaks, message, stopped) -> None:
    breaks(stopped / "checkpoint")
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        resume(stopped)
    assert re.search(message, str(err.value)) and "\n" not in str(err.value), err.value


def test_corrupt_metrics_row(tmp_path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"iteration": 1}\n{"iteration": 2, "x": nan-ish}\n{"iteration": 3}\n')
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: not a JSON row")):
        trim_metrics(path, 3)
    path.write_text('{"iteration": 1}\n{"iteration": 2}\n{"iteration": 3, "x"')  # a cut last row is a kill's
    trim_metrics(path, 3)
    assert path.read_text() == '{"iteration": 1}\n{"iteration": 2}\n'
