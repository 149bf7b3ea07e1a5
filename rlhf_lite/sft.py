"""Stage 1: supervised fine-tuning (docs/paper.md Sec. 1, step 1), for every profile.

The paper starts from an SFT model. Here the SFT stage makes one, in one of two ways:

* **the tiny model, from scratch**: (1) LM pretraining on world text (every preference transcript, good and
  bad responses alike), so the model learns the language of the world but not which answers are good: the
  "pretrained, non-SFT" model of the paper's Fig. 8; (2) SFT on the demonstrations, with the loss on
  response tokens (and EOS) only. Both are full-parameter fine-tunes.
* **a pretrained model, with LoRA**: SFT of a LoRA adapter on the demonstrations in the model's chat
  template (QLoRA when the profile quantizes the base), then the adapter is merged into a float copy of the
  base.

Either way ``out/model`` is a plain Hugging Face model folder. Later stages put their adapters on it, so
disabling the adapters gives exactly the SFT model: the reference model of PPO.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from . import data as data_mod
from .batching import length_buckets, pad_batch
from .evaluation import evaluate_gold
from .models import position_ids_from_mask
from .outdir import clear_out
from .provenance import sft_provenance
from .settings import check_common, fits_data, positive, require, to_dict, warn_setting
from .stage import begin_stage, eval_prompts, gold_judge_for
from .text import encode_pair_texts, model_prompt
from .tracking import samples_markdown
from .utils import DATA_DIR, DivergedError, MetricsLog, progress, seed_everything, write_json
from .validate import check_stage_data


@dataclass(frozen=True)
class SFTConfig:
    """Settings of the SFT stage (tiny model: pretraining then SFT from scratch; pretrained model: LoRA SFT)."""

    pretrain_steps: int = 350
    """Optimizer steps of LM pretraining on world text (loss on every token); 0 for a pretrained model."""
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
    max_len: int | None = None
    """Token budget of a demonstration (longer ones lose prompt tokens from the left); None: the tiny
    model's context (an error if one does not fit), or 512 tokens for a pretrained model."""
    seed: int = 0
    """Seed of initialisation, batch order and dropout."""

    def validate(self, rows: dict[str, int] | None = None, gold: bool = False) -> None:
        """Fail before training on impossible values, naming the field; ``rows`` (rows per data file, once the
        data is checked) and ``gold`` (the data has a gold judge) add the checks against the data's size."""
        check_common(self)
        positive(self, "batch_size", "max_new_tokens", "n_eval_prompts", "log_every", "eval_every", "lr")
        require(self, self.pretrain_steps >= 0, "pretrain_steps", "must be >= 0")
        require(self, self.sft_steps >= 0, "sft_steps", "must be >= 0")
        require(self, self.pretrain_steps + self.sft_steps > 0, "sft_steps", "and pretrain_steps are both 0: nothing "
                "would train")
        require(self, self.warmup_steps >= 1, "warmup_steps", "must be >= 1")
        require(self, self.weight_decay >= 0, "weight_decay", "must be >= 0")
        require(self, self.max_len is None or self.max_len > 1, "max_len", "must be > 1 or None")
        steps = [n for n in (self.pretrain_steps, self.sft_steps) if n]
        warn_setting(self, self.warmup_steps > min(steps), "warmup_steps", f"exceeds a phase's steps ({min(steps)}): "
                     "the learning rate never reaches SFTConfig.lr in it")
        warn_setting(self, self.log_every > max(steps), "log_every", "exceeds every phase's steps: no loss is logged")
        fits_data(self, "batch_size", rows, "sft.jsonl", "demonstrations")
        if self.pretrain_steps and rows is not None and "prefs_train.jsonl" in rows:
            require(self, self.batch_size <= 2 * rows["prefs_train.jsonl"], "batch_size", "exceeds the "
                    f"{2 * rows['prefs_train.jsonl']} pretraining texts of prefs_train.jsonl")
        if gold:
            fits_data(self, "n_eval_prompts", rows, "prompts_test.jsonl", "test prompts")


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


@dataclass
class Phase:
    """One training phase: its name, examples (ids, loss mask) and step count."""

    name: str
    examples: list[tuple[list[int], list[int]]]
    steps: int
    step0: int = 0


def train_phase(model, params: Sequence[torch.nn.Parameter], phase: Phase, cfg: SFTConfig, pad_id: int,
                rng: random.Random, log: MetricsLog, on_eval, make_optimizer) -> None:
    """One phase (pretraining or SFT): AdamW with warm-up and cosine decay over random batches, gradient
    norm clipped to 1. ``model`` is the causal LM that computes the loss (the tiny model, or a pretrained
    model with its SFT adapter); ``params`` are what the optimizer trains."""
    if phase.steps == 0:
        return
    opt = make_optimizer(params, cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.warmup_steps, phase.steps))
    model.train()
    device = next(iter(params)).device
    running = 0.0
    bar = progress(range(phase.steps), phase.name)
    for step in bar:
        batch = rng.sample(phase.examples, cfg.batch_size) if len(phase.examples) >= cfg.batch_size else phase.examples
        ids, att, lm = (t.to(device) for t in pad_batch([b[0] for b in batch], [b[1] for b in batch], pad_id))
        loss = lm_loss(model, ids, att, lm)
        value = loss.item()
        if not math.isfinite(value):  # before the step: the weights are never saved poisoned
            raise DivergedError(f"SFT {phase.name} step {step + 1}: the loss is {value}; nothing was saved: lower "
                                f"SFTConfig.lr ({cfg.lr:g}) and run the stage again")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        running += value
        if (step + 1) % cfg.log_every == 0:
            log.log({"phase": phase.name, "step": phase.step0 + step + 1, "loss": running / cfg.log_every,
                     "lr": sched.get_last_lr()[0]})
            bar.set_postfix(loss=f"{running / cfg.log_every:.3f}")
            running = 0.0
        if (step + 1) % cfg.eval_every == 0 or step + 1 == phase.steps:
            on_eval(phase.name, phase.step0 + step + 1)


def encode_demos(tok, rows: Sequence[tuple[str, str]], max_len: int, truncate: bool, system_prompt: bool,
                 response_only: bool = True) -> list[tuple[list[int], list[int]]]:
    """Token ids and loss masks of (HH prompt, response) rows in the model's format; the loss mask is the
    response (and EOS) for SFT, every token for LM pretraining (``response_only=False``)."""
    texts = [model_prompt(tok, p, system_prompt) for p, _ in rows]
    enc = encode_pair_texts(tok, texts, [r for _, r in rows], max_len, truncate=truncate)
    return enc if response_only else [(ids, [1] * len(ids)) for ids, _ in enc]


def train_sft(out_dir: str | Path, cfg: SFTConfig | None = None, data_dir: str | Path = DATA_DIR,
              profile=None, overwrite: bool = True) -> dict:
    """Run the SFT stage of ``profile`` (default: tiny) end to end; write model, metrics, plots and summary.json.

    Writes ``out_dir/model`` (the SFT model and tokenizer, the base of later stages), ``metrics.jsonl``,
    ``summary.json`` and ``sft_curves.png``; the tiny model also writes ``out_dir/pretrained`` (the
    LM-pretrained model before SFT), a pretrained model its SFT adapter in ``out_dir/sft_adapter``. An
    earlier run in ``out_dir`` is replaced only with ``overwrite`` (see :mod:`rlhf_lite.outdir`). Returns the
    summary.
    """
    from .profiles import TINY
    from .sft_models import make_sft_model, save_sft_model

    profile = profile or TINY
    cfg = cfg or profile.sft
    out, timer = begin_stage(out_dir, cfg, profile, overwrite)
    data_dir = Path(data_dir)
    check_stage_data("sft", data_dir, cfg, profile)  # every row, its token budget, the batch against the data
    sft_rows = data_mod.load_sft(data_dir / "sft.jsonl")
    pref_pairs = data_mod.load_preference_pairs(data_dir / "prefs_train.jsonl") if cfg.pretrain_steps else []
    judge = gold_judge_for(data_dir)

    seed_everything(cfg.seed)
    rng = random.Random(cfg.seed)
    sm = make_sft_model(profile, data_dir, cfg.seed)  # the model to train, its tokenizer and trainable params
    tok, system = sm.tokenizer, profile.model.system_prompt
    test_prompts = eval_prompts(tok, data_dir, cfg.n_eval_prompts, system) if judge else []
    max_len = cfg.max_len or sm.context
    truncate = not profile.model.is_tiny
    pretrain = encode_demos(tok, [(p.prompt, r) for p in pref_pairs for r in (p.chosen, p.rejected)], max_len,
                            truncate, system, response_only=False)
    demos = encode_demos(tok, [(r["prompt"], r["response"]) for r in sft_rows], max_len, truncate, system)

    clear_out(out)  # an earlier run's files go only now, with every check passed and the model built
    log = MetricsLog(out / "metrics.jsonl", stage="sft")
    last_eval = {}  # phase -> its final evaluation, reused for the summary (no second sampling pass)

    def gold(phase: str | None = None, step: int = 0):
        if judge is None:
            return None
        with torch.no_grad(), sm.causal_lm() as lm:
            ev = evaluate_gold(lm, tok, test_prompts, cfg.max_new_tokens, judge, device=sm.device)
        if phase is not None:
            last_eval[phase] = ev
            log.log({"phase": phase, "step": step, "gold_score": ev.score,
                     "response_length": sum(ev.lengths) / len(ev.lengths),
                     **{f"gold/{k}": v for k, v in ev.by_category.items()}})
        return ev

    before = gold()
    if before is not None:
        log.log({"phase": "init", "step": 0, "gold_score": before.score})
    with sm.causal_lm() as lm:
        train_phase(lm, sm.params, Phase("pretrain", pretrain, cfg.pretrain_steps), cfg, tok.pad_token_id, rng,
                    log, gold, sm.make_optimizer)
    pretrained_eval = before  # a pretrained model's SFT starts from the pretrained model itself
    if profile.model.is_tiny:  # the Fig. 8 ablation starts PPO from the model before SFT
        sm.model.save_pretrained(out / "pretrained")
        tok.save_pretrained(out / "pretrained")
        pretrained_eval = last_eval.get("pretrain") or gold()
    with sm.causal_lm() as lm:
        train_phase(lm, sm.params, Phase("sft", demos, cfg.sft_steps, cfg.pretrain_steps), cfg, tok.pad_token_id,
                    rng, log, gold, sm.make_optimizer)
    sm.model.eval()
    after = last_eval.get("sft") or gold()
    trainable = sum(p.numel() for p in sm.params)
    save_sft_model(sm, profile, out)
    if after is not None:  # the final model's samples, as text beside the curves
        log.text(cfg.pretrain_steps + cfg.sft_steps, "samples/sft", samples_markdown(after.samples(8)))
    log.close()

    summary = {
        "stage": "sft",
        "profile": profile.name,
        "config": to_dict(cfg),
        "model": to_dict(profile.model),
        "base_source": sm.source,
        "provenance": sft_provenance(cfg, profile, data_dir),
        "parameters": sm.parameters,
        "trainable_parameters": trainable,
        "wall_seconds": None,
    }
    if judge is not None:
        demo = judge.report([r["prompt"] for r in sft_rows], [r["response"] for r in sft_rows], [True] * len(sft_rows))
        summary.update({
            "gold_score_before": before.score,
            "gold_score_pretrained": pretrained_eval.score if pretrained_eval else None,
            "gold_score_after": after.score,
            "gold_score_demos": demo["overall"],
            "gold_after_by_category": after.by_category,
            "response_length_after": sum(after.lengths) / len(after.lengths),
            "samples_before": before.samples(4),
            "samples_after": after.samples(8),
        })
    summary["wall_seconds"] = timer()
    write_json(out / "summary.json", summary)
    from .plotting import plot_sft

    plot_sft(out / "metrics.jsonl", out / "sft_curves.png", summary)
    return summary


__all__ = ["SFTConfig", "encode_demos", "lm_loss", "lr_lambda", "train_phase", "train_sft"]
