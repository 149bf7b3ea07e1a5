"""Reliability, class 2: a resume or a reuse continues the same run, or names what differs.

``ppo --resume`` continues with the checkpoint's own settings (only the listed fields may change) and checks
the SFT model, the RM, the data and the model settings against the run's provenance before any model loads;
``pipeline --reuse`` keeps a stage only when its recorded provenance equals this run's, continues a stopped
or shorter PPO run from its checkpoint, and otherwise names the difference.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from rlhf_lite import cli
from rlhf_lite.pipeline import run_pipeline
from rlhf_lite.ppo.config import VANILLA, CollapseBands
from rlhf_lite.ppo.stage import run_ppo
from rlhf_lite.profiles import TINY
from rlhf_lite.provenance import differences, sft_provenance
from rlhf_lite.utils import read_metrics, write_json
from tests.conftest import SMALL, SMALL_LORA
from tests.reliability import (
    boom,
    cli_error,
    copy_data,
    edit_line,
    no_models,
    one_line,
    small_world,
    write_rm,
    write_sft,
)

PROFILE = replace(
    TINY, lora=SMALL_LORA, model=replace(TINY.model, tiny=SMALL),
    sft=replace(TINY.sft, batch_size=8, n_eval_prompts=8), rm=replace(TINY.rm, batch_size=8, n_fresh_prompts=4),
    ppo=replace(VANILLA, iterations=2, rollout_batch=8, minibatch_size=4, ppo_epochs=1, max_new_tokens=6,
                gold_every=100, sample_every=100, checkpoint_every=0, collapse=CollapseBands(baseline_iterations=1,
                                                                                             patience=1)))
FLAGS = ["--lora.r", "4", "--lora.alpha", "8", "--model.tiny.hidden-size", "64", "--model.tiny.num-layers", "2",
         "--model.tiny.num-heads", "2", "--model.tiny.intermediate-size", "128", "--model.tiny.max-positions", "64"]
from tests.reliability import quiet_progress  # noqa: F401 (autouse: no progress bars on stderr)


@pytest.fixture(autouse=True)
def no_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("rlhf_lite.plotting.plot_ppo", lambda *a, **k: None)


def _pipeline_folder(out: Path, world: Path) -> Path:
    """A pipeline run as ``run_pipeline`` leaves it: SFT and RM stages (random models, their provenance) and
    a real vanilla PPO run of 2 iterations with its final checkpoint."""
    sft = write_sft(out / "sft", world)
    write_json(sft / "summary.json", {"stage": "sft", "provenance": sft_provenance(PROFILE.sft, PROFILE, world),
                                      "wall_seconds": 0.0})
    rm = write_rm(out / "rm", sft, world, PROFILE.rm, PROFILE)
    write_json(rm / "summary.json", {**json.loads((rm / "summary.json").read_text()), "test_accuracy": 0.5,
                                     "wall_seconds": 0.0})
    run_ppo(out / "vanilla", sft, rm, PROFILE.ppo_config("vanilla"), "vanilla", world, profile=PROFILE)
    return out


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("resume")
    world = small_world(root / "world")
    pipeline = _pipeline_folder(root / "pipeline", world)
    other_sft = write_sft(root / "other_sft", world, seed=1)
    other = copy_data(world, root / "other_world")
    edit_line(other / "prompts_train.jsonl", 3, lambda r: json.loads((world / "prompts_train.jsonl").read_text()
                                                                     .splitlines()[0]))
    return {"world": world, "pipeline": pipeline, "run": pipeline / "vanilla", "sft": pipeline / "sft",
            "rm": pipeline / "rm", "other_sft": other_sft,
            "other_pair_rm": write_rm(root / "other_pair_rm", other_sft, world, PROFILE.rm, PROFILE, seed=2),
            "other_rm": write_rm(root / "other_rm", pipeline / "sft", world, PROFILE.rm, PROFILE, seed=1),
            "other_world": other, "empty": root / "nothing",
            "moved_sft": shutil.copytree(pipeline / "sft", root / "moved" / "sft"),
            "moved_rm": shutil.copytree(pipeline / "rm", root / "moved" / "rm")}


# (id, flags after `ppo --resume RUN`, the one-line error; None: accepted, on to the model)
RESUMES = [
    ("another-sft-rm-pair", ["--sft", "{other_sft}", "--rm", "{other_pair_rm}"],
     (r"cannot resume from \S+/checkpoint: it continues another run \(rm: \S+/rm \(sha256 \w+\) in the checkpoint, "
     r"\S+/other_pair_rm \(sha256 \w+\) now; sft_model: \S+/sft/model \(sha256 \w+\) in the checkpoint, "
     r"\S+/other_sft/model \(sha256 \w+\) now\)")),
    ("another-rm", ["--rm", "{other_rm}"], (r"it continues another run \(rm: \S+/rm \(sha256 \w+\) in the checkpoint, "
     r"\S+/other_rm \(sha256 \w+\) now\)$")),
    ("other-data", ["--data", "{other_world}"], (r"it continues another run \(data: \S+/world \(sha256 \w+\) in the "
     r"checkpoint, \S+/other_world \(sha256 \w+\) now\)$")),
    ("another-seed", ["--seed", "1"], (r"--resume \S+/vanilla continues its run with its own settings; these cannot "
     r"change: seed: 0 in the checkpoint, 1 requested \(changeable: iterations, policy_lr, critic_lr")),
    ("another-preset", ["--preset", "ppo_max"],
     r"--preset ppo_max: the run in \S+/vanilla is 'vanilla', and a resume keeps its preset"),
    ("a-fixed-setting", ["--kl-coef", "0.3"], r"these cannot change: kl_coef: null in the checkpoint, 0\.3 requested"),
    ("a-nested-fixed-setting", ["--collapse.patience", "5"],
     r"these cannot change: collapse\.patience: 1 in the checkpoint, 5 requested"),
    ("iterations-below-reached", ["--iterations", "1"],
     r"PPOConfig\.iterations \(1\) is below the iteration it reached \(2\)"),
    ("other-model-settings", ["--model.dtype", "float32"],
     r"it continues another run \(model\.dtype: \"auto\" in the checkpoint, \"float32\" now\)"),
    ("other-lora-settings", ["--lora.r", "8"], r"the reward model in \S+/rm has LoRA settings LoraSettings\(r=4"),
    ("moved-folders-accepted", ["--sft", "{moved_sft}", "--rm", "{moved_rm}"], None),
    ("lower-lr-accepted", ["--policy-lr", "1e-4", "--iterations", "3"], None),
]

CASES = {f"resume/{c[0]}": "error" if c[2] else "recovery" for c in RESUMES} | {f"resume/{n}": k for n, k in [
    ("no-checkpoint", "error"), ("settings-from-the-checkpoint", "recovery"), ("differences-by-name", "recovery"),
    ("reuse-another-seed", "error"), ("reuse-another-stage-setting", "error"), ("reuse-other-data", "error"),
    ("reuse-fewer-iterations", "error"), ("reuse-more-iterations-extends", "recovery"),
    ("reuse-overwrite-redoes-only-what-differs", "recovery"), ("stopped-stage-ends-the-pipeline", "recovery"),
    ("reuse-continues-a-stopped-stage", "recovery")]}


@pytest.mark.parametrize("flags, message", [pytest.param(*c[1:], id=c[0]) for c in RESUMES])
def test_resume_continues_the_same_run(flags, message, env, capsys, monkeypatch) -> None:
    no_models(monkeypatch)
    before = (env["run"] / "checkpoint" / "meta.json").read_text()
    argv = ["ppo", "--resume", env["run"], "--data", env["world"], *FLAGS, *[f.format(**env) for f in flags]]
    if message is None:
        with pytest.raises(AssertionError, match="a model was loaded"):  # every check passed
            cli.main([str(a) for a in argv])
    else:
        code, err = cli_error(argv, capsys)
        assert code == 2 and re.search(message, one_line(err)), err
    assert (env["run"] / "checkpoint" / "meta.json").read_text() == before


def test_no_checkpoint(env, capsys) -> None:
    code, err = cli_error(["ppo", "--resume", env["empty"], "--sft", env["sft"], "--rm", env["rm"]], capsys)
    assert code == 2 and one_line(err) == f"error: {env['empty'] / 'checkpoint'} holds no complete checkpoint: " \
                                          "nothing to resume"


def test_settings_from_the_checkpoint(env) -> None:
    """A resume needs no settings: they, the preset and the SFT and RM folders come from the run; the flags
    given change only the changeable fields."""
    args = cli.build_parser().parse_args(["ppo", "--resume", str(env["run"]), "--policy-lr", "1e-4",
                                          "--iterations", "5"])
    cfg, preset = cli._resume_settings(args, cli.config_changes(args))
    assert preset == "vanilla" and args.sft == str(env["sft"].resolve()) and args.rm == str(env["rm"].resolve())
    assert cfg == replace(PROFILE.ppo_config("vanilla"), policy_lr=1e-4, iterations=5)


def test_differences_by_name() -> None:
    then = {"data": {"path": "/a/data", "sha256": "1"}, "seed": 0, "config": {"lr": 1.0, "collapse": {"patience": 2}},
            "policy_base": "/a/sft/model"}
    assert differences(then, {**then, "data": {"path": "/b/data", "sha256": "1"}, "policy_base": "/b"}) == []
    assert differences(then, {**then, "config": {"lr": 2.0, "collapse": {"patience": 3}}, "lora": {"r": 4}}) == [
        "config.collapse.patience: 2 then, 3 now", "config.lr: 1.0 then, 2.0 now",
        'lora: not recorded then (a run of an older version), {"r": 4} now']
    assert differences(then, {**then, "data": {"path": "/a/data", "sha256": "2"}}) == [
        "data: /a/data (sha256 1) then, /a/data (sha256 2) now"]


# ----- pipeline --reuse -------------------------------------------------------------------------------
SHORT = {"critic_pretrain_iterations": 0}  # PPO-max's 5 critic-only iterations do not fit these short runs
@pytest.fixture
def pipeline(env, tmp_path, monkeypatch) -> Path:
    """A copy of the pipeline folder; SFT and RM training are forbidden (a reuse must not retrain them)."""
    monkeypatch.setattr("rlhf_lite.sft.train_sft", boom)
    monkeypatch.setattr("rlhf_lite.rm.train_rm", boom)
    return Path(shutil.copytree(env["pipeline"], tmp_path / "pipeline"))


@pytest.mark.parametrize("changes, message", [
    pytest.param({"seed": 1}, r"cannot reuse \S+/sft: config\.seed: 0 in the run, 1 now; seed: 0 in the run, 1 now; "
                 r"pass --overwrite to redo the stages that differ", id="reuse-another-seed"),
    pytest.param({"profile": replace(PROFILE, sft=replace(PROFILE.sft, sft_steps=40))},
                 r"cannot reuse \S+/sft: config\.sft_steps: 400 in the run, 40 now;", id="reuse-another-stage-setting"),
    pytest.param({"data_dir": "other_world"}, r"cannot reuse \S+/sft: data: \S+/world \(sha256 \w+\) in the run, "
                 r"\S+/other_world \(sha256 \w+\) now", id="reuse-other-data"),
    pytest.param({"iterations": 1}, r"cannot resume from \S+/vanilla/checkpoint: PPOConfig\.iterations \(1\) is below "
                 r"the iteration it reached \(2\); pass --overwrite", id="reuse-fewer-iterations"),
])
@pytest.mark.filterwarnings("ignore:CollapseBands")  # 1 iteration is too short for the detector: warned
def test_reuse_names_what_differs(changes, message, pipeline, env) -> None:
    kwargs = {"seed": 0, "data_dir": env["world"], "profile": PROFILE, **changes}
    if kwargs["data_dir"] == "other_world":
        kwargs["data_dir"] = env["other_world"]
    with pytest.raises(ValueError) as err:
        run_pipeline(pipeline, reuse=True, overwrite=False, ppo_changes=SHORT, **kwargs)
    assert re.search(message, str(err.value)), err.value


def test_reuse_more_iterations_extends(pipeline, env, capsys) -> None:
    summary = run_pipeline(pipeline, 0, env["world"], iterations=3, reuse=True, profile=PROFILE, overwrite=False,
                           ppo_changes=SHORT)
    assert "vanilla: continuing from its checkpoint" in capsys.readouterr().out
    assert [r["iteration"] for r in read_metrics(pipeline / "vanilla" / "metrics.jsonl") if "event" not in r] == [
        0, 1, 2, 3]
    assert summary["vanilla"]["iterations"] == 3 == summary["ppo_max"]["iterations"]
    assert (pipeline / "report.md").is_file()


class Stop(Exception):
    pass


def _fake_ppo(calls: list, result: dict | None = None):
    def run(out, *args, resume=False, **kwargs):
        calls.append((Path(out).name, resume))
        if result is None:
            raise Stop
        return result
    return run


def test_reuse_overwrite_redoes_only_what_differs(pipeline, env, monkeypatch) -> None:
    calls = []
    monkeypatch.setattr("rlhf_lite.rm.train_rm", lambda *a, **k: calls.append("rm") or json.loads(
        (pipeline / "rm" / "summary.json").read_text()))
    monkeypatch.setattr("rlhf_lite.ppo.stage.run_ppo", _fake_ppo(calls))
    with pytest.raises(Stop):
        run_pipeline(pipeline, 0, env["world"], reuse=True, overwrite=True,
                     profile=replace(PROFILE, rm=replace(PROFILE.rm, steps=70)), ppo_changes=SHORT)
    assert calls == ["rm", ("ppo_max", False)]  # SFT kept, RM redone (to the same files here), vanilla kept


def test_stopped_stage_ends_the_pipeline(pipeline, env, capsys, monkeypatch) -> None:
    calls = []
    monkeypatch.setattr("rlhf_lite.ppo.stage.run_ppo", _fake_ppo(calls, {"interrupted": True, "iterations": 1}))
    (pipeline / "vanilla" / "summary.json").unlink()  # as a stopped run that did not finish leaves it
    result = run_pipeline(pipeline, 0, env["world"], iterations=3, reuse=True, profile=PROFILE, overwrite=False,
                          ppo_changes=SHORT)
    assert result["interrupted"] and calls == [("vanilla", True)] and not (pipeline / "report.md").exists()
    assert f"continue the pipeline with `python -m rlhf_lite pipeline --reuse --out {pipeline}`" in \
        capsys.readouterr().out


def test_reuse_continues_a_stopped_stage(pipeline, env, monkeypatch) -> None:
    calls = []
    monkeypatch.setattr("rlhf_lite.ppo.stage.run_ppo", _fake_ppo(calls))
    path = pipeline / "vanilla" / "summary.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "interrupted": True}))
    with pytest.raises(Stop):
        run_pipeline(pipeline, 0, env["world"], reuse=True, profile=PROFILE, overwrite=False, ppo_changes=SHORT)
    assert calls == [("vanilla", True)]
