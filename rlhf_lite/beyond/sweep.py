"""The comparison of notebook 06: vanilla PPO, PPO-max, GRPO (with and without its KL term), DPO and best-of-n,
three seeds each, on the notebooks' SFT model and reward model (tiny profile, seed 0).

    python -m rlhf_lite.beyond.sweep            # [--seeds 0 1 2] [--workers 2] [--threads 1] [--fresh]

runs every method into ``runs/notebooks/beyond_ppo/<method>_seed<s>`` and writes COMPACT results into
``results/beyond_ppo/`` (committed): per run its config, its summary and the series the notebook plots,
plus ``meta.json`` with the fingerprints of the SFT model, the RM and the data. The notebook reads only
those files; :func:`check_results` fails loudly, naming this command, when they no longer match the
current presets.

The budgets are matched (see :func:`budget_rows`): PPO and GRPO sample the same 60 x 64 responses to the
same training prompts and take the same 240 policy steps of 32 responses; DPO takes 240 steps over the 9600
preference pairs the RM was trained on; best-of-n trains nothing. Every run is measured the same way
(:func:`~rlhf_lite.beyond.measure.measure_policy` on the 256 test prompts).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..utils import REPO_ROOT, read_json, read_metrics, write_json

COMMAND = "python -m rlhf_lite.beyond.sweep"
RESULTS = REPO_ROOT / "results" / "beyond_ppo"
SEEDS = (0, 1, 2)
PPO_GOLD_EVERY = 5
"""The PPO runs measure every 5 iterations throughout (their presets: every 2 up to iteration 20, then every
10), as GRPO does: the same 13 points on the frontier for both, so neither method's peak is the best of more
noisy measurements. Measuring changes no training step (it has its own sampling seed)."""


@dataclass(frozen=True)
class Method:
    """One method of the comparison: its stage, preset and label."""

    name: str
    stage: str
    preset: str
    label: str


METHODS: tuple[Method, ...] = (
    Method("vanilla", "ppo", "vanilla", "vanilla PPO"),
    Method("ppo_max", "ppo", "ppo_max", "PPO-max"),
    Method("grpo", "grpo", "grpo", "GRPO"),
    Method("grpo_no_kl", "grpo", "grpo_no_kl", "GRPO without KL"),
    Method("dpo", "dpo", "dpo", "DPO"),
    Method("bon", "bon", "bon", "best-of-n"),
)
BY_NAME = {m.name: m for m in METHODS}


def method_config(name: str, seed: int = 0, profile=None):
    """The config of method ``name`` in this comparison: its preset on the profile's settings (tiny)."""
    from ..profiles import TINY
    from .bon import BON_PRESETS
    from .dpo import DPO_PRESETS
    from .grpo import GRPO_PRESETS
    from .measure import preset_config

    profile, m = profile or TINY, BY_NAME[name]
    if m.stage == "ppo":
        return profile.ppo_config(m.preset, gold_every=PPO_GOLD_EVERY, gold_early_until=0, seed=seed)
    presets = {"grpo": GRPO_PRESETS, "dpo": DPO_PRESETS, "bon": BON_PRESETS}[m.stage]
    return replace(preset_config(presets, m.preset, getattr(profile, m.stage)), seed=seed)


def budget_rows(profile=None) -> list[list]:
    """(method, responses sampled in training, policy gradient steps, sequences per step, preference pairs)."""
    rows = []
    for m in METHODS:
        cfg = method_config(m.name, 0, profile)
        if m.stage == "ppo":
            per_it = cfg.ppo_epochs * cfg.rollout_batch // cfg.minibatch_size
            rows.append([m.label, cfg.iterations * cfg.rollout_batch,
                         (cfg.iterations - cfg.critic_pretrain_iterations) * per_it, cfg.minibatch_size, "-"])
        elif m.stage == "grpo":
            rows.append([m.label, cfg.iterations * cfg.rollout_batch,
                         cfg.iterations * cfg.epochs * cfg.rollout_batch // cfg.minibatch_size, cfg.minibatch_size, "-"])
        elif m.stage == "dpo":
            rows.append([m.label, 0, cfg.steps, 2 * cfg.batch_size, cfg.steps * cfg.batch_size])
        else:
            rows.append([m.label, f"{cfg.n_max} per test prompt, at inference", 0, "-", "-"])
    return rows


# ----- running ------------------------------------------------------------------------------------
def run_dir(name: str, seed: int) -> Path:
    from ..notebook import RUNS

    return RUNS / "beyond_ppo" / f"{name}_seed{seed}"


def run_method(name: str, seed: int, out: Path, sft_dir: Path, rm_dir: Path) -> dict:
    """Run one method into ``out``; returns its summary."""
    m, cfg = BY_NAME[name], method_config(name, seed)
    if m.stage == "ppo":
        from ..outdir import check_out, clear_out
        from ..ppo.stage import build_setup
        from .measure import measured_ppo_trainer

        check_out(out, overwrite=True)  # an earlier (unfinished) run of this project is replaced
        setup = build_setup(cfg, sft_dir, rm_dir)
        clear_out(out)
        return measured_ppo_trainer()(cfg, setup, out, m.preset).train()
    if m.stage == "grpo":
        from .grpo import run_grpo

        return run_grpo(out, sft_dir, rm_dir, cfg, m.preset)
    if m.stage == "dpo":
        from .dpo import train_dpo

        return train_dpo(out, sft_dir, cfg, rm_dir=rm_dir, preset=m.preset)
    from .bon import run_bon

    return run_bon(out, sft_dir, rm_dir, cfg, preset=m.preset)


def finished(name: str, seed: int) -> bool:
    """Whether the run folder holds a finished run with the current config of ``name`` and ``seed`` (a PPO run
    stopped by a signal writes a summary too, marked ``interrupted``)."""
    from ..settings import to_dict

    path = run_dir(name, seed) / "summary.json"
    if not path.is_file():
        return False
    summary = read_json(path)
    return summary["config"] == to_dict(method_config(name, seed)) and not summary.get("interrupted")


def _job(name: str, seed: int, threads: int) -> dict:
    """One run in a worker process (top level, so a spawned process can import it); returns its compact form."""
    import torch

    from ..notebook import RUNS

    torch.set_num_threads(threads)
    out = run_dir(name, seed)
    run_method(name, seed, out, RUNS / "sft", RUNS / "rm")
    return compact(name, seed, out)


SERIES_KEYS = ("iteration", "reward", "kl_per_token", "kl_per_sequence", "response_length", "ref_perplexity",
               "repetition_fraction", "gold_score", "eval_kl_per_sequence", "eval_kl_per_token", "eval_reward",
               "eval_response_length", "eval_ref_perplexity", "eval_repetition_fraction", "loss", "reward_accuracy",
               "zero_std_fraction", "entropy", "wall_seconds")


def _round(x):
    return round(x, 5) if isinstance(x, float) else x


def compact(name: str, seed: int, out: Path) -> dict:
    """What the notebook needs of a finished run: its config, summary (without paths) and series."""
    m, summary = BY_NAME[name], read_json(out / "summary.json")
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "event" not in r]
    if m.stage == "dpo":  # training steps carry the loss; measurements the monitors
        rows = [{**r, "iteration": r["step"]} for r in rows]
    series = [{k: _round(r[k]) for k in SERIES_KEYS if r.get(k) is not None} for r in rows]
    return {
        "method": name, "label": m.label, "stage": m.stage, "preset": m.preset, "seed": seed,
        "config": summary["config"],
        "summary": {k: _round(v) for k, v in summary.items() if k not in ("config", "provenance", "rows", "lora")},
        "series": series if m.stage != "bon" else [{k: _round(v) for k, v in r.items()} for r in summary["rows"]],
        "fingerprints": {k: v["sha256"] for k, v in summary["provenance"].items() if isinstance(v, dict) and "sha256" in v},
        "wall_seconds": _round(summary["wall_seconds"]),
    }


def run_sweep(seeds=SEEDS, workers: int = 2, threads: int = 1, results: Path = RESULTS, fresh: bool = False) -> dict:
    """Every method with every seed (``workers`` processes of ``threads`` torch threads), then the compact
    results in ``results``. The SFT model and RM are the notebooks' (trained first if missing). A finished run
    with the same config is read back unless ``fresh``."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from ..notebook import ensure_rm, ensure_sft
    from ..stage import data_fingerprint
    from ..utils import DATA_DIR

    start, load_before = time.time(), os.getloadavg()[0]
    sft, rm = ensure_sft(), ensure_rm()
    jobs = [(m.name, s) for s in seeds for m in METHODS]
    runs = {job: compact(*job, run_dir(*job)) for job in jobs if not fresh and finished(*job)}
    todo = [job for job in jobs if job not in runs]
    if todo:
        ctx = multiprocessing.get_context("spawn")  # forking a process with live OpenMP threads can hang
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            futures = {job: pool.submit(_job, *job, threads) for job in todo}
            runs.update({job: f.result() for job, f in futures.items()})
    runs = {job: runs[job] for job in jobs}
    results.mkdir(parents=True, exist_ok=True)
    for (name, seed), run in runs.items():
        write_json(results / f"{name}_seed{seed}.json", run)
    meta = {
        "command": COMMAND, "seeds": list(seeds), "workers": workers, "threads_per_run": threads,
        "sweep_wall_seconds": round(time.time() - start, 1), "reused_runs": len(jobs) - len(todo),
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "load_average_before": round(load_before, 2), "load_average_after": round(os.getloadavg()[0], 2)},
        "runs_wall_seconds": round(sum(r["wall_seconds"] for r in runs.values()), 1),
        "methods": [asdict(m) for m in METHODS],
        "sft": {"sha256": runs[jobs[0]]["fingerprints"]["sft_model"], "config": sft["config"],
                "gold_score_after": sft.get("gold_score_after")},
        "rm": {"sha256": runs[jobs[0]]["fingerprints"]["rm"], "config": rm["config"],
               "test_accuracy": rm["test_accuracy"], "gold_agreement": rm.get("gold_agreement")},
        "data_sha256": data_fingerprint(DATA_DIR)["sha256"],
    }
    write_json(results / "meta.json", meta)
    return {"meta": meta, "runs": runs}


# ----- reading them back --------------------------------------------------------------------------
class StaleResults(RuntimeError):
    """The stored results do not match the current code, presets or data."""


def load_results(results: Path = RESULTS) -> dict:
    """``{"meta": ..., "runs": {(method, seed): run}}`` from ``results``."""
    if not (results / "meta.json").is_file():
        raise StaleResults(f"{results} holds no results: run `{COMMAND}`")
    meta = read_json(results / "meta.json")
    runs = {}
    for m in METHODS:
        for s in meta["seeds"]:
            path = results / f"{m.name}_seed{s}.json"
            if not path.is_file():
                raise StaleResults(f"{path} is missing: re-run `{COMMAND}`")
            runs[(m.name, s)] = json.loads(path.read_text())
    return {"meta": meta, "runs": runs}


def _first_difference(stored: dict, current: dict, prefix: str = "") -> str | None:
    for key in sorted(set(stored) | set(current)):
        a, b = stored.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = _first_difference(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b:
            return f"{prefix}{key}: stored {a!r}, now {b!r}"
    return None


def check_results(results: dict, profile=None) -> list[str]:
    """Check that every stored run was made with the current config of its method and seed, on the current
    data, SFT settings and RM settings; StaleResults naming the command otherwise. Returns what was checked."""
    from ..profiles import TINY
    from ..settings import to_dict
    from ..stage import data_fingerprint
    from ..utils import DATA_DIR

    profile = profile or TINY
    meta = results["meta"]
    problems = []
    for (name, seed), run in results["runs"].items():
        diff = _first_difference(run["config"], to_dict(method_config(name, seed, profile)))
        if diff:
            problems.append(f"{name} seed {seed}: {diff}")
    for part, cfg in (("sft", profile.sft), ("rm", profile.rm)):
        diff = _first_difference(meta[part]["config"], to_dict(cfg))
        if diff:
            problems.append(f"the notebooks' {part.upper()} stage: {diff}")
    if meta["data_sha256"] != data_fingerprint(DATA_DIR)["sha256"]:
        problems.append("the data folder changed since the sweep")
    if problems:
        raise StaleResults("results/beyond_ppo are stale (" + "; ".join(problems[:3]) + f"): re-run `{COMMAND}`")
    runs = f"{len(results['runs'])} runs ({len(METHODS)} methods x seeds {meta['seeds']})"
    return [f"{runs}: configs equal the current presets", "the SFT and RM settings and the data are the sweep's"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--workers", type=int, default=2, help="runs side by side (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    parser.add_argument("--fresh", action="store_true", help="re-run finished runs too")
    args = parser.parse_args(argv)
    out = run_sweep(tuple(args.seeds), args.workers, args.threads, fresh=args.fresh)
    print(f"{len(out['runs'])} runs in {out['meta']['sweep_wall_seconds']:.0f} s -> {RESULTS}")


if __name__ == "__main__":
    main()
