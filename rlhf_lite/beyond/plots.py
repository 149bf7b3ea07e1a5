"""Plots of the DPO, GRPO and best-of-n stages. Every axis is labelled, every plot titled."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from ..plotting import PPO_PANELS, _finish, plot_ppo
from ..utils import read_metrics


def plot_monitors(run_dirs, out_path=None, labels=None, xlabel: str = "iteration", panels=PPO_PANELS, **kwargs):
    """The PPO monitors of :func:`rlhf_lite.plotting.plot_ppo` for any stage whose metrics rows carry them
    (GRPO's rollouts; DPO's measurements), with the stage's own x-axis label."""
    fig = plot_ppo(run_dirs, None, labels=labels, panels=panels, **kwargs)
    for ax in fig.axes:
        if ax.get_xlabel():
            ax.set_xlabel(xlabel)
    fig._suptitle.set_text(f"Monitors over {xlabel}s (dotted line: collapse detected)")
    return _finish(fig, out_path)


def plot_bon(run_dir, out_path=None):
    """Best-of-n: gold score and RM reward against the analytic KL, and response length against n."""
    rows = read_metrics(Path(run_dir) / "metrics.jsonl")
    kl = [r["kl_bon"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.plot(kl, [r["reward"] for r in rows], "o-", color="tab:blue", label="RM reward (proxy)")
    if "gold_score" in rows[0]:
        ax1.plot(kl, [r["gold_score"] for r in rows], "o-", color="tab:green", label="gold score")
    for r in rows:
        ax1.annotate(f"n={r['n']}", (r["kl_bon"], r["reward"]), fontsize=7, xytext=(2, 3), textcoords="offset points")
    ax1.set(xlabel="KL(best-of-n || SFT) = log n - (n-1)/n (nats)", ylabel="mean score (test prompts)",
            title="Best-of-n against the RM")
    ax1.legend(fontsize=8)
    ax2.plot([r["n"] for r in rows], [r["response_length"] for r in rows], "o-", color="tab:purple")
    ax2.set(xscale="log", xlabel="n (samples per prompt)", ylabel="tokens (EOS included)",
            title="Length of the RM's favourite")
    return _finish(fig, out_path)


# ----- notebook 06: the comparison, from the stored sweep -----------------------------------------------
COLORS = {"vanilla": "C0", "ppo_max": "C1", "grpo": "C2", "grpo_no_kl": "C4", "dpo": "C3", "bon": "k"}


KL_TICKS = (0, 0.1, 0.3, 1, 3, 10, 30)


def _kl_axis(ax) -> None:
    """Linear up to 0.1 nats, logarithmic beyond (as notebook 03's over-optimization plot)."""
    ax.set_xscale("symlog", linthresh=0.1, linscale=0.5)
    ax.set_xticks(KL_TICKS, [str(t) for t in KL_TICKS])
    ax.set_xlim(left=-0.01)


def plot_frontier(cs: dict, sft_gold: float, ax=None):
    """Gold score against KL(policy || reference) per response, every method: each seed thin, the mean over
    seeds bold. ``sft_gold``: the SFT model's expected gold score (a dotted line)."""
    fig, ax = (None, ax) if ax is not None else plt.subplots(figsize=(8, 4.8))
    for c in cs.values():
        color = COLORS.get(c.name)
        for s in range(c.gold.shape[0]):
            ax.plot(c.kl[s], c.gold[s], "-", color=color, alpha=0.25, lw=0.8)
        ax.plot(c.kl.mean(0), c.gold.mean(0), "o-" if c.name != "bon" else "s--", ms=3.5, color=color, label=c.label)
        if c.name == "bon":
            for x, y, n in zip(c.kl.mean(0), c.gold.mean(0), c.progress):
                if n in (1, 2, 8, 64):
                    ax.annotate(f"n={int(n)}", (x, y), fontsize=7, xytext=(3, -9), textcoords="offset points")
    ax.axhline(sft_gold, color="grey", ls=":", lw=1, label="SFT model (64 samples per prompt)")
    _kl_axis(ax)
    ax.set(xlabel="KL(policy || SFT) per response, nats (linear to 0.1, then log)", ylabel="mean gold score (test prompts)",
           title="The over-optimization frontier: gold score against KL to the reference")
    ax.legend(fontsize=8, ncol=2)
    return fig if fig is not None else ax.figure


def plot_proxy_vs_gold(cs: dict, sft_gold: float, ax=None):
    """Each method's path in (RM reward, gold score), mean over seeds, from its start (circle) to its end
    (arrow head): up and to the right is real progress, down and to the right is RM hacking."""
    fig, ax = (None, ax) if ax is not None else plt.subplots(figsize=(7, 4.6))
    for c in cs.values():
        x, y = c.reward.mean(0), c.gold.mean(0)
        ax.plot(x, y, "-", color=COLORS.get(c.name), label=c.label, lw=1.5)
        ax.plot(x[:1], y[:1], "o", color=COLORS.get(c.name), ms=5)
        ax.annotate("", xy=(x[-1], y[-1]), xytext=(x[-2], y[-2]),
                    arrowprops={"arrowstyle": "->", "color": COLORS.get(c.name), "lw": 1.5})
    ax.axhline(sft_gold, color="grey", ls=":", lw=1, label="SFT model")
    ax.set(xlabel="mean RM reward of the measured samples (the proxy)", ylabel="mean gold score (the truth)",
           title="Proxy against truth (means over 3 seeds)")
    ax.legend(fontsize=8)
    return fig if fig is not None else ax.figure


def plot_compare_monitors(results: dict, cs: dict):
    """The collapse monitors of every trained method over its training budget, means over seeds, read off the
    measurements (the same samples for every method)."""
    panels = (("eval_response_length", "tokens (EOS included)", "Response length"),
              ("eval_ref_perplexity", "perplexity under the SFT model", "Reference perplexity of responses"),
              ("eval_repetition_fraction", "share with a repeated trigram", "Repetitive responses"),
              ("eval_kl_per_token", "nats per token", "KL(policy || SFT) per token"))
    fig, axes = plt.subplots(2, 2, figsize=(11, 6.6))
    seeds = results["meta"]["seeds"]
    for c in cs.values():
        if c.name == "bon":
            continue
        for ax, (key, ylabel, title) in zip(axes.flat, panels):
            ys = np.array([[p[key] for p in results["runs"][(c.name, s)]["series"] if "gold_score" in p]
                           for s in seeds])
            ax.plot(c.progress, ys.mean(0), "o-", ms=3, color=COLORS.get(c.name), label=c.label)
            ax.set(xlabel="fraction of the training budget", ylabel=ylabel, title=title)
            if key == "eval_ref_perplexity":
                ax.set_yscale("log")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("Collapse monitors on the test-prompt samples (means over 3 seeds)", y=1.0)
    return _finish(fig, None)
