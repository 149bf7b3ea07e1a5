"""Plots written by the stages and shown in the notebooks. Every axis is labelled, every plot titled."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt  # headless machines fall back to Agg by themselves

from .utils import read_metrics


def _save(fig, path: str | Path | None) -> None:
    if path is not None:
        fig.savefig(path, dpi=90, bbox_inches="tight")


def plot_sft(metrics_path: str | Path, out_path: str | Path | None, summary: dict | None = None):
    """Training loss of pretraining and SFT, and the gold score over steps."""
    rows = read_metrics(metrics_path)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    for phase, color in (("pretrain", "tab:gray"), ("sft", "tab:blue")):
        pts = [(r["step"], r["loss"]) for r in rows if r.get("phase") == phase and "loss" in r]
        if pts:
            ax1.plot(*zip(*pts), color=color, label=f"{phase} loss")
    ax1.set(xlabel="optimizer step", ylabel="cross-entropy (nats/token)", title="SFT stage: training loss")
    ax1.legend()
    pts = [(r["step"], r["gold_score"]) for r in rows if "gold_score" in r]
    ax2.plot(*zip(*pts), marker="o", color="tab:green", label="model samples")
    if summary and "gold_score_demos" in summary:
        ax2.axhline(summary["gold_score_demos"], ls="--", color="k", label="demonstrations")
    ax2.set(xlabel="optimizer step", ylabel="mean gold score (test prompts)", title="Gold score during SFT")
    ax2.legend()
    fig.tight_layout()
    _save(fig, out_path)
    if out_path is not None:
        plt.close(fig)
    return fig
