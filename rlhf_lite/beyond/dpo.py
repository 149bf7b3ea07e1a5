"""Direct Preference Optimization (Rafailov et al. 2023, arXiv 2305.18290) on the world's preference pairs.

DPO skips the reward model and the RL loop. Its loss is the Bradley-Terry loss of the RM stage (paper
Eq. 1 of docs/paper.md Sec. 1) with the reward replaced by the policy's *implicit reward*
``r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x))``, where ``log pi(y|x)`` sums the log-probabilities of the
response tokens (EOS included) and the reference is the SFT model (the base with adapters off):

    L = -log sigmoid(beta * [(log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))])

(DPO Eq. 7). The optimum of the KL-regularized RL objective max E[r] - beta KL(pi || pi_ref) for the
Bradley-Terry reward is reached without sampling. ``label_smoothing`` eps gives conservative DPO (Mitchell
2023): the labels are taken as right with probability 1 - eps, which suits annotators who agree with the
gold judge on only ~70 % of pairs.

The stage trains the ``policy`` adapter on ``prefs_train.jsonl`` and measures it like every other method
(:func:`~rlhf_lite.beyond.measure.measure_policy`); with ``--rm`` the RM's score of the samples is logged
too (never trained on).
"""

from __future__ import annotations

import json
import math
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import data as data_mod
from ..loading import optimizer_factory
from ..models import AdapterStack
from ..outdir import clear_out
from ..policy_setup import load_policy_stack, policy_inputs
from ..ppo.config import CollapseBands
from ..ppo.core import clip_grad_norm_global, global_grad_norm, logprobs_from_logits
from ..ppo.masked import masked_sum
from ..ppo.monitors import detect_collapse
from ..rm import REWARD, collate_pairs, context_length, encode_pairs
from ..settings import check_common, fits_data, positive, require, to_dict
from ..stage import begin_stage
from ..utils import DATA_DIR, MetricsLog, progress, seed_everything, write_json
from .measure import StagePreset, as_monitors, measure_policy


@dataclass(frozen=True)
class DPOConfig:
    """Settings of the DPO stage. Defaults are the tiny profile's."""

    steps: int = 240
    """Optimizer steps (each a batch of preference pairs): as many as PPO's policy takes on the tiny profile
    (60 iterations x 2 epochs x 2 minibatches)."""
    batch_size: int = 40
    """Preference pairs per step (chosen and rejected run in one forward pass); 240 x 40 = 9600 pairs, what
    the RM stage trains on (150 x 64)."""
    lr: float = 1e-3
    """AdamW learning rate of the policy adapter (PPO's policy_lr on the tiny profile)."""
    adam_betas: tuple[float, float] = (0.9, 0.95)
    """Adam betas (PPO's)."""
    warmup_steps: int = 10
    """Linear warm-up steps, then a constant learning rate."""
    beta: float = 0.1
    """beta of DPO Eq. 7: the strength of the implicit KL constraint (DPO's default 0.1)."""
    label_smoothing: float = 0.0
    """Conservative DPO: the probability that a label is flipped (0: plain DPO)."""
    max_grad_norm: float | None = None
    """Clip the gradient norm of the policy adapter to this; None: no clipping."""
    max_len: int | None = None
    """Token budget of one side of a pair (as RMConfig.max_len); None: the tiny model's context, 512 otherwise."""
    eval_every: int = 20
    """Steps between measurements on the test prompts (gold, KL, RM reward, monitors)."""
    max_new_tokens: int = 24
    """Response budget of the measurement's samples (PPO's rollout budget)."""
    max_prompt_tokens: int | None = None
    """Longest model prompt of the measurement; None: the model's context minus max_new_tokens."""
    collapse: CollapseBands = field(default_factory=lambda: CollapseBands(baseline_iterations=1))
    """Bands of the collapse detector, applied to the measurements; the baseline is the first one (the SFT
    model), since DPO measures every eval_every steps rather than every iteration."""
    seed: int = 0
    """Seed of adapter initialization and batch order."""

    def validate(self, context_length: int | None = None, rows: dict[str, int] | None = None) -> None:
        """Fail before any training on impossible settings, naming the field; ``context_length`` (the model's)
        and ``rows`` (rows per data file, once the data is checked) add the checks against them."""
        check_common(self)
        positive(self, "steps", "batch_size", "lr", "beta", "eval_every", "max_new_tokens")
        fits_data(self, "batch_size", rows, "prefs_train.jsonl", "preference pairs")
        require(self, self.warmup_steps >= 1, "warmup_steps", "must be >= 1")
        require(self, 0 <= self.label_smoothing < 0.5, "label_smoothing", "must lie in [0, 0.5)")
        for name in ("max_grad_norm", "max_prompt_tokens"):
            require(self, getattr(self, name) is None or getattr(self, name) > 0, name, "must be > 0 or None")
        require(self, self.max_len is None or self.max_len > 1, "max_len", "must be > 1 or None")
        if context_length is not None:
            require(self, self.max_new_tokens < context_length, "max_new_tokens",
                    f"must be below the model's context length ({context_length})")


DPO_PRESETS: dict[str, StagePreset] = {p.name: p for p in [
    StagePreset("dpo", "DPO (Rafailov et al. 2023) with its default beta = 0.1", {}),
    StagePreset("dpo_beta_0.5", "DPO with a stronger pull to the reference, beta = 0.5", {"beta": 0.5}),
    StagePreset("cdpo", "conservative DPO: labels flipped with probability 0.2", {"label_smoothing": 0.2}),
]}
"""Presets as changes to a profile's DPO settings."""


# ----- the math -----------------------------------------------------------------------------------
def sequence_logprobs(logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """log pi(y|x) of each row: the sum of log softmax(logits)[label] over the masked (response) positions.

    logits: (B, T, V) with ``logits[:, t]`` predicting ``labels[:, t]`` (already shifted); labels, mask: (B, T).
    Returns (B,). Labels off the mask may be anything (they are replaced before the gather).
    """
    m = mask.bool()
    return masked_sum(logprobs_from_logits(logits, torch.where(m, labels, 0)), m, dim=-1)


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, beta: float,
             label_smoothing: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
    """DPO Eq. 7 (with conservative DPO's label smoothing eps), the mean over pairs.

    All inputs (B,) sequence log-probs. h = beta * ((pi_w - ref_w) - (pi_l - ref_l));
    loss = mean of -(1 - eps) log sigmoid(h) - eps log sigmoid(-h). Returns (0-dim loss, stats), stats detached:
      reward_accuracy - share of pairs whose implicit reward ranks the chosen response higher (h > 0),
      margin          - mean h, the implicit reward margin,
      chosen_reward, rejected_reward - mean beta * (log pi - log pi_ref) of each side.
    """
    chosen = beta * (policy_chosen - ref_chosen)
    rejected = beta * (policy_rejected - ref_rejected)
    h = chosen - rejected
    loss = (-(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)).mean()
    with torch.no_grad():
        stats = {"reward_accuracy": (h > 0).float().mean(), "margin": h.mean(), "chosen_reward": chosen.mean(),
                 "rejected_reward": rejected.mean()}
    return loss, stats


def pair_logprobs(stack: AdapterStack, name: str | None, input_ids: Tensor, attention_mask: Tensor,
                  loss_mask: Tensor) -> Tensor:
    """:func:`sequence_logprobs` of right-padded sequences (B, T) under adapter ``name`` (None: the reference),
    with ``loss_mask`` marking the response tokens. lm_head runs only at the positions that predict a response
    token (a real vocabulary's (B, T, V) logits would not fit)."""
    hidden = stack.hidden(name, input_ids, attention_mask)[:, :-1]  # position t predicts token t + 1
    m = loss_mask[:, 1:].bool()
    logits = stack.base_model.lm_head(hidden[m]).float()  # (M, V) over the M response tokens
    logp = logprobs_from_logits(logits[None], input_ids[:, 1:][m][None])[0]
    rows = m.nonzero()[:, 0]
    return torch.zeros(input_ids.shape[0], dtype=logp.dtype, device=logp.device).index_add(0, rows, logp)


# ----- the stage ----------------------------------------------------------------------------------
def train_dpo(out_dir: str | Path, sft_dir: str | Path, cfg: DPOConfig | None = None, data_dir: str | Path = DATA_DIR,
              profile=None, rm_dir: str | Path | None = None, preset: str = "custom", overwrite: bool = True) -> dict:
    """Train a DPO policy adapter on the SFT model of ``profile`` (default tiny); write ``policy/`` (a peft
    adapter folder), metrics.jsonl, samples.jsonl, summary.json and dpo_monitors.png. ``rm_dir``: a reward
    model whose score of the measured samples is logged (it plays no part in training). An earlier run in
    ``out_dir`` is replaced only with ``overwrite`` (see :mod:`rlhf_lite.outdir`)."""
    from ..profiles import TINY
    from .plots import plot_monitors

    profile = profile or TINY
    cfg = cfg or profile.dpo
    out, timer = begin_stage(out_dir, cfg, profile, overwrite)
    data_dir = Path(data_dir)
    inputs = policy_inputs("dpo", cfg, sft_dir, rm_dir, data_dir, profile)
    pairs = data_mod.load_preference_pairs(data_dir / "prefs_train.jsonl")
    tok, system = inputs.tokenizer, profile.model.system_prompt

    seed_everything(cfg.seed)
    stack = load_policy_stack(profile, inputs.base_source, ["policy"] + ([REWARD] if rm_dir else []), rm_dir)
    max_len = cfg.max_len or context_length(stack, profile)
    encoded = encode_pairs(tok, pairs, max_len, not profile.model.is_tiny, system)
    if not encoded:
        raise ValueError(f"no usable preference pairs in {data_dir / 'prefs_train.jsonl'} at {max_len} tokens")
    params = stack.adapter_parameters("policy")
    opt = optimizer_factory(profile.model, stack.device)(params, cfg.lr, betas=cfg.adam_betas)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup_steps))
    rng = random.Random(cfg.seed)
    clear_out(out)  # an earlier run's files go only now, with every check passed and the models loaded
    log = MetricsLog(out / "metrics.jsonl", stage="dpo")
    history: list[dict] = []
    collapse = None
    last_eval = None

    def measure(step: int) -> dict:
        nonlocal collapse, last_eval
        row, last_eval, _ = measure_policy(stack, "policy", tok, inputs.test_prompts, cfg.max_new_tokens, inputs.judge,
                                           stack if rm_dir else None)
        row = as_monitors({"iteration": step, **row})
        history.append(row)
        if collapse is None:
            collapse = detect_collapse(history, cfg.collapse)
        return row

    log.log({"step": 0, **measure(0)})
    order: list[int] = []
    skipped = 0
    for step in progress(range(1, cfg.steps + 1), "DPO"):
        if len(order) < cfg.batch_size:  # epochs of shuffled pairs
            order += rng.sample(range(len(encoded)), len(encoded))
        batch = [encoded[i] for i in order[: cfg.batch_size]]
        del order[: cfg.batch_size]
        ids, att, lm = (t.to(stack.device) for t in collate_pairs(batch, tok.pad_token_id))
        stack.train()
        with torch.no_grad():
            ref = pair_logprobs(stack, None, ids, att, lm)
        pol = pair_logprobs(stack, "policy", ids, att, lm)
        B = len(batch)
        loss, st = dpo_loss(pol[:B], pol[B:], ref[:B], ref[B:], cfg.beta, cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = clip_grad_norm_global(params, cfg.max_grad_norm) if cfg.max_grad_norm else global_grad_norm(params)
        row = {"step": step, "loss": loss.item(), "grad_norm": norm, **{k: v.item() for k, v in st.items()},
               "logp_chosen": (pol[:B].detach() - ref[:B]).mean().item(),
               "logp_rejected": (pol[B:].detach() - ref[B:]).mean().item()}
        if math.isfinite(row["loss"]) and math.isfinite(norm):
            opt.step()
        else:  # one NaN step would poison Adam's moments for good
            warnings.warn(f"DPO step {step}: non-finite loss or gradient norm; step skipped", RuntimeWarning,
                          stacklevel=2)
            skipped += 1
        sched.step()
        if step % cfg.eval_every == 0 or step == cfg.steps:
            row.update(measure(step))
        log.log(row)
    log.close()
    stack.eval()
    stack.save_adapter("policy", out / "policy")
    if last_eval is not None:
        with (out / "samples.jsonl").open("w") as fh:
            for s in last_eval.samples(8):
                fh.write(json.dumps(s, sort_keys=True) + "\n")
    train_rows = [r for r in log.rows if "loss" in r]
    summary = {
        "stage": "dpo", "preset": preset, "profile": profile.name, "config": to_dict(cfg), "lora": to_dict(profile.lora),
        "provenance": inputs.provenance, "steps": cfg.steps, "train_pairs": len(encoded), "skipped_updates": skipped,
        "final_reward_accuracy": sum(r["reward_accuracy"] for r in train_rows[-10:]) / len(train_rows[-10:]),
        **run_summary(history, collapse), "wall_seconds": timer(),
    }
    write_json(out / "summary.json", summary)
    plot_monitors([out], out / "dpo_monitors.png", labels=[preset], xlabel="DPO step")
    return summary


def run_summary(history: list[dict], collapse: tuple[int, str] | None) -> dict:
    """The summary figures every method of notebook 06 reports, from its measurement rows (first row: the
    starting policy): gold at the start, end and peak, and the last measurement's KL, reward and length."""
    golds = [r.get("gold_score") for r in history]
    last = history[-1]
    return {
        "initial_gold_score": golds[0], "final_gold_score": golds[-1],
        "peak_gold_score": max(golds) if golds[0] is not None else None,
        "final_kl_per_sequence": last["eval_kl_per_sequence"], "final_kl": last["eval_kl_per_token"],
        "initial_reward": history[0].get("eval_reward"), "final_reward": last.get("eval_reward"),
        "initial_response_length": history[0]["eval_response_length"],
        "final_response_length": last["eval_response_length"],
        "collapse_detected": collapse is not None, "collapse_iteration": collapse[0] if collapse else None,
        "collapse_reason": collapse[1] if collapse else None,
    }


__all__ = ["DPO_PRESETS", "DPOConfig", "dpo_loss", "pair_logprobs", "run_summary", "sequence_logprobs", "train_dpo"]
