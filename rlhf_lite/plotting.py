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
             colors=None):
    """The paper's monitors (Fig. 4 analogue) over iterations for one or more runs, collapse points marked.

    Run i has colour ``colors[i]`` (default ``C{i}``) in every panel, even where earlier runs lack a metric.
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
    if sft_gold is not None:
        for ax, (key, *_rest) in zip(axes.flat, panels):
            if key == "gold_score":
                ax.axhline(sft_gold, color="k", ls="--", lw=1, label="SFT model")
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("PPO monitors (dotted line: collapse detected)", y=1.0)
    return _finish(fig, out_path)


def plot_overoptimization(run_dirs, out_path=None, labels=None):
    """Gold score and RM reward against KL(policy || reference) per sequence: the over-optimization
    picture that only a gold judge allows (the RM keeps paying while the true quality turns down)."""
    run_dirs = [Path(d) for d in run_dirs]
    labels = labels or [d.name for d in run_dirs]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for d, label in zip(run_dirs, labels):
        rows = [r for r in read_metrics(d / "metrics.jsonl") if "kl_per_sequence" in r]
        kl = [r["kl_per_sequence"] for r in rows]
        line, = ax1.plot(kl, [r["reward"] for r in rows], ".", alpha=0.5, label=label)
        gold = [(r["kl_per_sequence"], r["gold_score"]) for r in rows if r.get("gold_score") is not None]
        if gold:
            ax2.plot(*zip(*gold), "o-", color=line.get_color(), label=label)
    ax1.set(xlabel="KL(policy || reference) per response (nats)", ylabel="mean RM reward",
            title="The proxy: RM reward against KL")
    ax2.set(xlabel="KL(policy || reference) per response (nats)", ylabel="mean gold score (test prompts)",
            title="The truth: gold score against KL")
    for ax in (ax1, ax2):
        ax.legend(fontsize=8)
    return _finish(fig, out_path)
