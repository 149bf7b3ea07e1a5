"""Plots written by the stages and shown in the notebooks. Every axis is labelled, every plot titled."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt  # headless machines fall back to Agg by themselves

from .utils import read_metrics


def _save(fig, path: str | Path | None) -> None:
    if path is not None:
        fig.savefig(path, dpi=90, bbox_inches="tight")


def _finish(fig, path: str | Path | None):
    """Lay out, save to ``path`` (if given; the figure is then closed) and return the figure."""
    fig.tight_layout()
    _save(fig, path)
    if path is not None:
        plt.close(fig)
    return fig


def plot_sft(metrics_path: str | Path, out_path: str | Path | None, summary: dict | None = None):
    """Training loss of pretraining and SFT, and the gold score over steps."""
    rows = read_metrics(metrics_path)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    for phase, color in (("pretrain", "tab:gray"), ("sft", "tab:blue")):
        pts = [(r["step"], r["loss"]) for r in rows if r.get("phase") == phase and "loss" in r]
        if pts:
            ax1.plot(*zip(*pts), color=color, label=f"{phase} loss")
    ax1.set(xlabel="optimizer step", ylabel="cross-entropy (nats/token)", title="SFT stage: training loss")
    if ax1.get_legend_handles_labels()[0]:
        ax1.legend()
    pts = [(r["step"], r["gold_score"]) for r in rows if "gold_score" in r]
    if not pts:  # no gold judge (HH-RLHF data)
        ax2.axis("off")
        return _finish(fig, out_path)
    ax2.plot(*zip(*pts), marker="o", color="tab:green", label="model samples")
    if summary and "gold_score_demos" in summary:
        ax2.axhline(summary["gold_score_demos"], ls="--", color="k", label="demonstrations")
    ax2.set(xlabel="optimizer step", ylabel="mean gold score (test prompts)", title="Gold score during SFT")
    ax2.legend()
    return _finish(fig, out_path)


def plot_rm(rm_dir: str | Path, out_path: str | Path | None = None):
    """The RM report: Fig. 2 and 3 analogues, RM against length, and (with a gold judge) RM against gold and
    the exploit probe."""
    import json

    import numpy as np

    rm_dir = Path(rm_dir)
    rows = read_metrics(rm_dir / "metrics.jsonl")
    sc = np.load(rm_dir / "test_scores.npz")
    probe_file = rm_dir / "probe.jsonl"
    probe = [json.loads(line) for line in probe_file.read_text().splitlines()] if probe_file.exists() else []
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    ax = axes[0, 0]
    ax.hist(sc["margins"], bins=40, color="tab:blue", alpha=0.8)
    ax.axvline(0, color="k", lw=1)
    ax.set(xlabel="r(chosen) - r(rejected)", ylabel="test pairs", title="Reward margins on test pairs (Fig. 2)")
    ax = axes[0, 1]
    pts = [r for r in rows if "test_accuracy" in r]
    ax.plot([r["step"] for r in pts], [r["train_accuracy"] for r in pts], marker="o", label="train")
    ax.plot([r["step"] for r in pts], [r["test_accuracy"] for r in pts], marker="o", label="test")
    ax.set(xlabel="optimizer step", ylabel="pairwise accuracy", title="RM accuracy over training (Fig. 3)")
    ax.legend()
    ax = axes[0, 2]
    ax.plot([r["step"] for r in rows], [r["rank_loss"] for r in rows], color="tab:red", alpha=0.6)
    ax.set(xlabel="optimizer step", ylabel="-log sigmoid(margin)", title="Ranking loss (train batches)")
    ax = axes[1, 0]
    if "gold" in sc:
        ax.scatter(sc["gold"], sc["rm"], s=4, alpha=0.3)
        ax.set(xlabel="gold score", ylabel="RM score", title="RM against the gold judge (test responses)")
    else:
        ax.axis("off")
    ax = axes[1, 1]
    jitter = np.random.default_rng(0).uniform(-0.3, 0.3, len(sc["length"]))
    ax.scatter(sc["length"] + jitter, sc["rm"], s=4, alpha=0.3, color="tab:purple")
    ax.set(xlabel="response length (tokens)", ylabel="RM score", title="RM against length (test responses)")
    ax = axes[1, 2]
    if not probe:
        ax.axis("off")
    for kind, ls in (("distinct", "-"), ("repeated", "--")):
        ks = sorted({r["fillers"] for r in probe if r["kind"] == kind or r["fillers"] == 0})
        for key, color in (("rm", "tab:blue"), ("gold", "tab:green")):
            ys = [np.mean([r[key] for r in probe if r["fillers"] == k and (k == 0 or r["kind"] == kind)]) for k in ks]
            ax.plot(ks, ys, ls=ls, marker="o", color=color, label=f"{key.upper()} ({kind} fillers)")
    ax.set(xlabel="filler phrases appended to a correct answer", ylabel="mean score",
           title="Exploit probe: padding a correct answer")
    if probe:
        ax.legend(fontsize=8)
    return _finish(fig, out_path)


PPO_PANELS = (
    ("reward", "mean RM reward", "RM reward (proxy)"),
    ("gold_score", "mean gold score (test prompts)", "Gold score (oracle)"),
    ("kl_per_token", "KL(policy || ref), nats/token", "KL from the reference"),
    ("ref_perplexity", "perplexity under the reference", "Reference perplexity of responses"),
    ("response_length", "tokens (EOS included)", "Response length"),
    ("repetition_fraction", "share with a repeated trigram", "Repetitive responses"),
)


def plot_ppo(run_dirs, out_path=None, labels=None, panels=PPO_PANELS, sft_gold: float | None = None, ncols: int = 3,
             colors=None, length_cap: int | None = None):
    """The paper's monitors (Fig. 4 analogue) over iterations for one or more runs, collapse points marked.

    Run i has colour ``colors[i]`` (default ``C{i}``) in every panel, even where earlier runs lack a metric.
    ``length_cap`` (the runs' ``max_new_tokens``) draws the cap on the response-length panel.
    """
    import json

    run_dirs = [Path(d) for d in run_dirs]
    labels = labels or [d.name for d in run_dirs]
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.3 * nrows), squeeze=False)
    colors = colors or [f"C{i}" for i in range(len(run_dirs))]
    for d, label, color in zip(run_dirs, labels, colors):
        rows = read_metrics(d / "metrics.jsonl")
        summary = json.loads((d / "summary.json").read_text()) if (d / "summary.json").exists() else {}
        collapse = summary.get("collapse_iteration")
        for ax, (key, ylabel, title) in zip(axes.flat, panels):
            pts = [(r["iteration"], r[key]) for r in rows if r.get(key) is not None and "event" not in r]
            if not pts:
                continue
            ax.plot(*zip(*pts), marker="o" if key == "gold_score" else None, ms=3, label=label, color=color)
            if collapse is not None:
                ax.axvline(collapse, color=color, ls=":", lw=1.2)
            ax.set(xlabel="PPO iteration", ylabel=ylabel, title=title)
    for ax, (key, *_rest) in zip(axes.flat, panels):
        if key == "gold_score" and sft_gold is not None:
            ax.axhline(sft_gold, color="k", ls="--", lw=1, label="SFT model")
        if key == "response_length" and length_cap is not None:
            ax.axhline(length_cap, color="tab:red", ls="--", lw=1, label=f"cap ({length_cap} tokens)")
            ax.legend(fontsize=7, loc="lower right")
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("PPO monitors (dotted line: collapse detected)", y=1.0)
    return _finish(fig, out_path)


def plot_overoptimization(run_dirs, out_path=None, labels=None):
    """Gold score and RM reward against KL(policy || reference) per sequence: the over-optimization
    picture that only a gold judge allows (the RM keeps paying while the true quality turns down). The gold
    curve starts at the starting policy's measurement (iteration 0) at KL = 0."""
    run_dirs = [Path(d) for d in run_dirs]
    labels = labels or [d.name for d in run_dirs]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for d, label in zip(run_dirs, labels):
        every = [r for r in read_metrics(d / "metrics.jsonl") if "event" not in r]
        rows = [r for r in every if "kl_per_sequence" in r]
        kl = [r["kl_per_sequence"] for r in rows]
        line, = ax1.plot(kl, [r["reward"] for r in rows], ".", alpha=0.5, label=label)
        start = [(0.0, r["gold_score"]) for r in every if r["iteration"] == 0 and r.get("gold_score") is not None]
        gold = start + [(r["kl_per_sequence"], r["gold_score"]) for r in rows if r.get("gold_score") is not None]
        if gold:
            ax2.plot(*zip(*gold), "o-", color=line.get_color(), label=label)
    ax1.set(xlabel="KL(policy || reference) per response (nats)", ylabel="mean RM reward",
            title="The proxy: RM reward against KL")
    ax2.set(xlabel="KL(policy || reference) per response (nats)", ylabel="mean gold score (test prompts)",
            title="The truth: gold score against KL")
    for ax in (ax1, ax2):
        ax.legend(fontsize=8)
    return _finish(fig, out_path)


# ----- results of multi-seed sweeps (rlhf_lite.results.Results) ---------------------------------------
BAND_METRICS = {
    "gold_score": ("gold score (test prompts)", "Gold score"),
    "reward": ("mean RM reward", "RM reward"),
    "kl_per_token": ("KL, nats/token", "KL from the reference"),
    "response_length": ("tokens (EOS included)", "Response length"),
    "finished_fraction": ("share ending with EOS", "Responses that end"),
    "repetition_fraction": ("share with a repeated trigram", "Repetitive responses"),
    "entropy": ("nats per token", "Policy entropy"),
}


def _band(ax, res, label: str, key: str, color, lw: float = 1.6, name: str | None = None) -> None:
    x, mean, low, high = res.band(label, key)
    ax.plot(x, mean, color=color, lw=lw, marker="o" if key == "gold_score" else None, ms=2.5, label=name or label)
    ax.fill_between(x, low, high, color=color, alpha=0.2, lw=0)


def plot_bands(res, labels, metrics=("gold_score", "response_length", "kl_per_token"), baselines=(),
               sft_gold: float | None = None, length_cap: int | None = None, title: str = "", out_path=None):
    """Small multiples: one column per variant, one row per metric; each panel shows the variant's mean over
    seeds with its 95 % t band, and the ``baselines`` (labels) as grey/black references with theirs."""
    labels, n_seeds = list(labels), len(res.seeds)
    fig, axes = plt.subplots(len(metrics), len(labels), figsize=(2.9 * len(labels), 2.3 * len(metrics)),
                             squeeze=False, sharey="row")
    base_colors = ("0.55", "0.15")
    for j, label in enumerate(labels):
        for i, key in enumerate(metrics):
            ax = axes[i, j]
            for b, c in zip(baselines, base_colors):
                if b != label:
                    _band(ax, res, b, key, c, lw=1.0)
            _band(ax, res, label, key, f"C{j}")
            if key == "gold_score" and sft_gold is not None:
                ax.axhline(sft_gold, color="k", ls="--", lw=0.8, label="SFT model")
            if key == "response_length" and length_cap is not None:
                ax.axhline(length_cap, color="tab:red", ls="--", lw=0.8, label="cap")
            ylabel, panel = BAND_METRICS.get(key, (key, key))
            ax.set(title=f"{label}: {panel}" if i == 0 else panel, xlabel="PPO iteration" if i == len(metrics) - 1
                   else "", ylabel=ylabel if j == 0 else "")
            ax.title.set_fontsize(8)
            if i == 0:
                ax.legend(fontsize=6, loc="lower left")
    fig.suptitle(f"{title} (mean of {n_seeds} seeds, band: 95 % t interval)", y=1.0)
    return _finish(fig, out_path)


def plot_frontier(res, labels, coefs, sft_gold: float, baseline: str | None = None, out_path=None):
    """The over-optimization frontier of a KL-coefficient sweep: each run's gold score against its KL per
    response over the run (thin lines, mean over seeds) and the final point with 95 % t intervals on both
    axes; the SFT model at KL = 0."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (label, coef) in enumerate(zip(labels, coefs)):
        color = f"C{i}"
        x, gold = res.series(label, "gold_score")
        sx, kl = res.series(label, "kl_per_sequence")
        at = {int(it): k for it, k in zip(sx, kl.mean(axis=0))}
        path = [(0.0 if it == 0 else at[int(it)], g) for it, g in zip(x, gold.mean(axis=0)) if it == 0 or int(it) in at]
        ax1.plot(*zip(*path), "-", color=color, lw=1, alpha=0.8, label=f"eta = {coef}")
        g, k = res.ci(label, "final.score"), res.ci(label, "final_kl_per_sequence")
        ax2.errorbar([k.mean], [g.mean], xerr=[[k.mean - k.low], [k.high - k.mean]],
                     yerr=[[g.mean - g.low], [g.high - g.mean]], fmt="o", color=color, capsize=3, label=f"eta = {coef}")
    for ax in (ax1, ax2):
        ax.plot([0], [sft_gold], "k*", ms=10, label="SFT model (KL = 0)")
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set(xlabel="KL(policy || reference) per response, nats (symlog)", ylabel="gold score (test prompts)")
        ax.legend(fontsize=7)
    ax1.set_title("Gold against KL during each run (mean of seeds)")
    ax2.set_title("Final gold against final KL (95 % t intervals)")
    fig.suptitle("The over-optimization frontier of the KL coefficient" + (f" ({baseline})" if baseline else ""), y=1.02)
    return _finish(fig, out_path)
