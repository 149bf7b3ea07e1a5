"""Stage 2: the reward model (docs/paper.md Sec. 1, step 2; paper Sec. 3.1, Eq. 1-2), for every profile.

The RM is the SFT backbone with a bias-free linear head read at the last token (the EOS) of
``prompt + response + EOS``. Here it is the ``reward`` LoRA adapter plus its head on the shared base.
Training minimizes the Bradley-Terry pairwise loss, optionally plus an LM loss on the chosen response
(paper Eq. 2 with beta_rm = 1; the released script sets it to 0). One loop serves the world's pairs and
imported HH-RLHF pairs; on world data :mod:`rlhf_lite.rm_eval` adds what accuracy hides.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import data as data_mod
from .batching import last_token_index, pad_batch
from .models import AdapterStack
from .outdir import clear_out
from .ppo.core import ptx_loss
from .provenance import rm_provenance
from .settings import check_common, fits_data, positive, require, to_dict, warn_setting
from .stage import SFTRun, begin_stage, gold_judge_for
from .text import encode_pair_texts, model_prompt, model_response
from .utils import DATA_DIR, DivergedError, MetricsLog, progress, seed_everything, write_json
from .validate import check_stage_data

REWARD = "reward"
"""The reward model's adapter (and its folder in an RM run)."""


@dataclass(frozen=True)
class RMConfig:
    """Settings of the reward-model stage."""

    steps: int = 150
    """Optimizer steps (each a batch of preference pairs)."""
    batch_size: int = 64
    """Preference pairs per step (chosen and rejected run in one forward pass)."""
    lr: float = 2e-3
    """AdamW learning rate of the reward adapter and head (constant after a short warm-up)."""
    warmup_steps: int = 20
    """Linear warm-up steps."""
    lm_coef: float | None = 1.0
    """beta_rm of paper Eq. 2: weight of the LM loss on chosen responses; None turns it off."""
    eval_every: int = 25
    """Steps between train/test accuracy measurements."""
    n_eval_pairs: int = 256
    """Test pairs used for the periodic accuracy curve (the final numbers use all test pairs)."""
    n_fresh_prompts: int = 128
    """Test prompts for which two fresh SFT samples form a pair (gold agreement off the training
    distribution; world data only)."""
    max_new_tokens: int = 24
    """Response budget of the fresh SFT samples."""
    max_len: int | None = None
    """Token budget of one side of a pair; longer ones lose prompt tokens from the left (pretrained models).
    None: the tiny model's context (an error if a pair does not fit), or 512 for a pretrained model."""
    eval_batch_size: int = 128
    """Pairs per no-grad scoring pass."""
    n_test_pairs: int | None = None
    """Test pairs of the final accuracy and diagnostics (the first ones of the file); None: all of them."""
    seed: int = 0
    """Seed of batch order and sampling."""

    def validate(self, rows: dict[str, int] | None = None, gold: bool = False) -> None:
        """Fail before training on impossible values, naming the field; ``rows`` (rows per data file, once the
        data is checked) and ``gold`` (the data has a gold judge) add the checks against the data's size."""
        check_common(self)
        positive(self, "steps", "batch_size", "eval_every", "n_eval_pairs", "max_new_tokens", "eval_batch_size",
                 "n_fresh_prompts", "lr")
        require(self, self.n_test_pairs is None or self.n_test_pairs > 0, "n_test_pairs", "must be > 0 or None")
        require(self, self.warmup_steps >= 1, "warmup_steps", "must be >= 1")
        require(self, self.lm_coef is None or self.lm_coef > 0, "lm_coef", "must be > 0, or None (off)")
        require(self, self.max_len is None or self.max_len > 1, "max_len", "must be > 1 or None")
        warn_setting(self, self.warmup_steps > self.steps, "warmup_steps", f"exceeds steps ({self.steps}): the "
                     "learning rate never reaches RMConfig.lr")
        fits_data(self, "batch_size", rows, "prefs_train.jsonl", "preference pairs")
        if gold:
            fits_data(self, "n_fresh_prompts", rows, "prompts_test.jsonl", "test prompts")


# ----- the math -----------------------------------------------------------------------------------
def pairwise_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry ranking loss, paper Eq. 1: mean of -log sigmoid(r_chosen - r_rejected). Shapes (B,)."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def scores_at_eos(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Read the head at each row's last real token (the EOS): (B, T) values -> (B,) scores.

    Works for left and right padding alike.
    """
    idx = last_token_index(attention_mask)
    return values.gather(1, idx[:, None]).squeeze(1)


def rm_score(stack: AdapterStack, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """RM scores (B,) of full sequences ``prompt + response + EOS``."""
    return scores_at_eos(stack.values(REWARD, input_ids, attention_mask), attention_mask)


def rm_loss(
    stack: AdapterStack, ids: torch.Tensor, att: torch.Tensor, loss_mask: torch.Tensor, lm_coef: float | None
) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of a batch whose first half is chosen and second half rejected sequences (2B, T).

    ``loss_mask`` marks response tokens; the LM term (paper Eq. 2) uses only the chosen half's.
    """
    B = ids.shape[0] // 2
    if lm_coef:
        values, logits = stack.values_and_logits(REWARD, ids, att)
    else:
        values, logits = stack.values(REWARD, ids, att), None
    scores = scores_at_eos(values, att)
    rc, rr = scores[:B], scores[B:]
    loss = pairwise_loss(rc, rr)
    stats = {"rank_loss": loss.item(), "accuracy": (rc > rr).float().mean().item(), "margin": (rc - rr).mean().item()}
    if lm_coef:
        lm = ptx_loss(logits[:B, :-1], ids[:B, 1:], loss_mask[:B, 1:])
        loss = loss + lm_coef * lm
        stats["lm_loss"] = lm.item()
    stats["loss"] = loss.item()
    return loss, stats


# ----- batching -----------------------------------------------------------------------------------
Encoded = tuple[list[int], list[int], list[int], list[int]]


def encode_pairs(tok, pairs: Sequence[data_mod.PreferencePair], max_len: int, truncate: bool = False,
                 system_prompt: bool = True) -> list[Encoded]:
    """(chosen ids, mask, rejected ids, mask) per pair, in the model's format; pairs that truncation made
    identical are dropped."""
    texts = [model_prompt(tok, p.prompt, system_prompt) for p in pairs]
    chosen = encode_pair_texts(tok, texts, [p.chosen for p in pairs], max_len, truncate)
    rejected = encode_pair_texts(tok, texts, [p.rejected for p in pairs], max_len, truncate)
    return [(c, cm, r, rm) for (c, cm), (r, rm) in zip(chosen, rejected) if c != r]


def collate_pairs(batch, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chosen rows then rejected rows, right-padded: (2B, T) ids, attention and response masks."""
    seqs = [b[0] for b in batch] + [b[2] for b in batch]
    masks = [b[1] for b in batch] + [b[3] for b in batch]
    return pad_batch(seqs, masks, pad_id)


@torch.no_grad()
def score_texts(stack: AdapterStack, tok, prompt_texts: Sequence[str], responses: Sequence[str], max_len: int,
                batch_size: int = 256, truncate: bool = False) -> np.ndarray:
    """RM scores of (model prompt, response) pairs, in batches; responses get an EOS appended."""
    out = []
    for i in range(0, len(prompt_texts), batch_size):
        enc = encode_pair_texts(tok, prompt_texts[i:i + batch_size], responses[i:i + batch_size], max_len, truncate)
        ids, att, _ = pad_batch([e[0] for e in enc], [e[1] for e in enc], tok.pad_token_id)
        out.append(rm_score(stack, ids.to(stack.device), att.to(stack.device)).float().cpu())
    return torch.cat(out).numpy()


@torch.no_grad()
def pair_accuracy(stack: AdapterStack, encoded: Sequence[Encoded], pad_id: int, batch_size: int = 128
                  ) -> tuple[float, np.ndarray]:
    """Fraction of pairs with r_chosen > r_rejected, and the margins (N,)."""
    margins = []
    for i in range(0, len(encoded), batch_size):
        ids, att, _ = collate_pairs(encoded[i:i + batch_size], pad_id)
        s = rm_score(stack, ids.to(stack.device), att.to(stack.device)).float().cpu()
        B = ids.shape[0] // 2
        margins.append(s[:B] - s[B:])
    m = torch.cat(margins).numpy()
    return float((m > 0).mean()), m


# ----- the stage ----------------------------------------------------------------------------------
def build_rm_stack(sft_dir: str | Path, profile) -> tuple[AdapterStack, object]:
    """The SFT model as base (loaded as the profile's model spec says), with a fresh ``reward`` adapter and head."""
    from .loading import load_base, load_tokenizer_for

    model = SFTRun.open(sft_dir).model
    return AdapterStack(load_base(profile.model, model), [REWARD], profile.lora), load_tokenizer_for(model)


def context_length(stack: AdapterStack, profile) -> int:
    """The token budget of a sequence: the tiny model's context, else 512 (pretrained models know long ones,
    but the budgets of the profiles are sized for short sequences)."""
    return stack.base_model.config.max_position_embeddings if profile.model.is_tiny else 512


def train_rm(out_dir: str | Path, sft_dir: str | Path, cfg: RMConfig | None = None,
             data_dir: str | Path = DATA_DIR, profile=None, overwrite: bool = True) -> dict:
    """Train and evaluate the RM of ``profile`` (default: tiny); write ``reward/`` (a peft adapter folder with
    its head), metrics.jsonl, test_scores.npz, plots and summary.json (and probe.jsonl on world data). An
    earlier run in ``out_dir`` is replaced only with ``overwrite`` (see :mod:`rlhf_lite.outdir`)."""
    from .loading import load_tokenizer_for, optimizer_factory
    from .plotting import plot_rm
    from .ppo.guard import check_finite_module
    from .profiles import TINY
    from .rm_eval import pearson, world_diagnostics

    profile = profile or TINY
    cfg = cfg or profile.rm
    out, timer = begin_stage(out_dir, cfg, profile, overwrite)
    data_dir = Path(data_dir)
    check_stage_data("rm", data_dir, cfg, profile)  # every row, the batch against the data
    sft = SFTRun.open(sft_dir)
    if profile.model.is_tiny:  # the tiny model does not truncate: every pair must fit its context
        check_stage_data("rm", data_dir, cfg, profile, load_tokenizer_for(sft.model), sft.context_length())
    train_pairs = data_mod.load_preference_pairs(data_dir / "prefs_train.jsonl")
    test_pairs = data_mod.load_preference_pairs(data_dir / "prefs_test.jsonl")[: cfg.n_test_pairs]
    judge = gold_judge_for(data_dir)
    provenance = rm_provenance(cfg, profile, sft.model, data_dir)

    seed_everything(cfg.seed)
    stack, tok = build_rm_stack(sft_dir, profile)
    check_finite_module(stack.base_model, str(sft.model))
    max_len = cfg.max_len or context_length(stack, profile)
    truncate, system = not profile.model.is_tiny, profile.model.system_prompt
    train_enc = encode_pairs(tok, train_pairs, max_len, truncate, system)
    test_enc = encode_pairs(tok, test_pairs, max_len, truncate, system)
    if not train_enc or not test_enc:
        raise ValueError(f"no usable preference pairs in {data_dir} after truncation to {max_len} tokens")
    rng = random.Random(cfg.seed)
    eval_train = rng.sample(train_enc, min(cfg.n_eval_pairs, len(train_enc)))
    eval_test = test_enc[: cfg.n_eval_pairs]

    opt = optimizer_factory(profile.model, stack.device)(stack.adapter_parameters(REWARD), cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup_steps))
    clear_out(out)  # an earlier run's files go only now, with every check passed and the model loaded
    log = MetricsLog(out / "metrics.jsonl", stage="rm")
    order: list[int] = []
    stack.train()
    for step in progress(range(1, cfg.steps + 1), "reward model"):
        if len(order) < cfg.batch_size:  # epochs of shuffled pairs
            order += rng.sample(range(len(train_enc)), len(train_enc))
        batch = [train_enc[i] for i in order[: cfg.batch_size]]
        del order[: cfg.batch_size]
        ids, att, lm = (t.to(stack.device) for t in collate_pairs(batch, tok.pad_token_id))
        loss, stats = rm_loss(stack, ids, att, lm, cfg.lm_coef)
        if not math.isfinite(stats["loss"]):  # before the step: the adapter is never saved poisoned
            raise DivergedError(f"RM step {step}: the loss is {stats['loss']}; nothing was saved: lower RMConfig.lr "
                                f"({cfg.lr:g}) and run the stage again")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        row = {"step": step, **stats}
        if step % cfg.eval_every == 0 or step == cfg.steps:
            stack.eval()
            row["train_accuracy"], _ = pair_accuracy(stack, eval_train, tok.pad_token_id, cfg.eval_batch_size)
            row["test_accuracy"], _ = pair_accuracy(stack, eval_test, tok.pad_token_id, cfg.eval_batch_size)
            stack.train()
        log.log(row)
    log.close()
    stack.eval()
    stack.save_adapter(REWARD, out / REWARD)

    # One scoring pass over every test response serves accuracy and, on world data, every diagnostic.
    texts = [model_prompt(tok, p.prompt, system) for p in test_pairs]
    rm_all = score_texts(stack, tok, [t for t in texts for _ in (0, 1)],
                         [r for p in test_pairs for r in (p.chosen, p.rejected)], max_len, 2 * cfg.eval_batch_size,
                         truncate)
    margins = rm_all[0::2] - rm_all[1::2]
    responses = [model_response(tok, r) for p in test_pairs for r in (p.chosen, p.rejected)]
    lengths = np.array([len(ids) for ids in tok(responses, add_special_tokens=False)["input_ids"]])
    summary = {
        "stage": "rm", "profile": profile.name, "config": to_dict(cfg), "lora": to_dict(profile.lora),
        "provenance": provenance, "sft_model": provenance["sft_model"],
        "train_pairs": len(train_enc), "test_pairs": len(test_pairs),
        "test_accuracy": float((margins > 0).mean()),
        "final_train_accuracy": log.rows[-1]["train_accuracy"], "mean_test_margin": float(np.mean(margins)),
        "length_correlation": pearson(rm_all, lengths),
    }
    scores = {"rm": rm_all, "margins": margins, "length": lengths}
    if judge is not None:
        diag, arrays = world_diagnostics(stack, tok, test_pairs, rm_all, data_dir, cfg, max_len, system, out)
        summary.update(diag)
        scores.update(arrays)
    np.savez(out / "test_scores.npz", **scores)
    summary["wall_seconds"] = timer()
    write_json(out / "summary.json", summary)
    plot_rm(out, out / "rm_report.png")
    return summary


__all__ = ["REWARD", "RMConfig", "build_rm_stack", "collate_pairs", "encode_pairs", "pair_accuracy", "pairwise_loss",
           "rm_loss", "rm_score", "score_texts", "scores_at_eos", "train_rm"]
