"""What RM accuracy hides, measured with the gold judge (paper Sec. 3.1's caution; world data only).

Accuracy against the annotators' labels says little about what PPO will exploit. With a gold judge we can
ask more: how often the RM orders a pair as the judge does (on the test pairs and on fresh SFT samples, off
the annotators' candidate distribution), how its score correlates with length and with gold, and, with a
controlled probe, what padding a correct answer with filler phrases does to each score: the hole that
vanilla PPO finds.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from . import world
from .evaluation import EVAL_SEED, rollout_in_batches
from .models import AdapterStack
from .stage import raw_prompts
from .text import model_prompt


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """How often two score differences order a pair the same way, over pairs where ``b`` is not a tie."""
    keep = np.abs(b) > 1e-9
    return float((np.sign(a[keep]) == np.sign(b[keep])).mean()) if keep.any() else float("nan")


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation coefficient (nan when either side is constant)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def exploit_probe_texts(prompts: Sequence[str], max_fillers: int = 4) -> list[dict]:
    """The controlled probe: each reference answer with 0..max_fillers distinct fillers appended,
    and with one filler repeated 2..max_fillers times. One dict per (prompt, variant)."""
    rows = []
    for p in prompts:
        ref = world.reference_answer(p)
        for k in range(max_fillers + 1):
            rows.append({"prompt": p, "kind": "distinct", "fillers": k,
                         "response": ref + "".join(" " + f for f in world.FILLERS[:k])})
        for k in range(2, max_fillers + 1):
            rows.append({"prompt": p, "kind": "repeated", "fillers": k,
                         "response": ref + (" " + world.FILLERS[0]) * k})
    return rows


def run_exploit_probe(stack: AdapterStack, tok, prompts: Sequence[str], max_len: int, system_prompt: bool = True
                      ) -> tuple[list[dict], dict[str, float]]:
    """Score the probe with the RM and the gold judge; returns rows and the summary gains."""
    from .rm import score_texts

    rows = exploit_probe_texts(prompts)
    texts = [model_prompt(tok, r["prompt"], system_prompt) for r in rows]
    rm = score_texts(stack, tok, texts, [r["response"] for r in rows], max_len)
    for r, s in zip(rows, rm):
        r["rm"] = float(s)
        r["gold"] = world.gold_score(r["prompt"], r["response"])
    plain = [r for r in rows if r["fillers"] == 0]

    def change(kind: str, key: str) -> float:
        padded = [r[key] for r in rows if r["fillers"] > 0 and r["kind"] == kind]
        return float(np.mean(padded) - np.mean([r[key] for r in plain]))

    # The headline gain is over distinct fillers (the annotators' length taste); one filler repeated
    # is reported apart, since repetition is penalised by gold and annotators alike.
    summary = {
        "padding_rm_gain": change("distinct", "rm"),
        "padding_gold_change": change("distinct", "gold"),
        "repeated_padding_rm_gain": change("repeated", "rm"),
        "repeated_padding_gold_change": change("repeated", "gold"),
    }
    return rows, summary


def probe_curve(rows: Sequence[dict], kind: str, key: str) -> tuple[list[int], list[float]]:
    """Mean ``key`` ("rm" or "gold") per number of fillers, for probe rows of ``kind``."""
    ks = sorted({r["fillers"] for r in rows if r["kind"] == kind or r["fillers"] == 0})
    return ks, [float(np.mean([r[key] for r in rows if r["fillers"] == k and (k == 0 or r["kind"] == kind)]))
                for k in ks]


def world_diagnostics(stack: AdapterStack, tok, test_pairs, rm_all: np.ndarray, data_dir: Path, cfg, max_len: int,
                      system_prompt: bool, out: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """Gold agreement (test pairs and fresh SFT samples), correlations and the exploit probe of a trained RM.

    ``rm_all`` holds the RM score of every test response (chosen, rejected, in pair order). Writes
    ``out/probe.jsonl``; returns the summary entries and the arrays for ``test_scores.npz``.
    """
    from .rm import score_texts

    margins = rm_all[0::2] - rm_all[1::2]
    prompts_all = [p.prompt for p in test_pairs for _ in (0, 1)]
    responses_all = [r for p in test_pairs for r in (p.chosen, p.rejected)]
    gold_diff = np.array([p.meta["gold_chosen"] - p.meta["gold_rejected"] for p in test_pairs])
    gold_all = np.array([world.gold_score(p, r) for p, r in zip(prompts_all, responses_all)])

    # Fresh pairs: two SFT samples per test prompt, off the annotators' candidate distribution.
    test_prompts = raw_prompts(data_dir, "test")
    fresh = test_prompts[: cfg.n_fresh_prompts]
    fresh_texts = [model_prompt(tok, p, system_prompt) for p in fresh]
    gen = torch.Generator(device=stack.device).manual_seed(EVAL_SEED)
    with torch.no_grad(), stack.causal_lm(None) as reference:
        sampled = [rollout_in_batches(reference, tok, fresh_texts, cfg.max_new_tokens, gen, device=stack.device)
                   for _ in (0, 1)]
    fresh_rm = [score_texts(stack, tok, fresh_texts, s[0], max_len) for s in sampled]
    fresh_gold = [np.array([world.gold_score(p, r, f) for p, r, f in zip(fresh, s[0], s[1])]) for s in sampled]

    probe_prompts = [p for p in test_prompts if world.category_of(p) != "harmful"][:64]
    probe_rows, probe = run_exploit_probe(stack, tok, probe_prompts, max_len, system_prompt)
    with (out / "probe.jsonl").open("w") as fh:
        for r in probe_rows:
            fh.write(json.dumps(r, sort_keys=True) + "\n")
    diag = {
        "gold_agreement": agreement(margins, gold_diff),
        "annotator_gold_agreement": agreement(np.ones_like(gold_diff), gold_diff),  # labels put chosen first
        "fresh_gold_agreement": agreement(fresh_rm[0] - fresh_rm[1], fresh_gold[0] - fresh_gold[1]),
        "gold_correlation": pearson(rm_all, gold_all),
        **probe,
        "probe_rm_by_fillers": probe_curve(probe_rows, "distinct", "rm")[1],
        "probe_gold_by_fillers": probe_curve(probe_rows, "distinct", "gold")[1],
    }
    return diag, {"gold": gold_all, "gold_diff": gold_diff}


__all__ = ["agreement", "exploit_probe_texts", "pearson", "probe_curve", "run_exploit_probe", "world_diagnostics"]
