"""Sweeps as data, their results files and the checks that keep them from going stale; the gold schedule."""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pytest

from rlhf_lite import results as results_mod
from rlhf_lite import sweeps
from rlhf_lite.ppo.config import PPO_MAX_CHANGES, PRESETS, VANILLA, PPOConfig, get_preset
from rlhf_lite.ppo.trainer import PPOTrainer
from rlhf_lite.stats import mean_ci, paired_bootstrap
from tests.test_robustness import CFG, no_plots, numeric_rows, tiny_setup  # noqa: F401  (no_plots: fixture)

GOLD_KEYS = ("gold_score", "eval_response_length")


def test_gold_schedule_by_hand() -> None:
    cfg = replace(VANILLA, iterations=35, gold_every=10, gold_every_early=2, gold_early_until=20)
    assert [i for i in range(1, 36) if cfg.gold_due(i)] == [2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 30, 35]
    off = replace(cfg, gold_early_until=0)
    assert [i for i in range(1, 36) if off.gold_due(i)] == [10, 20, 30, 35]
    with pytest.raises(ValueError, match="gold_early_until"):
        replace(cfg, gold_early_until=-1).validate()
    with pytest.raises(ValueError, match="gold_every_early"):
        replace(cfg, gold_every_early=0).validate()


def test_early_gold_measurements_add_rows_and_change_no_training_number(tmp_path: Path) -> None:
    """The denser early schedule only adds gold measurements: every other logged number is the same."""
    rows = {}
    for name, early in (("sparse", 0), ("dense", 4)):
        cfg = replace(CFG, gold_every=100, gold_every_early=2, gold_early_until=early)
        PPOTrainer(cfg, tiny_setup(), tmp_path / name).train()
        rows[name] = numeric_rows(tmp_path / name / "metrics.jsonl")
    gold_at = {n: [r["iteration"] for r in rs if "gold_score" in r] for n, rs in rows.items()}
    assert gold_at == {"sparse": [0, 4], "dense": [0, 2, 4]}

    def training(rs):
        return [{k: v for k, v in r.items() if k not in GOLD_KEYS and not k.startswith("gold/")} for r in rs]
    assert training(rows["sparse"]) == training(rows["dense"])
    compact = sweeps.compact_run(tmp_path / "dense")
    assert compact["series"]["iteration"] == [1, 2, 3, 4] and compact["gold"]["iteration"] == [0, 2, 4]
    assert compact["gold"]["gold_score"][1] == pytest.approx(rows["dense"][2]["gold_score"], rel=1e-4)


def test_every_ppo_max_trick_has_its_leave_one_out_preset() -> None:
    ppo_max = get_preset("ppo_max")
    removed = {}
    for name, p in PRESETS.items():
        if name.startswith("ppo_max_minus_"):
            assert p.parent == "ppo_max"
            restored = {k for k in p.changes if p.changes[k] == getattr(VANILLA, k)}
            assert restored == set(p.changes), name  # each one puts vanilla's value back
            removed[name] = set(p.changes)
    covered = set().union(*removed.values()) | {"critic_init"}  # critic from the RM: critic_from_sft
    assert covered == set(PPO_MAX_CHANGES) and get_preset("critic_from_sft").critic_init == "sft" != ppo_max.critic_init
    assert get_preset("entropy_bonus").entropy_target <= 0.21 < get_preset("entropy_bonus_1.0").entropy_target


def test_ablation_runs_make_the_same_number_of_policy_updates() -> None:
    sweep = sweeps.get_sweep("ablations")
    cfgs = {v.label: sweep.config(v, 1) for v in sweep.variants}
    assert {c.iterations - c.critic_pretrain_iterations for c in cfgs.values()} == {30}
    assert cfgs["vanilla"].iterations == 30 and cfgs["ppo_max"].iterations == 35 and cfgs["critic_pretrain"].iterations == 35
    assert {(c.rollout_batch, c.minibatch_size, c.seed) for c in cfgs.values()} == {(32, 16, 1)}
    assert [cfgs[f"kl_{e}"].kl_coef for e in (0.01, 0.02, 0.05, 0.1)] == [0.01, 0.02, 0.05, 0.1]
    for label, cfg in cfgs.items():  # apart from the budget, each run is its preset
        preset = get_preset(sweep.variant(label).preset)
        changed = {f.name for f in fields(PPOConfig) if getattr(cfg, f.name) != getattr(preset, f.name)}
        assert changed <= {"rollout_batch", "minibatch_size", "iterations", "seed", "kl_coef"}, label
    assert sweeps.get_sweep("seeds").config(sweeps.get_sweep("seeds").variant("ppo_max"), 0) == get_preset("ppo_max")
    with pytest.raises(ValueError, match="unknown sweep"):
        sweeps.get_sweep("nope")


def fake_results(name: str = "seeds", n_prompts: int = 8) -> dict:
    """A results file as sweeps.run writes it, with made-up numbers."""
    sweep = sweeps.get_sweep(name)
    rng = np.random.default_rng(0)
    runs = []
    for i, v in enumerate(sweep.variants):
        for s in sweep.seeds:
            runs.append({"label": v.label, "preset": v.preset, "group": v.group, "seed": s,
                         "config": sweep.config(v, s).to_dict(),
                         "summary": {"final_gold_score": 0.1 * i + 0.01 * s, "collapse_detected": i == 0 and s < 2},
                         "series": {"iteration": [1, 2, 3], "reward": [float(s), s + 1.0, s + 2.0 + i]},
                         "gold": {"iteration": [0, 2], "gold_score": [0.5, 0.5 + s]},
                         "final": {"score": 0.2 * i + s, "per_prompt": list(rng.normal(i, 1, n_prompts))}})
    return {"sweep": name, "sft": {"folder": "sft/model", "sha256": "a" * 16}, "rm": {"folder": "rm/reward",
            "sha256": "b" * 16}, "sft_final": {"per_prompt": list(rng.normal(0, 1, n_prompts))}, "runs": runs}


def test_stale_results_are_refused_naming_the_command(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("rlhf_lite.notebook.RUNS", tmp_path)  # no local SFT/RM folders: fingerprints unchecked
    res = fake_results()
    sweeps.check_results(res, "seeds.json")
    res["runs"][3]["config"]["kl_coef"] = 0.1
    with pytest.raises(sweeps.StaleResults, match=r"ppo_max seed 0: kl_coef 0.1 -> 0.2.*python -m rlhf_lite.sweeps seeds"):
        sweeps.check_results(res, "seeds.json")
    res = fake_results()
    res["runs"].pop()
    with pytest.raises(sweeps.StaleResults, match="ppo_max seed 2: missing"):
        sweeps.check_results(res, "seeds.json")
    folder = tmp_path / "sft" / "model"  # a local SFT model that is not the one the sweep used
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"other weights")
    with pytest.raises(sweeps.StaleResults, match="another SFT model"):
        sweeps.check_results(fake_results(), "seeds.json")


def test_results_aggregates_by_hand() -> None:
    res = results_mod.Results(fake_results())
    assert res.labels == ["vanilla", "ppo_max"] and res.seeds == [0, 1, 2]
    assert res.values("ppo_max", "final_gold_score") == pytest.approx([0.1, 0.11, 0.12])
    ci = res.ci("ppo_max", "final.score")
    assert ci == mean_ci([0.2, 1.2, 2.2]) and ci.mean == pytest.approx(1.2)
    assert res.collapsed("vanilla") == 2 and res.collapsed("ppo_max") == 0
    x, mean, low, high = res.band("vanilla", "reward")
    assert list(x) == [1, 2, 3] and list(mean) == [1.0, 2.0, 3.0]
    assert (low[0], high[0]) == pytest.approx((mean_ci([0, 1, 2]).low, mean_ci([0, 1, 2]).high))
    x, mean, *_ = res.band("ppo_max", "gold_score")
    assert list(x) == [0, 2] and list(mean) == [0.5, 1.5]
    want = paired_bootstrap(res.per_prompt("ppo_max").mean(axis=0), np.array(res.data["sft_final"]["per_prompt"]))
    assert res.versus("ppo_max") == want
    assert res.versus("ppo_max", "vanilla", seed=1) == paired_bootstrap(res.per_prompt("ppo_max")[1],
                                                                         res.per_prompt("vanilla")[1])
    assert res.window("vanilla", "reward", last=2) == [1.5, 2.5, 3.5]
    with pytest.raises(KeyError, match="no variant 'nope'"):
        res.runs("nope")


def test_grades() -> None:
    g = results_mod
    assert (g.grade(True), g.grade(False, True), g.grade(False)) == ("reproduced", "partly", "differs")
    assert g.over_seeds(["reproduced"] * 3) == "reproduced" and g.over_seeds(["differs"] * 3) == "differs"
    assert g.over_seeds(["reproduced", "differs", "reproduced"]) == "partly"
    assert g.tally(["reproduced", "partly", "partly", "differs"]) == "1 reproduced, 2 partly, 1 differs (of 4)"
