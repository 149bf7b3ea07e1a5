"""The main job: data check, SFT, RM, vanilla PPO and PPO-max, then a report, for any profile.

``--reuse`` keeps the stages of an earlier pipeline run in the same folder, but only those made from the
same inputs: each stage's recorded provenance (its seed, config, model settings and the fingerprints of
the data and of the models it read) must equal what this run would use, else the difference is named. A
PPO run that stopped (Ctrl-C, a kill) continues from its checkpoint, and one with fewer iterations than
asked is extended from it.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from .outdir import check_out, clear_out, contents
from .profiles import TINY, Profile
from .provenance import differences, recorded
from .utils import DATA_DIR, Stopwatch, read_json, write_json
from .validate import check_data as check_rows

STAGES = ("sft", "rm", "vanilla", "ppo_max")


def check_data(data_dir: str | Path = DATA_DIR) -> dict[str, int]:
    """Load and validate every data file (a bad row names its file and line); returns row counts."""
    return check_rows(data_dir).rows


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def check_pipeline_out(out: Path, reuse: bool, overwrite: bool) -> None:
    """Refuse an ``--out`` that holds anything but a pipeline run to reuse, or a run to replace (before
    anything loads)."""
    if reuse and out.is_dir() and (out / "summary.json").is_file():
        stage = read_json(out / "summary.json").get("stage", "pipeline")
        if stage != "pipeline":
            raise ValueError(f"--out {out} holds a finished {stage} run, not a pipeline run: --reuse keeps the "
                             "stages of an earlier pipeline run in the same folder")
    check_out(out, overwrite or reuse, hint="pass --reuse to keep its finished stages, or ")


def _reusable(folder: Path, expected: dict, overwrite: bool) -> bool:
    """Whether the finished stage in ``folder`` was made from ``expected``; a difference is an error naming
    it, unless ``overwrite`` (then the stage runs again)."""
    diff = differences(recorded(folder / "summary.json"), expected, "in the run", "now")
    if not diff:
        return True
    if not overwrite:
        raise ValueError(f"cannot reuse {folder}: {'; '.join(diff)}; pass --overwrite to redo the stages that "
                         "differ, or choose another --out")
    print(f"      {folder.name} differs ({diff[0]}{'; ...' if len(diff) > 1 else ''}): running it again")
    return False


def _stage(folder: Path, reuse: bool, overwrite: bool, expected, run) -> dict:
    """Run a stage unless ``reuse`` and its finished summary records the ``expected()`` provenance."""
    if reuse and (folder / "summary.json").is_file() and _reusable(folder, expected(), overwrite):
        return read_json(folder / "summary.json")
    if reuse and folder.is_dir() and contents(folder):
        print(f"      {folder} holds no finished run of these settings: running it again")
    return run()


def _ppo_stage(folder: Path, reuse: bool, overwrite: bool, cfg, expected, run) -> dict:
    """A PPO stage with ``--reuse``: a finished run of the same config and inputs is kept; a stopped one, or
    one with fewer iterations, continues from its checkpoint (``run(resume)``); nothing else may differ."""
    from .ppo.checkpoint import check_checkpoint, find_checkpoint

    if not reuse:
        return run(False)
    summary, problem = folder / "summary.json", None
    if summary.is_file() and not read_json(summary).get("interrupted"):
        diff = differences({**recorded(summary), "config": read_json(summary).get("config")},
                           {**expected(), "config": cfg.to_dict()}, "in the run", "now")
        if not diff:
            return read_json(summary)
        problem = f"cannot reuse {folder}: {'; '.join(diff)}"
    if find_checkpoint(folder / "checkpoint") is not None:
        try:  # a reuse may only extend a run: iterations is the one setting that can change
            check_checkpoint(folder / "checkpoint", cfg, expected(), changeable=("iterations",))
            print(f"      {folder.name}: continuing from its checkpoint")
            return run(True)
        except ValueError as e:
            problem = str(e)
    if problem and not overwrite:
        raise ValueError(f"{problem}; pass --overwrite to redo the stages that differ, or choose another --out")
    if folder.is_dir() and contents(folder):
        print(f"      {folder.name} holds no finished run of these settings: running it again")
    return run(False)


def run_pipeline(out_dir: str | Path, seed: int = 0, data_dir: str | Path = DATA_DIR, iterations: int | None = None,
                 reuse: bool = False, profile: Profile = TINY, ppo_changes: dict | None = None,
                 overwrite: bool = True) -> dict:
    """Run every stage of ``profile`` into ``out_dir/{sft,rm,vanilla,ppo_max}``; write report.md and summary.json.

    ``ppo_changes`` (``{"field": value}``, dotted names for nested fields) apply to both PPO runs after their
    preset; ``iterations`` is one of them. ``reuse``: keep the stages already in ``out_dir`` that were made
    from the same inputs (see the module docstring); ``overwrite``: replace what ``out_dir`` holds (with
    ``reuse``: redo only the stages that differ). Without either, a non-empty ``out_dir`` is refused. A PPO
    stage stopped by Ctrl-C ends the pipeline (``--reuse`` continues it)."""
    from .ppo.stage import ppo_provenance, run_ppo
    from .provenance import rm_provenance, sft_provenance
    from .rm import train_rm
    from .settings import replace_fields, revalidate
    from .sft import train_sft
    from .stage import SFTRun

    timer = Stopwatch()
    out, data_dir = Path(out_dir), Path(data_dir)
    profile.validate()
    sft_cfg, rm_cfg = replace(profile.sft, seed=seed), replace(profile.rm, seed=seed)
    ppo_cfgs = {}
    for name in ("vanilla", "ppo_max"):  # fail on impossible PPO settings before any training starts
        changes = {**(ppo_changes or {}), **({"iterations": iterations} if iterations is not None else {}),
                   "seed": seed}
        cfg = replace_fields(profile.ppo_config(name), changes, "PPOConfig")
        cfg.validate(profile.context_length)
        ppo_cfgs[name] = cfg
    check_pipeline_out(out, reuse, overwrite)
    data = check_rows(data_dir)
    world = data.kind == "world"
    revalidate(sft_cfg, data.rows, world)
    revalidate(rm_cfg, data.rows, world)
    for cfg in ppo_cfgs.values():
        revalidate(cfg, profile.context_length, data.rows)
    counts = data.rows
    if not reuse:
        clear_out(out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"[1/5] data check ({profile.name} profile): {counts}")
    sft = _stage(out / "sft", reuse, overwrite, lambda: sft_provenance(sft_cfg, profile, data_dir),
                 lambda: train_sft(out / "sft", sft_cfg, data_dir, profile))
    print(f"[2/5] SFT: gold {_fmt(sft.get('gold_score_before'))} -> {_fmt(sft.get('gold_score_after'))} "
          f"(demonstrations {_fmt(sft.get('gold_score_demos'))}), {sft['wall_seconds']:.0f}s")
    rm = _stage(out / "rm", reuse, overwrite, lambda: rm_provenance(rm_cfg, profile, out / "sft" / "model", data_dir),
                lambda: train_rm(out / "rm", out / "sft", rm_cfg, data_dir, profile))
    print(f"[3/5] RM: test accuracy {rm['test_accuracy']:.3f}, gold agreement {_fmt(rm.get('gold_agreement'))}, "
          f"padding gain RM {_fmt(rm.get('padding_rm_gain'), '+.3f')} / gold "
          f"{_fmt(rm.get('padding_gold_change'), '+.3f')}, {rm['wall_seconds']:.0f}s")
    runs = {}
    for i, name in enumerate(("vanilla", "ppo_max"), start=4):
        cfg = ppo_cfgs[name]
        runs[name] = _ppo_stage(
            out / name, reuse, overwrite, cfg,
            lambda c=cfg: ppo_provenance(c, SFTRun.open(out / "sft"), out / "rm", data_dir, profile),
            lambda resume, n=name, c=cfg: run_ppo(out / n, out / "sft", out / "rm", c, n, data_dir, resume=resume,
                                                  profile=profile))
        s = runs[name]
        if s["interrupted"]:
            print(f"[{i}/5] PPO {name} stopped at iteration {s['iterations']}: continue the pipeline with "
                  f"`python -m rlhf_lite pipeline --reuse --out {out}` and the same settings")
            return {"stage": "pipeline", "interrupted": True, "sft": sft, "rm": rm, **runs}
        print(f"[{i}/5] PPO {name}: gold {_fmt(s['initial_gold_score'])} -> {_fmt(s['final_gold_score'])}, reward "
              f"{s['initial_reward']:.2f} -> {s['final_reward']:.2f}, collapse: {s['collapse_detected']}, "
              f"{s['wall_seconds']:.0f}s")
    summary = {"stage": "pipeline", "profile": profile.name, "data": counts, "sft": sft, "rm": rm, **runs,
               "wall_seconds": timer()}
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
    spread across seeds is PPO's own. ``reuse``: keep finished runs of the same config and inputs (others run
    again, with a note).
    """
    from .ppo.stage import ppo_provenance, run_ppo
    from .stage import SFTRun

    out = Path(out_dir)
    cfgs = {(p, s): profile.ppo_config(p, seed=s, **({"iterations": iterations} if iterations is not None else {}))
            for p in presets for s in seeds}
    for cfg in cfgs.values():
        cfg.validate()
    rows = []
    for (preset, seed), cfg in cfgs.items():
        run_dir = out / f"{preset}_seed{seed}"
        s = _ppo_stage(run_dir, reuse, True, cfg,
                       lambda c=cfg: ppo_provenance(c, SFTRun.open(sft_dir), Path(rm_dir), Path(data_dir), profile),
                       lambda resume, d=run_dir, c=cfg, p=preset: run_ppo(d, sft_dir, rm_dir, c, p, data_dir,
                                                                          resume=resume, profile=profile))
        rows.append(sweep_row(preset, seed, s))
        print(f"{preset} seed {seed}: gold {s['initial_gold_score']:.3f} -> {s['final_gold_score']:.3f}, "
              f"collapse {s['collapse_detected']}")
    write_json(out / "sweep.json", {"sft": str(sft_dir), "rm": str(rm_dir), "rows": rows})
    return rows
