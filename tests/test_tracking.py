"""TensorBoard (and W&B) beside metrics.jsonl: the event files hold the values of metrics.jsonl, under the tags
of rlhf_lite.tracking, and a resumed run's events read back as its trimmed metrics.jsonl."""

from __future__ import annotations

import json
import sys
import types
from dataclasses import replace
from pathlib import Path

import pytest

from rlhf_lite import tracking
from rlhf_lite.outdir import check_out, clear_out, is_ours
from rlhf_lite.ppo.trainer import PPOTrainer
from rlhf_lite.utils import MetricsLog, read_metrics
from tests.test_robustness import CFG, tiny_setup

RUN_CFG = replace(CFG, iterations=3, gold_every=2, sample_every=2)


def read_events(folder: Path) -> tuple[dict[str, list[tuple[int, float]]], dict[str, list[tuple[int, str]]]]:
    """Every scalar and text summary in ``folder``'s event files, read by the reader TensorBoard's server uses
    (with its purge of what a restart logged again): ({tag: [(step, value)]}, {tag: [(step, text)]}); TensorBoard files
    text under ``tag/text_summary``."""
    from tensorboard.backend.event_processing.event_accumulator import TENSORS
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    acc = EventAccumulator(str(folder), size_guidance={TENSORS: 0})
    acc.Reload()
    scalars, texts = {}, {}
    for tag in acc.Tags()["tensors"]:
        plugin = acc.SummaryMetadata(tag).plugin_data.plugin_name
        events = [(e.step, tensor_util.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)]
        if plugin == "scalars":
            scalars[tag] = [(s, float(v.item())) for s, v in events]
        else:
            texts[tag.removesuffix("/text_summary")] = [(s, v.item().decode()) for s, v in events]
    return scalars, texts


def expected_scalars(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """What the event files should hold: each number of each non-event row at its iteration (a plain loop)."""
    out: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        if "event" in r:
            continue
        for k, v in r.items():
            if k != "iteration" and v is not None and not isinstance(v, str):
                out.setdefault(tracking.tag_for(k, "ppo"), []).append((r["iteration"], float(v)))
    return out


@pytest.fixture(autouse=True)
def no_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("rlhf_lite.plotting.plot_ppo", lambda *a, **k: None)
    monkeypatch.delenv(tracking.TRACKERS_ENV, raising=False)


def test_a_ppo_run_writes_events_equal_to_its_metrics(tmp_path: Path) -> None:
    trainer = PPOTrainer(RUN_CFG, tiny_setup(), tmp_path / "run")
    trainer.train()
    rows = read_metrics(tmp_path / "run/metrics.jsonl")
    scalars, texts = read_events(tmp_path / "run")
    assert scalars == expected_scalars(rows)  # every value, bit for bit (double precision), nothing else
    by_it = {r["iteration"]: r for r in rows}
    # the mapping, spelled out for a few tags
    assert dict(scalars["ppo/pg_loss"])[2] == by_it[2]["pg_loss"]
    assert dict(scalars["monitors/kl_per_token"])[3] == by_it[3]["kl_per_token"]
    assert [s for s, _ in scalars["gold/gold_score"]] == [0, 2, 3]  # the baseline, gold_every and the last
    cats = [k for k in by_it[0] if k.startswith("gold/")]
    assert cats and all(dict(scalars[c])[0] == by_it[0][c] for c in cats)  # per-category keys keep their name
    assert dict(scalars["ppo/policy_updated"])[1] == 1.0  # booleans as 0/1
    # sample responses as text, at the iterations that logged samples
    samples = read_metrics(tmp_path / "run/samples.jsonl")
    assert [s for s, _ in texts["samples/ppo"]] == [1, 2]
    table = dict(texts["samples/ppo"])[2]
    assert all(s["response"].replace("|", "\\|") in table for s in samples if s["iteration"] == 2)


def test_a_resumed_run_hides_the_events_it_logs_again(tmp_path: Path, monkeypatch) -> None:
    """A run killed after iteration 3 with its checkpoint at 2 resumes from 2 with a halved policy learning
    rate: metrics.jsonl drops row 3 and TensorBoard's reader drops the first process's events from step 3 on,
    so each step is there once, with the resumed process's values; the change is a resume event at step 2."""
    cfg = replace(RUN_CFG, checkpoint_every=2)
    first = PPOTrainer(cfg, tiny_setup(), tmp_path / "run")
    after_step = first._after_step

    def crash_after_three(row, log):
        after_step(row, log)
        if first.iteration == 3:
            raise RuntimeError("killed")

    monkeypatch.setattr(first, "_after_step", crash_after_three)
    with pytest.raises(RuntimeError, match="killed"):
        first.train()
    scalars, _ = read_events(tmp_path / "run")
    assert [s for s, _ in scalars["ppo/pg_loss"]] == [1, 2, 3]

    first_three = dict(scalars["ppo/pg_loss"])[3]
    second = PPOTrainer(replace(cfg, policy_lr=cfg.policy_lr / 2), tiny_setup(), tmp_path / "run")
    second.load_checkpoint(tmp_path / "run/checkpoint")
    assert second.iteration == 2
    second.train()
    rows = read_metrics(tmp_path / "run/metrics.jsonl")
    assert [r["iteration"] for r in rows if "event" not in r] == [0, 1, 2, 3]
    scalars, texts = read_events(tmp_path / "run")
    assert len(list((tmp_path / "run").glob(tracking.EVENT_GLOB))) == 2  # one file per process
    assert scalars == expected_scalars(rows)  # step 3 once, not twice
    assert dict(scalars["ppo/pg_loss"])[3] != first_three  # the resumed process's value, at the new rate
    assert [s for s, _ in texts["samples/ppo"]] == [1, 2]
    change = {"policy_lr": {"from": cfg.policy_lr, "to": cfg.policy_lr / 2}}
    assert [r for r in rows if r.get("event") == "resume"] == [{"iteration": 2, "event": "resume", "changed": change}]
    assert texts["events/resume"] == [(2, f"changed: {json.dumps(change, sort_keys=True)}")]


def test_a_fresh_log_replaces_old_event_files(tmp_path: Path) -> None:
    for value in (1.0, 2.0):
        log = MetricsLog(tmp_path / "metrics.jsonl", stage="rm")
        log.log({"step": 1, "loss": value})
        log.close()
    scalars, _ = read_events(tmp_path)
    assert scalars == {"rm/loss": [(1, 2.0)]}


def test_tags_of_each_stage() -> None:
    step, scalars, texts = tracking.split_row(
        {"iteration": 4, "reward": 1.5, "kl_per_token": 0.1, "gold_score": 0.3, "gold/arithmetic": 0.2,
         "policy_updated": False, "explained_variance": None, "note": "x"}, "ppo")
    assert step == 4 and texts == {"ppo/note": "x"}
    assert scalars == {"ppo/reward": 1.5, "monitors/kl_per_token": 0.1, "gold/gold_score": 0.3,
                       "gold/arithmetic": 0.2, "ppo/policy_updated": 0.0}
    # SFT: the phase is the group of the loss; an evaluation row's response length is the gold measurement's
    assert tracking.split_row({"phase": "pretrain", "step": 10, "loss": 2.0, "lr": 1e-3}, "sft") == (
        10, {"pretrain/loss": 2.0, "pretrain/lr": 1e-3}, {})
    assert tracking.split_row({"phase": "sft", "step": 20, "gold_score": 0.5, "response_length": 9.0}, "sft")[1] == {
        "gold/gold_score": 0.5, "gold/response_length": 9.0}
    assert tracking.split_row({"step": 3, "test_accuracy": 0.7}, "rm")[1] == {"rm/test_accuracy": 0.7}
    # notebook 06's stages: GRPO's monitors sit beside PPO's, the rest under the stage's name
    assert tracking.split_row({"iteration": 2, "kl_per_token": 0.2, "reward": 1.0}, "grpo")[1] == {
        "monitors/kl_per_token": 0.2, "grpo/reward": 1.0}
    assert tracking.split_row({"step": 5, "loss": 0.6, "kl_per_token": 0.1}, "dpo")[1] == {
        "dpo/loss": 0.6, "dpo/kl_per_token": 0.1}
    assert tracking.split_row({"iteration": 11, "event": "collapse", "reason": "KL 0.9 > 0.5"}, "ppo") == (
        11, {}, {"events/collapse": "reason: KL 0.9 > 0.5"})


def test_wandb_goes_through_the_same_interface(tmp_path: Path, monkeypatch) -> None:
    """With RLHF_LITE_TRACKERS=wandb the rows reach W&B under the same tags (a stand-in module records the
    calls: nothing is contacted), and a resumed log continues the same W&B run."""
    calls: list[tuple] = []

    class Run:
        def log(self, values, step):
            calls.append(("log", step, values))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs["id"], kwargs["resume"]))
        return Run()

    fake = types.SimpleNamespace(init=init, Html=lambda s: s, util=types.SimpleNamespace(generate_id=lambda: "abc123"))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr(tracking, "_available", lambda name: name == "wandb")
    monkeypatch.setenv(tracking.TRACKERS_ENV, "wandb")
    log = MetricsLog(tmp_path / "metrics.jsonl", stage="ppo")
    log.log({"iteration": 1, "reward": 2.0, "response_length": 7.0})
    log.close()
    fake.util.generate_id = lambda: "other"  # a resumed log keeps the folder's run id
    log = MetricsLog(tmp_path / "metrics.jsonl", append=True, stage="ppo")
    log.text(2, "samples/ppo", "| a |")
    log.close()
    assert calls == [("init", "abc123", "allow"), ("log", 1, {"ppo/reward": 2.0, "monitors/response_length": 7.0}),
                     ("finish",), ("init", "abc123", "allow"), ("log", 2, {"samples/ppo": "<pre>| a |</pre>"}),
                     ("finish",)]
    assert not list(tmp_path.glob(tracking.EVENT_GLOB))  # TensorBoard was not asked for
    # W&B's files are a run's own: --overwrite replaces them (a folder of other files would be refused)
    (tmp_path / "wandb").mkdir()
    assert is_ours(tmp_path / "wandb") and is_ours(tmp_path / "wandb_run_id")
    assert check_out(tmp_path, overwrite=True) == tmp_path
    clear_out(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_tracker_settings_fail_clearly(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv(tracking.TRACKERS_ENV, "tensorbord")
    with pytest.raises(ValueError, match="RLHF_LITE_TRACKERS='tensorbord': unknown tracker 'tensorbord'"):
        tracking.check_trackers()
    monkeypatch.setattr(tracking, "_available", lambda name: False)
    monkeypatch.setenv(tracking.TRACKERS_ENV, "tensorboard")
    with pytest.raises(ValueError, match="the 'tensorboard' package is not installed"):
        tracking.check_trackers()
    # the default without the package: one line, and metrics.jsonl as always
    monkeypatch.delenv(tracking.TRACKERS_ENV)
    monkeypatch.setattr(tracking, "_warned_missing", False)
    for _ in range(2):
        log = MetricsLog(tmp_path / "metrics.jsonl", stage="rm")
        log.log({"step": 1, "loss": 0.5})
        log.close()
    err = capsys.readouterr().err
    assert err.count("no TensorBoard event files (pip install tensorboard") == 1 and len(err.splitlines()) == 1
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 0.5}]
    assert not list(tmp_path.glob(tracking.EVENT_GLOB))
    monkeypatch.setenv(tracking.TRACKERS_ENV, "none")
    assert tracking.check_trackers() == []
