"""Multi-seed sweeps as data: run by one command, stored compactly in ``results/``, read by the notebooks.

Three seeds of some twenty ablations, a KL-coefficient sweep and a long PPO-max run cost far more CPU time
than a notebook may spend, so notebooks 02 to 04 read their results from ``results/<sweep>.json`` (committed)
and compute every table and verdict from them. A sweep is data (:data:`SWEEPS`): which presets, with which
changes and budget, over which seeds. The command that writes a results file is::

    python -m rlhf_lite.sweeps seeds ablations long      # or any one of them; --list shows them

It trains on the SFT model and reward model of the notebooks (``runs/notebooks/sft`` and ``rm``, made by
:func:`rlhf_lite.notebook.ensure_sft` and ``ensure_rm`` with the notebooks' settings and thread count), runs
the PPO runs two at a time on one CPU thread each (:func:`rlhf_lite.notebook.ensure_ppo_many`; a fixed
thread count makes them repeat exactly), then evaluates each final policy with several samples per test
prompt (:func:`final_gold`). A results file holds, per run, its config, its summary, the per-iteration
series the plots need and the per-prompt final gold scores; and the fingerprints of the SFT model and RM.

:func:`load` checks a results file before a notebook uses it: every stored config must equal what the
current presets give (else the file is stale, and the error names the command that re-runs it), and
where the notebooks' SFT and RM folders exist, their fingerprints must equal the stored ones. With
``RLHF_LITE_FULL=1`` :func:`load` re-runs the sweep into ``runs/`` instead of reading ``results/``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
from dataclasses import dataclass, field, replace
from pathlib import Path

from .ppo.config import PPOConfig, get_preset
from .utils import REPO_ROOT, Stopwatch, read_json, read_metrics, write_json

RESULTS_DIR = REPO_ROOT / "results"
FINAL_SAMPLES = 4
"""Samples per test prompt of the final gold evaluation (4 x 256 = 1024 responses per model)."""
SERIES = ("reward", "reward_used", "kl_per_token", "kl_per_sequence", "response_length", "finished_fraction",
          "repetition_fraction", "entropy", "ref_perplexity", "policy_perplexity", "explained_variance")
"""Per-iteration metrics kept in a results file (the training buffer's)."""
GOLD_SERIES = ("gold_score", "eval_response_length")
"""Metrics of the gold measurements kept in a results file (on the test prompts, iteration 0 included)."""
SUMMARY_KEYS = ("iterations", "initial_gold_score", "peak_gold_score", "final_gold_score", "initial_reward",
                "final_reward", "final_kl", "final_kl_per_sequence", "initial_response_length",
                "final_response_length", "final_repetition_fraction", "collapse_detected", "collapse_iteration",
                "collapse_reason", "wall_seconds")


@dataclass(frozen=True)
class Variant:
    """One arm of a sweep: preset ``preset`` with ``changes`` on top, shown as ``label`` in group ``group``."""

    label: str
    preset: str
    group: str = ""
    changes: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Sweep:
    """Variants times seeds, each run with the sweep's ``budget`` (field changes of every run)."""

    name: str
    description: str
    variants: tuple[Variant, ...]
    budget: dict = field(default_factory=dict)
    seeds: tuple[int, ...] = (0, 1, 2)
    policy_updates: int | None = None
    """If set, every run makes this many policy updates: ``iterations`` = this + the run's
    ``critic_pretrain_iterations`` (critic pretraining is compared at the same number of policy updates)."""
    runs_subdir: str = ""
    """Folder of the runs under the notebooks' runs folder (default ``sweeps/<name>``)."""

    def config(self, variant: Variant, seed: int) -> PPOConfig:
        """The PPOConfig of ``variant`` with ``seed``: preset, then budget and the variant's changes."""
        cfg = replace(get_preset(variant.preset), **{**self.budget, **variant.changes, "seed": seed})
        if self.policy_updates is not None:
            cfg = replace(cfg, iterations=self.policy_updates + cfg.critic_pretrain_iterations)
        return cfg

    def variant(self, label: str) -> Variant:
        return next(v for v in self.variants if v.label == label)

    def run_dir(self, variant: Variant, seed: int) -> Path:
        from .notebook import RUNS

        return RUNS / (self.runs_subdir or f"sweeps/{self.name}") / f"{variant.label}_seed{seed}"

    @property
    def command(self) -> str:
        return f"python -m rlhf_lite.sweeps {self.name}"


def _v(group: str, *labels: str) -> list[Variant]:
    return [Variant(label, label, group) for label in labels]


SWEEPS: dict[str, Sweep] = {s.name: s for s in [
    Sweep("seeds", "vanilla PPO and PPO-max at the budget of notebooks 02 and 03 (60 iterations of 64 rollouts); "
          "seed 0 is the notebooks' own run", tuple(_v("baselines", "vanilla", "ppo_max")), runs_subdir="ppo"),
    Sweep("ablations", "every ablation of notebook 04 at 30 policy updates of 32 rollouts",
          tuple(_v("baselines", "vanilla", "ppo_max")
                + _v("Fig. 6", "reward_scale", "reward_norm_0.3", "reward_norm_0.8", "adv_norm_0.5", "adv_norm_0.12")
                + _v("Fig. 7", "kl_penalty", "entropy_bonus", "entropy_bonus_1.0", "importance_sampling",
                     "kl_and_is")
                + _v("Fig. 8", "policy_from_pretrained", "critic_from_sft", "critic_pretrain")
                + _v("leave one out", "ppo_max_minus_kl", "ppo_max_minus_reward_norm", "ppo_max_minus_value_clip",
                     "ppo_max_minus_critic_pretrain", "ppo_max_minus_grad_clip", "ppo_max_minus_ptx")
                + [Variant(f"kl_{eta}", "kl_penalty", "KL sweep", {"kl_coef": eta}) for eta in (0.01, 0.02, 0.05, 0.1)]),
          budget={"rollout_batch": 32, "minibatch_size": 16}, policy_updates=30),
    Sweep("long", "PPO-max over 150 iterations of 64 rollouts (Fig. 9), one seed", tuple(_v("Fig. 9", "ppo_max")),
          budget={"iterations": 150}, seeds=(0,)),  # one seed: 15 CPU-minutes a run on this machine
]}


def get_sweep(name: str) -> Sweep:
    if name not in SWEEPS:
        raise ValueError(f"unknown sweep {name!r}; choose one of: {', '.join(SWEEPS)}")
    return SWEEPS[name]


def full_mode() -> bool:
    """``RLHF_LITE_FULL=1``: notebooks re-run the sweeps instead of reading ``results/``."""
    return os.environ.get("RLHF_LITE_FULL", "0") == "1"


# ----- the final gold evaluation ---------------------------------------------------------------------
@contextlib.contextmanager
def one_thread():
    """torch on one thread inside the block: an evaluation then gives the same samples in any process."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def final_gold(run_dir: Path | None, samples_per_prompt: int = FINAL_SAMPLES) -> dict:
    """Gold evaluation of a run's final policy (``None``: the SFT model) on the 256 test prompts with
    ``samples_per_prompt`` samples each, on one thread; cached in the run folder (keyed by the policy's
    fingerprint, so a retrained run is evaluated again). Returns score, per-prompt means, length, EOS share."""
    import numpy as np
    import torch

    from .evaluation import evaluate_gold
    from .loading import load_base, load_tokenizer_for
    from .models import AdapterStack
    from .notebook import RUNS
    from .ppo.stage import N_TEST_PROMPTS
    from .profiles import TINY
    from .stage import eval_prompts, model_fingerprint, world_judge
    from .utils import DATA_DIR

    sft_model = RUNS / "sft" / "model"
    folder = sft_model if run_dir is None else run_dir / "policy"
    key = {"policy": model_fingerprint(folder)["sha256"], "samples_per_prompt": samples_per_prompt}
    cache = (RUNS / "sft" if run_dir is None else run_dir) / f"final_gold_k{samples_per_prompt}.json"
    if cache.exists() and read_json(cache).get("key") == key:
        return read_json(cache)["eval"]
    summary = None if run_dir is None else read_json(run_dir / "summary.json")
    base = sft_model if summary is None else Path(summary["provenance"]["policy_base"])
    max_new = get_preset("vanilla").max_new_tokens if summary is None else summary["config"]["max_new_tokens"]
    with one_thread(), torch.no_grad():
        tok = load_tokenizer_for(base)
        stack = AdapterStack(load_base(TINY.model, base), ["policy"], TINY.lora)
        if run_dir is not None:
            stack.load_adapter("policy", run_dir / "policy")
        prompts = eval_prompts(tok, DATA_DIR, N_TEST_PROMPTS)
        with stack.causal_lm(None if run_dir is None else "policy") as model:
            ev = evaluate_gold(model, tok, prompts, max_new, world_judge(), samples_per_prompt=samples_per_prompt)
    out = {"score": ev.score, "per_prompt": [round(x, 4) for x in ev.per_prompt_scores()],
           "response_length": float(np.mean(ev.lengths)), "finished_fraction": float(np.mean(ev.finished)),
           "samples_per_prompt": samples_per_prompt}
    write_json(cache, {"key": key, "eval": out})
    return out


def _final_gold_job(run_dir: str | None, samples_per_prompt: int) -> dict:
    return final_gold(None if run_dir is None else Path(run_dir), samples_per_prompt)


# ----- running and storing ---------------------------------------------------------------------------
def _g(x):
    """A float with 5 significant digits (keeps results files small); other values unchanged."""
    return float(f"{x:.5g}") if isinstance(x, float) else x


def compact_run(run_dir: Path) -> dict:
    """What a results file keeps of one finished run: summary facts and the series the plots need."""
    summary = read_json(run_dir / "summary.json")
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if "event" not in r]
    train = [r for r in rows if r["iteration"] >= 1]
    gold = [r for r in rows if r.get("gold_score") is not None]
    return {
        "summary": {k: _g(summary.get(k)) for k in SUMMARY_KEYS},
        "series": {"iteration": [r["iteration"] for r in train], **{k: [_g(r.get(k)) for r in train] for k in SERIES}},
        "gold": {"iteration": [r["iteration"] for r in gold], **{k: [_g(r.get(k)) for r in gold] for k in GOLD_SERIES}},
    }


def mismatches(run_dir: Path, stored: dict) -> list[str]:
    """What differs between the finished run in ``run_dir`` and a stored run of a results file (its config,
    summary facts other than the wall time, and series); [] when the run is the stored one."""
    here = {"config": read_json(run_dir / "summary.json")["config"], **compact_run(run_dir)}
    facts = [k for k in SUMMARY_KEYS if k != "wall_seconds"]
    return [k for k in ("config", "series", "gold") if here[k] != stored[k]] + [
        f"summary.{k}" for k in facts if here["summary"].get(k) != stored["summary"].get(k)]


def write_results(path: Path, payload: dict) -> None:
    """A results file: the header indented, then one compact line per run (small, and diffs by run)."""
    import json

    from .utils import _clean

    payload = _clean(payload)
    runs = payload.pop("runs")
    head = json.dumps(payload, indent=1, sort_keys=True)[:-2]
    lines = ",\n".join("  " + json.dumps(r, sort_keys=True, separators=(",", ":")) for r in runs)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(f"{head},\n \"runs\": [\n{lines}\n ]\n}}\n")


def _fingerprints() -> dict:
    from .notebook import RUNS
    from .rm import REWARD
    from .stage import data_fingerprint, model_fingerprint
    from .utils import DATA_DIR

    return {"sft": {"folder": "sft/model", "sha256": model_fingerprint(RUNS / "sft" / "model")["sha256"]},
            "rm": {"folder": f"rm/{REWARD}", "sha256": model_fingerprint(RUNS / "rm" / REWARD)["sha256"]},
            "data": {"sha256": data_fingerprint(DATA_DIR)["sha256"]}}


def run(name: str, out: Path | None = None, workers: int = 2, threads: int = 1) -> Path:
    """Run sweep ``name`` (reusing finished identical runs) and write its results file (default
    ``results/<name>.json``); returns the file's path."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from .notebook import ensure_ppo_many, ensure_rm, ensure_sft
    from .utils import set_cpu_threads

    sweep, timer = get_sweep(name), Stopwatch()
    out = Path(out or RESULTS_DIR / f"{name}.json")
    load_before = os.getloadavg()[0]
    set_cpu_threads()  # SFT and RM, if missing, train as in the notebooks
    ensure_sft(), ensure_rm()
    runs = [(v, s) for v in sweep.variants for s in sweep.seeds]
    ensure_ppo_many({(v.label, s): (v.preset, sweep.config(v, s), sweep.run_dir(v, s)) for v, s in runs},
                    workers=workers, threads=threads)
    targets = [None] + [str(sweep.run_dir(v, s)) for v, s in runs]
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        evals = list(pool.map(_final_gold_job, targets, [FINAL_SAMPLES] * len(targets)))
    stored = []
    for (v, s), ev in zip(runs, evals[1:]):
        stored.append({"label": v.label, "preset": v.preset, "group": v.group, "seed": s,
                       "config": sweep.config(v, s).to_dict(), **compact_run(sweep.run_dir(v, s)), "final": ev})
    write_results(out, {
        "sweep": name, "description": sweep.description, "command": sweep.command, **_fingerprints(),
        "threads_per_run": threads, "workers": workers, "final_samples_per_prompt": FINAL_SAMPLES,
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "load_average_before": round(load_before, 2), "load_average_after": round(os.getloadavg()[0], 2)},
        "wall_seconds": round(timer(), 1), "sft_final": evals[0], "runs": stored,
    })
    return out


# ----- reading back, with the staleness checks --------------------------------------------------------
class StaleResults(RuntimeError):
    """A results file that no longer matches the presets, or was made on other SFT and reward models."""


def check_results(res: dict, source: str) -> None:
    """Raise :class:`StaleResults` when a stored config differs from the current presets, or when the
    notebooks' SFT model and RM exist locally with other fingerprints than the stored ones."""
    from .notebook import RUNS

    sweep = get_sweep(res["sweep"])
    fix = f"re-run `{sweep.command}` (or set RLHF_LITE_FULL=1 to run it from the notebook)"
    expected = {(v.label, s): sweep.config(v, s).to_dict() for v in sweep.variants for s in sweep.seeds}
    stored = {(r["label"], r["seed"]): r["config"] for r in res["runs"]}
    problems = [f"{label} seed {seed}: missing" for (label, seed) in expected if (label, seed) not in stored]
    problems += [f"{label} seed {seed}: no longer in the sweep" for (label, seed) in stored if (label, seed) not in expected]
    for key in expected.keys() & stored.keys():
        diff = [f"{k} {stored[key].get(k)!r} -> {v!r}" for k, v in expected[key].items() if stored[key].get(k) != v]
        if diff:
            problems.append(f"{key[0]} seed {key[1]}: " + ", ".join(diff))
    if problems:
        raise StaleResults(f"{source} is stale ({len(problems)} runs differ from the current presets: "
                           f"{'; '.join(sorted(problems)[:4])}{' ...' if len(problems) > 4 else ''}); {fix}")
    from .stage import model_fingerprint

    for part in ("sft", "rm"):
        folder = RUNS / res[part]["folder"]
        if folder.is_dir() and model_fingerprint(folder)["sha256"] != res[part]["sha256"]:
            raise StaleResults(f"{source} was made with another {part.upper()} model than {folder} (sha256 "
                               f"{res[part]['sha256']} stored, {model_fingerprint(folder)['sha256']} here); {fix}")


def load(name: str, path: Path | None = None) -> dict:
    """The checked results of sweep ``name``: from ``path`` or ``results/<name>.json``; with
    ``RLHF_LITE_FULL=1``, from a fresh run of the sweep into the notebooks' runs folder."""
    from .notebook import RUNS

    if path is None and full_mode():
        path = run(name, RUNS / "sweeps" / f"{name}.json")
    path = Path(path or RESULTS_DIR / f"{name}.json")
    res = read_json(path)
    check_results(res, path.name if path.parent == RESULTS_DIR else str(path))
    return res


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rlhf_lite.sweeps", description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help=f"sweeps to run: {', '.join(SWEEPS)}")
    parser.add_argument("--workers", type=int, default=2, help="runs side by side (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    parser.add_argument("--list", action="store_true", help="list the sweeps and exit")
    args = parser.parse_args(argv)
    if args.list or not args.names:
        for s in SWEEPS.values():
            print(f"{s.name}: {len(s.variants)} variants x {len(s.seeds)} seeds; {s.description}")
        return
    for name in args.names:
        get_sweep(name)  # every name is checked before anything runs
    for name in args.names:
        timer = Stopwatch()
        path = run(name, workers=args.workers, threads=args.threads)
        print(f"{name}: {path} ({path.stat().st_size / 1024:.0f} KiB) in {timer():.0f} s")


if __name__ == "__main__":
    main()
