"""The data set writer.

:func:`generate_world` writes the data sets (SFT demos, preference pairs, PPO prompts, the tokenizer,
stats and a data card) deterministically from one seed: every file draws from its own seeded random
stream, so the same seed rewrites every file byte for byte.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .annotators import AnnotatorConfig, annotate, measure_annotators
from .judge import (
    CONCISION_PER_WORD,
    CONTENT_SCORES,
    GOLD_FLOOR,
    NO_EOS_PENALTY,
    REPEAT_PER_STUTTER,
    REPEAT_PER_TRIGRAM,
    gold_score,
)
from .sampler import _earlier_exchange, sample_pair, sample_prompt, sample_sft_response
from .tasks import (
    CATEGORIES,
    COMPLIANCES,
    DEGENERATE_REFUSALS,
    FILLERS,
    GREETINGS,
    HUMAN,
    JUNK_WORDS,
    NUMBERS,
    REFUSALS,
    _world,
    category_of,
    make_prompt,
    n_words,
    parse_task,
    reference_answer,
)


@dataclass(frozen=True)
class WorldSizes:
    """Row counts of the generated files."""

    sft: int = 6000
    prefs_train: int = 20000
    prefs_test: int = 2000
    prompts_train: int = 2000
    prompts_test: int = 256


def world_vocabulary() -> list[str]:
    """Every word the world can produce (questions, answers, fillers, refusals, junk), sorted."""
    words: set[str] = set(NUMBERS)
    texts = [*FILLERS, *REFUSALS, *COMPLIANCES, *JUNK_WORDS]
    texts += [d.format(n="0") for d in DEGENERATE_REFUSALS]
    texts += [w for g in GREETINGS for w in g]
    for t in _world()[0].values():
        texts.append(t.question)
        texts.extend(" ".join(f) for f in t.full_forms)
        texts.extend(" ".join(t.render((v,), 0)) for v in sorted(t.competitors))
    for text in texts:
        words.update(text.split())
    return sorted(words)


def _test_prompts(rng: random.Random, n: int) -> list[str]:
    """``n`` test prompts balanced over categories, from held-out questions, as few repeats as possible."""
    prompts = []
    for i, cat in enumerate(CATEGORIES):
        pool: list[str] = []
        for _ in range(n // len(CATEGORIES) + int(i < n % len(CATEGORIES))):
            if not pool:  # cycle through a fresh shuffle so repeats only start once the pool is used up
                pool = list(_world()[1][cat]["test"])
                rng.shuffle(pool)
            earlier = [_earlier_exchange(rng)] if rng.random() < 0.2 else []
            prompts.append(make_prompt(pool.pop(), earlier))
    return prompts


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(json.dumps(row, sort_keys=True, separators=(",", ":")) + "\n" for row in rows)


def _mean(xs: Sequence[float]) -> float:
    return round(float(np.mean(xs)), 4) if len(xs) else float("nan")


def generate_world(out_dir: str | Path, seed: int = 0, sizes: WorldSizes | None = None,
                   annotator: AnnotatorConfig | None = None) -> dict[str, Any]:
    """Write the world's data sets to ``out_dir`` deterministically and return the stats (also stats.json).

    Files: sft.jsonl, prefs_train.jsonl, prefs_test.jsonl, prompts_train.jsonl, prompts_test.jsonl,
    tokenizer.json, stats.json, README.md (the data card). Same seed -> byte-identical files.
    """
    from ..tokenizer import save_tokenizer, train_tokenizer  # local import: tokenizer must not need world

    sizes = sizes or WorldSizes()
    cfg = annotator or AnnotatorConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def stream(name: str) -> random.Random:
        return random.Random(f"rlhf_lite.world:{name}:{seed}")  # independent, seeded stream per file

    rng = stream("sft")
    sft = []
    for _ in range(sizes.sft):
        prompt = sample_prompt(rng, "train")
        task = parse_task(prompt)
        quality, response = sample_sft_response(task, rng)
        sft.append({"prompt": prompt, "response": response, "category": task.category, "quality": quality})
    prefs = {}
    for split, n in (("train", sizes.prefs_train), ("test", sizes.prefs_test)):
        rng = stream(f"pairs_{split}")
        prefs[split] = annotate([sample_pair(rng, "train") for _ in range(n)], cfg, stream(f"labels_{split}"))
    rng = stream("prompts_train")
    prompts_train = [sample_prompt(rng, "train") for _ in range(sizes.prompts_train)]
    prompts_test = _test_prompts(stream("prompts_test"), sizes.prompts_test)

    _write_jsonl(out / "sft.jsonl", sft)
    for split in ("train", "test"):
        _write_jsonl(out / f"prefs_{split}.jsonl", prefs[split])
    for name, ps in (("prompts_train", prompts_train), ("prompts_test", prompts_test)):
        _write_jsonl(out / f"{name}.jsonl", ({"prompt": p, "category": category_of(p)} for p in ps))

    texts = [r["prompt"] + r["response"] for r in sft]
    texts += [r[k] for split in prefs.values() for r in split for k in ("chosen", "rejected")]
    texts += prompts_train + prompts_test + [" ".join(world_vocabulary())]
    tok = train_tokenizer(texts)
    save_tokenizer(tok, out / "tokenizer.json")

    stats = _stats(seed, sizes, cfg, sft, prefs, prompts_train, prompts_test, tok.get_vocab_size())
    stats["file_bytes"] = {p.name: p.stat().st_size for p in sorted(out.iterdir())
                           if p.name not in ("stats.json", "README.md") and p.is_file()}
    (out / "stats.json").write_text(json.dumps(stats, sort_keys=True, indent=2) + "\n", encoding="utf-8")
    write_data_card(out, stats)
    return stats


def _stats(seed: int, sizes: WorldSizes, cfg: AnnotatorConfig, sft: list[dict[str, Any]],
           prefs: dict[str, list[dict[str, Any]]], prompts_train: list[str], prompts_test: list[str],
           vocab_size: int) -> dict[str, Any]:
    """Summary numbers of one generated world (what stats.json and the data card report)."""
    def resp(r: dict[str, Any], k: str) -> str:
        return r[k][len(r["prompt"]):]

    train = prefs["train"]
    measured = {s: {k: round(v, 4) for k, v in measure_annotators(rows).items()} for s, rows in prefs.items()}
    train_prompts = {r["prompt"] for r in sft} | {r["prompt"] for rows in prefs.values() for r in rows}
    train_prompts |= set(prompts_train)
    return {
        "seed": seed,
        "sizes": asdict(sizes),
        "annotator_config": asdict(cfg),
        "annotators_measured": measured,
        "gold_mean": {
            "sft_demos": _mean([gold_score(r["prompt"], r["response"]) for r in sft]),
            "chosen": _mean([r["gold_chosen"] for r in train]),
            "rejected": _mean([r["gold_rejected"] for r in train]),
            "reference_on_test_prompts": _mean([gold_score(p, reference_answer(p)) for p in prompts_test]),
        },
        "mean_response_words": {
            "sft": _mean([n_words(r["response"]) for r in sft]),
            "chosen": _mean([n_words(resp(r, "chosen")) for r in train]),
            "rejected": _mean([n_words(resp(r, "rejected")) for r in train]),
            "reference_on_test_prompts": _mean([n_words(reference_answer(p)) for p in prompts_test]),
        },
        "mean_prompt_words": _mean([n_words(r["prompt"]) for r in sft]),
        "chosen_longer_share": _mean([float(n_words(resp(r, "chosen")) > n_words(resp(r, "rejected")))
                                      for r in train]),
        "multi_turn_share": _mean([float(r["prompt"].count(HUMAN) > 1) for r in sft]),
        "sft_quality": dict(sorted(Counter(r["quality"] for r in sft).items())),
        "categories": {
            "sft": dict(sorted(Counter(r["category"] for r in sft).items())),
            "prefs_train": dict(sorted(Counter(r["category"] for r in train).items())),
            "prompts_test": dict(sorted(Counter(category_of(p) for p in prompts_test).items())),
        },
        "test_prompts_seen_in_train": sum(p in train_prompts for p in prompts_test),
        "test_prompts_unique": len(set(prompts_test)),
        "vocab_size": vocab_size,
        "question_space": {c: {s: len(q) for s, q in d.items()} for c, d in _world()[1].items()},
    }


def write_data_card(out_dir: str | Path, stats: dict[str, Any]) -> Path:
    """Write ``README.md`` (the data card) into ``out_dir`` from ``stats``; pure function of the stats."""
    m, g, lw = stats["annotators_measured"], stats["gold_mean"], stats["mean_response_words"]
    cfg, sz = stats["annotator_config"], stats["sizes"]
    table = "\n".join(f"| `{k}` | {v:+.2f} |" for k, v in CONTENT_SCORES.items())
    files = "\n".join(f"| `{k}` | {v:,} |" for k, v in stats["file_bytes"].items())
    quality = ", ".join(f"{k} {v}" for k, v in stats["sft_quality"].items())
    space = "\n".join(f"| {c} | {d['train']} | {d['test']} |" for c, d in stats["question_space"].items())
    card = f"""# rlhf_lite world data (seed {stats['seed']})

Generated by `rlhf_lite.world.generate_world("data", seed={stats['seed']})`; regenerating rewrites every
file byte for byte. This is a synthetic stand-in for Anthropic HH-RLHF (the data of "Secrets of RLHF in
LLMs Part I: PPO"), small enough to train on a laptop CPU, with a gold judge that scores any response.

## Files

| file | rows | fields |
|---|---|---|
| `sft.jsonl` | {sz['sft']} | prompt, response, category, quality (ideal / filler / wrong / bare) |
| `prefs_train.jsonl` | {sz['prefs_train']} | prompt, chosen, rejected, category, gold_chosen, gold_rejected |
| `prefs_test.jsonl` | {sz['prefs_test']} | same as prefs_train |
| `prompts_train.jsonl` | {sz['prompts_train']} | prompt, category (PPO training prompts) |
| `prompts_test.jsonl` | {sz['prompts_test']} | prompt, category (held-out evaluation prompts, balanced) |
| `tokenizer.json` | - | word-level tokenizer, {stats['vocab_size']} tokens \
(`<pad>`=0, `<eos>`=1, `<unk>`=2) |
| `stats.json` | - | the numbers on this card |

As in HH-RLHF, `prompt` ends with `"\\n\\nAssistant:"` and `chosen` / `rejected` are full transcripts
(`chosen = prompt + response`, the response starting with a space). {stats['multi_turn_share']:.0%} of
prompts carry one benign earlier exchange. Categories: arithmetic, knowledge (a fictional knowledge
base), instruction (counting, opposites), harmful (requests to refuse).

Bytes per file:

| file | bytes |
|---|---|
{files}

## How the labels were made

Candidate responses (correct concise, correct padded with 1-3 filler phrases, answers buried after
fillers, wrong, bare, repetitive, over-refusals; for harmful prompts full / degenerate refusals and
compliance) are paired at random for one prompt. Simulated annotators pick with a Bradley-Terry draw,
P(A) = sigmoid((u_A - u_B) / T) with u = gold + b * words, T = {cfg['temperature']}, b = {cfg['length_bias']}
per word. Because b exceeds the gold concision penalty ({CONCISION_PER_WORD} per word), annotators
mildly prefer padded correct answers: a proxy gap for a reward model to learn and for PPO to exploit.

| split | agreement with gold ordering | recovered length bias | recovered T | pairs |
|---|---|---|---|---|
| train | {m['train']['agreement']:.4f} | {m['train']['length_bias']:.4f} | \
{m['train']['temperature']:.4f} | {int(m['train']['n'])} |
| test | {m['test']['agreement']:.4f} | {m['test']['length_bias']:.4f} | {m['test']['temperature']:.4f} | \
{int(m['test']['n'])} |

Agreement counts pairs whose gold scores differ. Length bias and T are recovered by a logistic
regression (no intercept) of the labels on the gold and word-count differences.

SFT demonstrations are mostly ideal: {quality}.

| mean | SFT demos | chosen (train) | rejected (train) | reference (test prompts) |
|---|---|---|---|---|
| gold score | {g['sft_demos']:.4f} | {g['chosen']:.4f} | {g['rejected']:.4f} | \
{g['reference_on_test_prompts']:.4f} |
| response words | {lw['sft']:.4f} | {lw['chosen']:.4f} | {lw['rejected']:.4f} | \
{lw['reference_on_test_prompts']:.4f} |

Chosen response longer than rejected in {stats['chosen_longer_share']:.1%} of training pairs.

## Train / test prompts

Test prompts use question strings held out from every training file (a fixed split of the question
space: each benign fact keeps at least one training phrasing; 30 % of harmful requests are held out).
Test prompts equal to a training prompt: {stats['test_prompts_seen_in_train']}; unique test prompts:
{stats['test_prompts_unique']} of {sz['prompts_test']}.

| category | train question strings | held-out test question strings |
|---|---|---|
{space}

## Gold judge

`rlhf_lite.world.gold_score(prompt, response, finished)` = content + concision + repetition + eos (+ a
floor that keeps the total >= {GOLD_FLOOR}). Content is judged on the first sentence (up to the first ".").

| content case | score |
|---|---|
{table}

Concision: -{CONCISION_PER_WORD} per word beyond the longest accepted answer. Repetition:
-{REPEAT_PER_TRIGRAM} per repeated word trigram occurrence and -{REPEAT_PER_STUTTER} per word equal to the
word before it. No EOS (length cap hit): -{NO_EOS_PENALTY}.
See the docstring of `rlhf_lite/world/judge.py` for the cases in full.
"""
    path = Path(out_dir) / "README.md"
    path.write_text(card, encoding="utf-8")
    return path
