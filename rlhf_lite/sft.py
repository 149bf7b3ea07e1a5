"""Stage 1: supervised fine-tuning (PAPER.md Sec. 1, step 1).

The paper starts from an SFT model; nothing can be downloaded here, so the tiny profile makes one:

1. **LM pretraining** on world text (every preference transcript, good and bad responses alike), so the
   model learns the language of the world but not which answers are good: this is the "pretrained,
   non-SFT" model of the paper's Fig. 8.
2. **SFT** on the demonstrations, with the loss on response tokens (and EOS) only.

Both are full-parameter fine-tunes of a small from-scratch Llama. The SFT weights then become the
base that later stages put adapters on, so that disabling the adapters gives the reference model.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from . import data as data_mod
from .batching import encode_examples, length_buckets, pad_batch
from .evaluation import evaluate_gold, gold_of_responses
from .models import TinyModelConfig, build_tiny_model, position_ids_from_mask
from .tokenizer import load_tokenizer
from .utils import DATA_DIR, MetricsLog, Stopwatch, progress, quiet_hf_progress, seed_everything, write_json


@dataclass(frozen=True)
class SFTConfig:
    """Settings of the SFT stage (tiny profile: pretraining then SFT of a from-scratch model)."""

    pretrain_steps: int = 350
    """Optimizer steps of LM pretraining on world text (loss on every token)."""
    sft_steps: int = 400
    """Optimizer steps of SFT on demonstrations (loss on response tokens only)."""
    batch_size: int = 64
    """Sequences per step."""
    lr: float = 2e-3
    """Peak AdamW learning rate (linear warm-up, cosine decay), for each phase."""
    warmup_steps: int = 30
    """Warm-up steps at the start of each phase."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    log_every: int = 25
    """Steps between metric rows."""
    eval_every: int = 200
    """Steps between gold-score measurements (sampling on test prompts)."""
    max_new_tokens: int = 24
    """Response budget when sampling for the gold measurement."""
    n_eval_prompts: int = 256
    """Test prompts used for every gold measurement."""
    seed: int = 0
    """Seed of initialisation, batch order and dropout."""

    def validate(self) -> None:
        """Fail before training on impossible values."""
        for name in ("batch_size", "max_new_tokens", "n_eval_prompts", "log_every", "eval_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SFTConfig.{name} must be positive, got {getattr(self, name)}")
        if self.pretrain_steps < 0 or self.sft_steps < 0:
            raise ValueError("SFTConfig.pretrain_steps and sft_steps must be >= 0")
        if not self.lr > 0:
            raise ValueError(f"SFTConfig.lr must be > 0, got {self.lr}")


def lr_lambda(warmup: int, total: int):
    """Linear warm-up to 1, then cosine decay to 0.1 (a multiplier for LambdaLR)."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        frac = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
    return f


def lm_loss(model: PreTrainedModel, ids: torch.Tensor, att: torch.Tensor, loss_mask: torch.Tensor,
            rows_per_bucket: int | None = 32) -> torch.Tensor:
    """Mean next-token cross-entropy over positions whose *target* has loss_mask 1. Shapes (B, T).

    The batch runs in length buckets (:func:`length_buckets`): the same loss, on far fewer padded positions.
    """
    total, count = ids.new_zeros((), dtype=torch.float32), 0
    for rows, lo, hi in length_buckets(att, rows_per_bucket):
        b_ids, b_att = ids[rows, lo:hi], att[rows, lo:hi]
        logits = model(input_ids=b_ids, attention_mask=b_att, position_ids=position_ids_from_mask(b_att)).logits
        m = loss_mask[rows, lo + 1:hi].bool()
        total = total + F.cross_entropy(logits[:, :-1][m].float(), b_ids[:, 1:][m], reduction="sum")
        count += int(m.sum())
    return total / max(count, 1)


def _encode_all(tok: PreTrainedTokenizerFast, pairs: Sequence[tuple[str, str]], max_len: int, response_only: bool
                ) -> list[tuple[list[int], list[int]]]:
    enc = encode_examples(tok, [p for p, _ in pairs], [r for _, r in pairs], max_len)
    return enc if response_only else [(ids, [1] * len(ids)) for ids, _ in enc]


def _train_phase(
    model: PreTrainedModel, examples: list[tuple[list[int], list[int]]], steps: int, cfg: SFTConfig,
    pad_id: int, rng: random.Random, log: MetricsLog, phase: str, step0: int, on_eval,
) -> None:
    """One phase (pretraining or SFT): AdamW with warm-up and cosine decay over random batches."""
    if steps == 0:
        return
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.warmup_steps, steps))
    model.train()
    running = 0.0
    bar = progress(range(steps), phase)
    for step in bar:
        batch = rng.sample(examples, cfg.batch_size) if len(examples) >= cfg.batch_size else examples
        ids, att, lm = pad_batch([b[0] for b in batch], [b[1] for b in batch], pad_id)
        loss = lm_loss(model, ids, att, lm)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        running += loss.item()
        if (step + 1) % cfg.log_every == 0:
            log.log({"phase": phase, "step": step0 + step + 1, "loss": running / cfg.log_every,
                     "lr": sched.get_last_lr()[0]})
            bar.set_postfix(loss=f"{running / cfg.log_every:.3f}")
            running = 0.0
        if (step + 1) % cfg.eval_every == 0 or step + 1 == steps:
            on_eval(phase, step0 + step + 1)


def train_sft(out_dir: str | Path, cfg: SFTConfig | None = None, data_dir: str | Path = DATA_DIR,
              model_cfg: TinyModelConfig | None = None) -> dict:
    """Run the tiny profile's SFT stage end to end; write model, metrics, plots and summary.json.

    Writes ``out_dir/model`` (the SFT model and tokenizer, the base for later stages),
    ``out_dir/pretrained`` (the LM-pretrained model before SFT), ``metrics.jsonl``, ``summary.json``
    and ``sft_curves.png``. Returns the summary.
    """
    cfg = cfg or SFTConfig()
    model_cfg = model_cfg or TinyModelConfig()
    cfg.validate()
    timer = Stopwatch()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = Path(data_dir)
    tok = load_tokenizer(data_dir / "tokenizer.json")
    sft_rows = data_mod.load_sft(data_dir / "sft.jsonl")
    pref_pairs = data_mod.load_preference_pairs(data_dir / "prefs_train.jsonl")
    test_prompts = [r["prompt"] for r in data_mod.load_prompts(data_dir / "prompts_test.jsonl")][: cfg.n_eval_prompts]

    seed_everything(cfg.seed)
    rng = random.Random(cfg.seed)
    model = build_tiny_model(len(tok), tok.pad_token_id, tok.eos_token_id, model_cfg, cfg.seed)
    max_len = model_cfg.max_positions
    pretrain_text = [(p.prompt, r) for p in pref_pairs for r in (p.chosen, p.rejected)]
    pretrain = _encode_all(tok, pretrain_text, max_len, response_only=False)
    demos = _encode_all(tok, [(r["prompt"], r["response"]) for r in sft_rows], max_len, response_only=True)

    log = MetricsLog(out / "metrics.jsonl")

    last_eval = {}  # phase -> its final evaluation, reused for the summary (no second sampling pass)

    def gold(phase: str, step: int) -> float:
        ev = evaluate_gold(model, tok, test_prompts, cfg.max_new_tokens)
        last_eval[phase] = ev
        mean_len = sum(ev.lengths) / len(ev.lengths)
        log.log({"phase": phase, "step": step, "gold_score": ev.score, "response_length": mean_len,
                 **{f"gold/{k}": v for k, v in ev.report.items() if k not in ("overall", "n")}})
        return ev.score

    before = evaluate_gold(model, tok, test_prompts, cfg.max_new_tokens)
    log.log({"phase": "init", "step": 0, "gold_score": before.score})
    _train_phase(model, pretrain, cfg.pretrain_steps, cfg, tok.pad_token_id, rng, log, "pretrain", 0, gold)
    model.save_pretrained(out / "pretrained")
    tok.save_pretrained(out / "pretrained")
    pretrained_eval = last_eval.get("pretrain") or evaluate_gold(model, tok, test_prompts, cfg.max_new_tokens)
    _train_phase(model, demos, cfg.sft_steps, cfg, tok.pad_token_id, rng, log, "sft", cfg.pretrain_steps, gold)
    model.eval()
    after = last_eval.get("sft") or evaluate_gold(model, tok, test_prompts, cfg.max_new_tokens)
    model.save_pretrained(out / "model")
    tok.save_pretrained(out / "model")
    log.close()

    demo_gold = gold_of_responses([r["prompt"] for r in sft_rows], [r["response"] for r in sft_rows])
    summary = {
        "stage": "sft",
        "config": asdict(cfg),
        "model": asdict(model_cfg),
        "parameters": sum(p.numel() for p in model.parameters()),
        "gold_score_before": before.score,
        "gold_score_pretrained": pretrained_eval.score,
        "gold_score_after": after.score,
        "gold_score_demos": demo_gold["overall"],
        "gold_after_by_category": {k: v for k, v in after.report.items() if k not in ("overall", "n")},
        "response_length_after": sum(after.lengths) / len(after.lengths),
        "samples_before": before.samples(4),
        "samples_after": after.samples(8),
        "wall_seconds": timer(),
    }
    write_json(out / "summary.json", summary)
    from .plotting import plot_sft

    plot_sft(out / "metrics.jsonl", out / "sft_curves.png", summary)
    return summary


def load_sft_model(sft_dir: str | Path, which: str = "model") -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Load the SFT (``which="model"``) or pretrained (``"pretrained"``) model written by train_sft."""
    from transformers import AutoModelForCausalLM

    path = Path(sft_dir) / which
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no model: run `python -m rlhf_lite sft --out {sft_dir}` first")
    quiet_hf_progress()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), load_tokenizer(path / "tokenizer.json")


def model_fingerprint(sft_dir: str | Path, which: str = "model") -> dict[str, str]:
    """Identity of a model written by train_sft: its absolute folder and the sha256 (16 hex digits) of its
    weights. The RM stage records it, so PPO can refuse an RM trained on another SFT model."""
    path = (Path(sft_dir) / which).resolve()
    weights = path / "model.safetensors"
    if not weights.exists():
        raise FileNotFoundError(f"{weights} not found: run `python -m rlhf_lite sft --out {sft_dir}` first")
    digest = hashlib.sha256()
    with weights.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return {"path": str(path), "sha256": digest.hexdigest()[:16]}
