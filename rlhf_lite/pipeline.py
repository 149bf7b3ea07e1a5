"""The main job: data check, SFT, RM, vanilla PPO and PPO-max, then a report, for any profile."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from . import data as data_mod
from .profiles import TINY, Profile
from .utils import DATA_DIR, Stopwatch, read_json, write_json

DATA_FILES = {
    "sft.jsonl": data_mod.load_sft,
    "prefs_train.jsonl": data_mod.load_preference_pairs,
    "prefs_test.jsonl": data_mod.load_preference_pairs,
    "prompts_train.jsonl": data_mod.load_prompts,
    "prompts_test.jsonl": data_mod.load_prompts,
}


def check_data(data_dir: str | Path = DATA_DIR) -> dict[str, int]:
    """Load and validate every data file (a bad row names its file and line); returns row counts."""
    data_dir = Path(data_dir)
    data_mod.data_kind(data_dir)  # a data folder has its stats.json
    return {name: len(loader(data_dir / name)) for name, loader in DATA_FILES.items()}


def _stage(out: Path, reuse: bool, run) -> dict:
    """Run a stage unless ``reuse`` and its summary.json exists already."""
    if reuse and (out / "summary.json").exists():
        return read_json(out / "summary.json")
    return run()


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def run_pipeline(out_dir: str | Path, seed: int = 0, data_dir: str | Path = DATA_DIR, iterations: int | None = None,
                 reuse: bool = False, profile: Profile = TINY, ppo_changes: dict | None = None) -> dict:
    """Run every stage of ``profile`` into ``out_dir/{sft,rm,vanilla,ppo_max}``; write report.md and summary.json.

    ``ppo_changes`` (``{"field": value}``, dotted names for nested fields) apply to both PPO runs after their
    preset; ``iterations`` is one of them."""
    from .ppo.stage import run_ppo
    from .rm import train_rm
    from .settings import replace_fields
    from .sft import train_sft

    timer = Stopwatch()
    out = Path(out_dir)
    profile.validate()
    sft_cfg, rm_cfg = replace(profile.sft, seed=seed), replace(profile.rm, seed=seed)
    ppo_cfgs = {}
    for name in ("vanilla", "ppo_max"):  # fail on impossible PPO settings before any training starts
        changes = {**(ppo_changes or {}), **({"iterations": iterations} if iterations else {}), "seed": seed}
        cfg = replace_fields(profile.ppo_config(name), changes, "PPOConfig")
        cfg.validate(profile.context_length)
        ppo_cfgs[name] = cfg
    counts = check_data(data_dir)
    out.mkdir(parents=True, exist_ok=True)
    print(f"[1/5] data check ({profile.name} profile): {counts}")
    sft = _stage(out / "sft", reuse, lambda: train_sft(out / "sft", sft_cfg, data_dir, profile))
    print(f"[2/5] SFT: gold {_fmt(sft.get('gold_score_before'))} -> {_fmt(sft.get('gold_score_after'))} "
          f"(demonstrations {_fmt(sft.get('gold_score_demos'))}), {sft['wall_seconds']:.0f}s")
    rm = _stage(out / "rm", reuse, lambda: train_rm(out / "rm", out / "sft", rm_cfg, data_dir, profile))
    print(f"[3/5] RM: test accuracy {rm['test_accuracy']:.3f}, gold agreement {_fmt(rm.get('gold_agreement'))}, "
          f"padding gain RM {_fmt(rm.get('padding_rm_gain'), '+.3f')} / gold "
          f"{_fmt(rm.get('padding_gold_change'), '+.3f')}, {rm['wall_seconds']:.0f}s")
    runs = {}
    for i, name in enumerate(("vanilla", "ppo_max"), start=4):
        runs[name] = _stage(out / name, reuse, lambda n=name: run_ppo(out / n, out / "sft", out / "rm", ppo_cfgs[n],
                                                                       n, data_dir, profile=profile))
        s = runs[name]
        print(f"[{i}/5] PPO {name}: gold {_fmt(s['initial_gold_score'])} -> {_fmt(s['final_gold_score'])}, reward "
              f"{s['initial_reward']:.2f} -> {s['final_reward']:.2f}, collapse: {s['collapse_detected']}, "
              f"{s['wall_seconds']:.0f}s")
    summary = {"profile": profile.name, "data": counts, "sft": sft, "rm": rm, **runs, "wall_seconds": timer()}
    write_json(out / "summary.json", summary)
    write_report(out, summary)
    print(f"done in {timer():.0f}s: {out / 'report.md'}")
    return summary


def comparison_rows(summary: dict) -> list[tuple[str, str, str, str, str, str]]:
    """(model, gold, RM reward, KL, length, collapse) rows of the headline table."""
    sft = summary["sft"]
    rows = [("SFT", _fmt(sft.get("gold_score_after")), "-", "0", _fmt(sft.get("response_length_after"), ".1f"), "-")]
    for name in ("vanilla", "ppo_max"):
        s = summary[name]
        collapse = f"yes (iteration {s['collapse_iteration']})" if s["collapse_detected"] else "no"
        gold = "-" if s["final_gold_score"] is None else f"{s['final_gold_score']:.3f} (peak {s['peak_gold_score']:.3f})"
        rows.append((name, gold, f"{s['final_reward']:.2f}", f"{s['final_kl']:.3f}",
                     f"{s['final_response_length']:.1f}", collapse))
    return rows


def write_report(out: Path, summary: dict) -> None:
    """report.md: the headline comparison, the RM's diagnostics and the plots."""
    from .plotting import plot_ppo

    plot_ppo([out / "vanilla", out / "ppo_max"], out / "vanilla_vs_ppo_max.png", labels=["vanilla", "ppo_max"],
             sft_gold=summary["sft"].get("gold_score_after"))
    rm = summary["rm"]
    lines = [
        f"# rlhf_lite pipeline report ({summary.get('profile', 'tiny')} profile)",
        "",
        "Gold score: mean gold-judge score of temperature-1 samples on the 256 test prompts (fixed seed).",
        "KL: mean k1 KL(policy || reference) per response token in the last iteration.",
        "",
        "| model | gold score | RM reward | KL (nats/token) | length (tokens) | collapse |",
        "|---|---|---|---|---|---|",
        *[f"| {' | '.join(r)} |" for r in comparison_rows(summary)],
        "",
        (f"Reward model: test accuracy {rm['test_accuracy']:.3f}; agreement with the gold judge "
         f"{rm['gold_agreement']:.3f} (annotators: {rm['annotator_gold_agreement']:.3f}); padding a correct answer "
         f"changes the RM score by {rm['padding_rm_gain']:+.3f} and the gold score by "
         f"{rm['padding_gold_change']:+.3f}.") if "gold_agreement" in rm else
        f"Reward model: test accuracy {rm['test_accuracy']:.3f} (no gold judge for this data).",
        "",
        "![vanilla vs PPO-max](vanilla_vs_ppo_max.png)",
        "",
        "![SFT](sft/sft_curves.png)",
        "",
        "![reward model](rm/rm_report.png)",
        "",
        f"Total wall time: {summary['wall_seconds']:.0f} s.",
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))


def sweep_row(preset: str, seed: int, s: dict) -> dict:
    """The facts of one PPO run that the seed and ablation tables show."""
    return {
        "preset": preset, "seed": seed,
        "initial_gold_score": s["initial_gold_score"], "peak_gold_score": s["peak_gold_score"],
        "final_gold_score": s["final_gold_score"], "initial_reward": s["initial_reward"],
        "final_reward": s["final_reward"], "final_kl": s["final_kl"],
        "initial_response_length": s["initial_response_length"],
        "final_response_length": s["final_response_length"], "collapse_detected": s["collapse_detected"],
        "collapse_iteration": s["collapse_iteration"], "wall_seconds": s["wall_seconds"],
    }


def run_sweep(out_dir: str | Path, sft_dir: str | Path, rm_dir: str | Path, presets: list[str], seeds: list[int],
              iterations: int | None = None, data_dir: str | Path = DATA_DIR, reuse: bool = True,
              profile: Profile = TINY) -> list[dict]:
    """Run each preset with each seed on the same SFT model and RM; writes ``out_dir/sweep.json``.

    Only the PPO seed changes (prompt order and sampling): the SFT model and the RM are shared, so the
    spread across seeds is PPO's own.
    """
    from .ppo.stage import run_ppo

    out = Path(out_dir)
    cfgs = {(p, s): profile.ppo_config(p, seed=s, **({"iterations": iterations} if iterations else {}))
            for p in presets for s in seeds}
    for cfg in cfgs.values():
        cfg.validate()
    rows = []
    for (preset, seed), cfg in cfgs.items():
        run_dir = out / f"{preset}_seed{seed}"
        s = _stage(run_dir, reuse, lambda d=run_dir, c=cfg, p=preset: run_ppo(d, sft_dir, rm_dir, c, p, data_dir,
                                                                               profile=profile))
        rows.append(sweep_row(preset, seed, s))
        print(f"{preset} seed {seed}: gold {s['initial_gold_score']:.3f} -> {s['final_gold_score']:.3f}, "
              f"collapse {s['collapse_detected']}")
    write_json(out / "sweep.json", {"sft": str(sft_dir), "rm": str(rm_dir), "rows": rows})
    return rows
