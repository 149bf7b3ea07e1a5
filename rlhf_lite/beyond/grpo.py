"""Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath, arXiv 2402.03300) against the reward model.

GRPO is PPO without the critic. Each prompt gets a *group* of G sampled responses; the RM scores each, and
a response's advantage is its score relative to its group's (GRPO Sec. 4.1.2, outcome supervision):

    A_i = (r_i - mean(r_1..r_G)) / std(r_1..r_G)        (the same A_i for every token of response i)

The loss is PPO's clipped surrogate with that advantage, plus a KL penalty to the reference *in the loss*
(not in the reward, as PPO-max has it), estimated per token with the k3 estimator (GRPO Eq. 4; Schulman
2020): ``D = pi_ref/pi - log(pi_ref/pi) - 1``, which is >= 0 and unbiased on samples of pi. Per response, the
token terms are averaged (1/|o_i|), then responses are averaged (GRPO Eq. 3); ``loss_aggregation="token"``
averages over all tokens of the batch instead (one response's tokens then weigh by its length, as in
DAPO, Yu et al. 2025).

The trainer reuses the PPO stage's pieces: the sampler, the RM's score at the last token, the log-prob and
KL helpers of :mod:`rlhf_lite.ppo.core`, the paper's monitors and collapse detector.
"""

from __future__ import annotations

import json
import math
import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from ..generation import Rollout, decode_responses, encode_prompts, sample
from ..loading import optimizer_factory
from ..outdir import clear_out
from ..policy_setup import PolicyInputs, load_policy_stack, policy_inputs
from ..ppo import core
from ..ppo.config import CollapseBands
from ..ppo.experience import response_logits, rm_scores
from ..ppo.monitors import detect_collapse, repeated_trigram_fraction
from ..rm import REWARD
from ..settings import check_common, fits_data, positive, require, to_dict
from ..stage import begin_stage
from ..text import Prompt
from ..utils import DATA_DIR, MetricsLog, Stopwatch, progress, seed_everything, write_json
from .measure import StagePreset, measure_policy


@dataclass(frozen=True)
class GRPOConfig:
    """Settings of the GRPO stage. Defaults are the tiny profile's, on vanilla PPO's budget."""

    iterations: int = 60
    """Iterations (sample groups, then updates)."""
    prompts_per_iteration: int = 8
    """Prompts sampled per iteration; each gets group_size responses."""
    group_size: int = 8
    """G: responses per prompt, the group whose mean and std make the baseline."""
    minibatch_size: int = 32
    """Responses per gradient step; must divide prompts_per_iteration * group_size."""
    epochs: int = 2
    """Passes over each batch (GRPO's mu; 1 in DeepSeekMath, 2 here as in our PPO)."""
    max_new_tokens: int = 24
    """Response budget."""
    max_prompt_tokens: int | None = None
    """Longest model prompt; None: the model's context length minus max_new_tokens."""
    temperature: float = 1.0
    """Sampling temperature (log-probs use the same temperature)."""
    top_p: float = 1.0
    """Nucleus sampling (1.0: off)."""
    lr: float = 1e-3
    """Adam learning rate of the policy adapter (PPO's policy_lr)."""
    adam_betas: tuple[float, float] = (0.9, 0.95)
    """Adam betas (PPO's)."""
    clip_eps: float = 0.2
    """Clip range of the surrogate objective."""
    kl_coef: float | None = 0.04
    """beta of the k3 KL penalty in the loss (DeepSeekMath: 0.04); None: no KL term."""
    scale_by_std: bool = True
    """Divide the group-relative advantage by the group's std (GRPO); False: only subtract the mean."""
    loss_aggregation: Literal["sequence", "token"] = "sequence"
    """"sequence": mean over responses of each response's token mean (GRPO Eq. 3); "token": mean over every
    token of the minibatch."""
    max_grad_norm: float | None = None
    """Clip the policy's gradient norm to this; None: no clipping."""
    gold_every: int = 5
    """Iterations between measurements on the test prompts (gold, KL, RM reward)."""
    sample_every: int = 10
    """Iterations between sample tables."""
    collapse: CollapseBands = field(default_factory=CollapseBands)
    """Bands of the pattern-collapse detector (PPO's)."""
    seed: int = 0
    """Seed of adapter initialization, prompt order and sampling."""

    @property
    def rollout_batch(self) -> int:
        return self.prompts_per_iteration * self.group_size

    def validate(self, context_length: int | None = None, rows: dict[str, int] | None = None) -> None:
        """Fail before any training on impossible settings, naming the field; ``context_length`` (the model's)
        and ``rows`` (rows per data file, once the data is checked) add the checks against them."""
        check_common(self)
        fits_data(self, "prompts_per_iteration", rows, "prompts_train.jsonl", "training prompts")
        positive(self, "iterations", "prompts_per_iteration", "minibatch_size", "epochs", "max_new_tokens", "lr",
                 "clip_eps", "temperature", "gold_every", "sample_every")
        require(self, self.group_size >= 2, "group_size", "must be >= 2 (a group's mean needs two responses)")
        require(self, self.rollout_batch % self.minibatch_size == 0, "minibatch_size",
                f"must divide prompts_per_iteration * group_size ({self.rollout_batch})")
        require(self, 0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        for name in ("kl_coef", "max_grad_norm", "max_prompt_tokens"):
            require(self, getattr(self, name) is None or getattr(self, name) > 0, name, "must be > 0 or None (off)")
        if context_length is not None:
            require(self, self.max_new_tokens < context_length, "max_new_tokens",
                    f"must be below the model's context length ({context_length})")


GRPO_PRESETS: dict[str, StagePreset] = {p.name: p for p in [
    StagePreset("grpo", "GRPO as in DeepSeekMath: group-normalized advantages, k3 KL in the loss, beta = 0.04", {}),
    StagePreset("grpo_no_kl", "GRPO without the KL term: nothing holds the policy near the reference",
                {"kl_coef": None}),
    StagePreset("grpo_token_mean", "GRPO with DAPO's token-level loss average and no std scaling",
                {"loss_aggregation": "token", "scale_by_std": False}),
]}
"""Presets as changes to a profile's GRPO settings."""


# ----- the math -----------------------------------------------------------------------------------
def group_advantages(rewards: Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-4) -> Tensor:
    """Group-relative advantages (GRPO Sec. 4.1.2): (r - group mean) / (group std + eps).

    rewards: (B,) with each group of ``group_size`` responses contiguous (B = prompts * G). The std is the
    sample std (n - 1, as torch.std); a group of equal rewards gets advantage exactly 0. Computed in float64,
    returned as float32 (B,).
    """
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards {tuple(rewards.shape)} are not groups of {group_size}")
    groups = rewards.detach().view(-1, group_size).double()
    adv = groups - groups.mean(-1, keepdim=True)
    if scale_by_std:
        adv = adv / (groups.std(-1, keepdim=True) + eps)
    # the rounding of a mean of equal scores (float32 0.7 eight times) divided by eps would invent a signal
    flat = groups.amax(-1, keepdim=True) == groups.amin(-1, keepdim=True)
    return torch.where(flat, 0.0, adv).flatten().float()


def grpo_loss(logp: Tensor, old_logp: Tensor, ref_logp: Tensor, advantages: Tensor, mask: Tensor, clip_eps: float,
              kl_coef: float | None, aggregation: str = "sequence") -> tuple[Tensor, dict[str, Tensor]]:
    """The GRPO objective (Eq. 3) as a loss to minimize.

    Per token t of response i: ``min(rho A_i, clip(rho, 1 - eps, 1 + eps) A_i) - beta * k3_t`` with
    ``rho = exp(logp - old_logp)`` and ``k3_t = exp(ref - logp) - (ref - logp) - 1``; the loss is minus its
    mean (see ``aggregation`` in the module doc). logp (carries the gradient), old_logp, ref_logp, mask: (B, T);
    advantages: (B,). Returns (0-dim loss, stats), stats detached: clipfrac (share of tokens where the clipped
    term is strictly the smaller, so no gradient flows), kl_k3 (mean k3 per token),
    approx_kl (k3 of pi_old against pi, as in :func:`~rlhf_lite.ppo.core.policy_loss`).
    """
    m = mask.bool()
    log_ratio = torch.where(m, logp - old_logp, 0.0)
    ratio = log_ratio.exp()
    adv = advantages[:, None].to(ratio.dtype)
    unclipped, clipped = ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv
    surrogate = torch.minimum(unclipped, clipped)
    # off the mask logp is replaced by ref_logp (k3 = 0 there): exp() of garbage would reach the gradient
    kl = core.kl_k3(torch.where(m, logp, ref_logp), ref_logp)
    objective = surrogate - kl_coef * kl if kl_coef else surrogate
    if aggregation == "sequence":
        loss = -core.masked_mean(objective, m, dim=-1).mean()
    elif aggregation == "token":
        loss = -core.masked_mean(objective, m)
    else:
        raise ValueError(f"loss aggregation must be 'sequence' or 'token', got {aggregation!r}")
    with torch.no_grad():
        stats = {"clipfrac": core.masked_mean((clipped < unclipped).to(ratio.dtype), m),
                 "kl_k3": core.masked_mean(kl, m), "approx_kl": core.masked_mean(core.kl_k3(old_logp, logp), m)}
    return loss, stats


# ----- the trainer --------------------------------------------------------------------------------
class GRPOTrainer:
    """GRPO iterations on a stack with ``policy`` and ``reward`` adapters, logging to ``out_dir``."""

    def __init__(self, cfg: GRPOConfig, inputs: PolicyInputs, stack, make_optimizer, out_dir: str | Path,
                 preset: str = "custom") -> None:
        self.cfg, self.inputs, self.stack, self.preset = cfg, inputs, stack, preset
        self.tok, self.device = inputs.tokenizer, stack.device
        self.out = Path(out_dir)
        self.rng = random.Random(cfg.seed)
        self.gen = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.params = stack.adapter_parameters("policy")
        self.opt = make_optimizer(self.params, cfg.lr, betas=cfg.adam_betas)
        self.history: list[dict] = []
        self.samples: list[dict] = []
        self.collapse: tuple[int, str] | None = None
        self.timer = Stopwatch()

    def rollout(self, prompts: Sequence[Prompt]) -> Rollout:
        ids, att = encode_prompts(self.tok, [p.text for p in prompts], self.device)
        self.stack.eval()
        with torch.no_grad(), self.stack.causal_lm("policy") as policy:
            return sample(policy, ids, att, self.cfg.max_new_tokens, self.tok.eos_token_id, self.tok.pad_token_id,
                          self.cfg.temperature, self.cfg.top_p, self.gen)

    def measure(self) -> dict:
        row, _, _ = measure_policy(self.stack, "policy", self.tok, self.inputs.test_prompts, self.cfg.max_new_tokens,
                                   self.inputs.judge, self.stack)
        return row

    def update(self, ro: Rollout, old: Tensor, ref: Tensor, adv: Tensor, mask: Tensor) -> dict:
        """Epochs of minibatch steps on one batch; a step with a non-finite loss or gradient is skipped."""
        cfg, P = self.cfg, ro.prompt_len
        self.stack.train()
        agg: dict[str, list[float]] = {}
        skipped = 0
        for epoch in range(cfg.epochs):
            order = list(range(len(adv)))
            self.rng.shuffle(order)
            for i in range(0, len(order), cfg.minibatch_size):
                idx = torch.tensor(order[i:i + cfg.minibatch_size], device=self.device)
                ids, att = ro.input_ids[idx], ro.attention_mask[idx]
                logits = response_logits(self.stack, "policy", ids, att, P) / cfg.temperature
                logp = core.logprobs_from_logits(logits, ids[:, P:])
                loss, st = grpo_loss(logp, old[idx], ref[idx], adv[idx], mask[idx], cfg.clip_eps, cfg.kl_coef,
                                     cfg.loss_aggregation)
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                norm = (core.clip_grad_norm_global(self.params, cfg.max_grad_norm) if cfg.max_grad_norm
                        else core.global_grad_norm(self.params))
                if not (math.isfinite(loss.item()) and math.isfinite(norm)):
                    warnings.warn(f"GRPO epoch {epoch}: non-finite loss or gradient norm; step skipped",
                                  RuntimeWarning, stacklevel=2)
                    self.opt.zero_grad(set_to_none=True)
                    skipped += 1
                    continue
                self.opt.step()
                entropy = core.masked_mean(core.entropy_from_logits(logits.detach()), mask[idx]).item()
                for k, v in {"pg_loss": loss.item(), "grad_norm": norm, "entropy": entropy,
                             **{k: v.item() for k, v in st.items()}}.items():
                    agg.setdefault(k, []).append(v)
        return {**{k: float(np.mean(v)) for k, v in agg.items()}, "skipped_updates": skipped}

    def step(self, iteration: int) -> dict:
        """One iteration: sample groups, score them, group advantages, update; returns its metrics row."""
        cfg = self.cfg
        prompts = self.rng.sample(self.inputs.train_prompts, cfg.prompts_per_iteration)
        group = [p for p in prompts for _ in range(cfg.group_size)]  # each prompt's group contiguous
        ro = self.rollout(group)
        P = ro.prompt_len
        mask = ro.response_mask[:, P:].float()
        old = ro.logprobs[:, P:]
        with torch.no_grad():
            ref = core.logprobs_from_logits(response_logits(self.stack, None, ro.input_ids, ro.attention_mask, P)
                                            / cfg.temperature, ro.input_ids[:, P:]) * mask
            scores = rm_scores(self.stack, ro.input_ids, ro.attention_mask)
        adv = group_advantages(scores, cfg.group_size, cfg.scale_by_std)
        texts = decode_responses(self.tok, ro)
        kl = core.kl_k1(old, ref) * mask
        group_std = scores.view(-1, cfg.group_size).std(-1)
        row = {"iteration": iteration, "reward": scores.mean().item(), "reward_std": scores.std().item(),
               "group_reward_std": group_std.mean().item(), "zero_std_fraction": (group_std < 1e-6).float().mean().item(),
               "kl_per_token": core.masked_mean(kl, mask).item(), "kl_per_sequence": kl.sum(-1).mean().item(),
               "kl_k3_per_token": core.masked_mean(core.kl_k3(old, ref), mask).item(),
               "response_length": mask.sum(-1).mean().item(), "finished_fraction": ro.finished.float().mean().item(),
               "policy_perplexity": core.response_perplexity(old, mask).mean().item(),
               "ref_perplexity": core.response_perplexity(ref, mask).mean().item(),
               "repetition_fraction": repeated_trigram_fraction(texts)}
        judge = self.inputs.judge
        gold = [judge.score(p.raw, t, f) for p, t, f in zip(group, texts, ro.finished.tolist())] if judge else []
        if gold:
            row["train_gold_score"] = float(np.mean(gold))
        if torch.isfinite(scores).all():
            row.update(self.update(ro, old, ref, adv.to(self.device), mask))
        else:
            warnings.warn(f"GRPO iteration {iteration}: non-finite RM score; update skipped", RuntimeWarning,
                          stacklevel=2)
            row["skipped_updates"] = cfg.epochs * (cfg.rollout_batch // cfg.minibatch_size)
        if iteration % cfg.gold_every == 0 or iteration == cfg.iterations:
            row.update(self.measure())
        if iteration % cfg.sample_every == 0 or iteration == 1:
            self.samples += [{"iteration": iteration, "prompt": p.question, "response": t.strip(),
                              "gold": round(g, 3) if gold else None, "reward": round(float(s), 3),
                              "advantage": round(float(a), 3)}
                             for p, t, g, s, a in list(zip(group, texts, gold or [None] * len(texts), scores, adv))[:4]]
        row["wall_seconds"] = self.timer()
        return row

    def train(self) -> dict:
        """Measure the starting policy, run every iteration, then write the policy, samples, summary and plot."""
        log = MetricsLog(self.out / "metrics.jsonl", stage="grpo")
        baseline = self.measure()
        log.log({"iteration": 0, **baseline})
        for it in progress(range(1, self.cfg.iterations + 1), f"GRPO {self.preset}"):
            row = self.step(it)
            self.history.append(row)
            log.log(row)
            if self.collapse is None:
                self.collapse = detect_collapse(self.history, self.cfg.collapse)
                if self.collapse:
                    log.log({"iteration": it, "event": "collapse", "reason": self.collapse[1]})
        log.close()
        return self.finish(baseline)

    def finish(self, baseline: dict) -> dict:
        from .plots import plot_monitors

        self.stack.eval()
        self.stack.save_adapter("policy", self.out / "policy")
        with (self.out / "samples.jsonl").open("w") as fh:
            for s in self.samples:
                fh.write(json.dumps(s, sort_keys=True) + "\n")
        h, last = self.history, self.history[-1]
        golds = [baseline.get("gold_score")] + [r["gold_score"] for r in h if "gold_score" in r]
        summary = {
            "stage": "grpo", "preset": self.preset, "config": to_dict(self.cfg), "provenance": self.inputs.provenance,
            "iterations": len(h), "initial_reward": h[0]["reward"], "final_reward": last["reward"],
            "initial_gold_score": golds[0], "final_gold_score": golds[-1],
            "peak_gold_score": max(golds) if golds[0] is not None else None,
            "final_kl": last["kl_per_token"], "final_kl_per_sequence": last["kl_per_sequence"],
            "initial_response_length": h[0]["response_length"], "final_response_length": last["response_length"],
            "final_repetition_fraction": last["repetition_fraction"],
            "collapse_detected": self.collapse is not None,
            "collapse_iteration": self.collapse[0] if self.collapse else None,
            "collapse_reason": self.collapse[1] if self.collapse else None,
            "skipped_updates": sum(r.get("skipped_updates", 0) for r in h), "wall_seconds": self.timer(),
        }
        write_json(self.out / "summary.json", summary)
        plot_monitors([self.out], self.out / "grpo_monitors.png", labels=[self.preset], xlabel="GRPO iteration")
        return summary


def build_grpo(cfg: GRPOConfig, sft_dir: str | Path, rm_dir: str | Path, data_dir: str | Path = DATA_DIR,
               profile=None) -> tuple[PolicyInputs, object]:
    """Check the inputs, then load the SFT model with a fresh ``policy`` adapter and the trained ``reward`` one."""
    from ..profiles import TINY

    profile = profile or TINY
    inputs = policy_inputs("grpo", cfg, sft_dir, rm_dir, data_dir, profile,
                           need_train=("prompts_per_iteration", "an iteration"))
    seed_everything(cfg.seed)  # fresh adapters draw from torch's global RNG
    return inputs, load_policy_stack(profile, inputs.base_source, ["policy", REWARD], rm_dir)


def run_grpo(out_dir: str | Path, sft_dir: str | Path, rm_dir: str | Path, cfg: GRPOConfig | None = None,
             preset: str = "custom", data_dir: str | Path = DATA_DIR, profile=None, overwrite: bool = True) -> dict:
    """Run GRPO against the RM of ``rm_dir``; writes policy/, metrics.jsonl, samples.jsonl, summary.json, a plot.
    An earlier run in ``out_dir`` is replaced only with ``overwrite`` (see :mod:`rlhf_lite.outdir`)."""
    from ..profiles import TINY

    profile = profile or TINY
    cfg = cfg or profile.grpo
    out, _ = begin_stage(out_dir, cfg, profile, overwrite)
    inputs, stack = build_grpo(cfg, sft_dir, rm_dir, data_dir, profile)
    clear_out(out)  # an earlier run's files go only now, with every check passed and the models loaded
    trainer = GRPOTrainer(cfg, inputs, stack, optimizer_factory(profile.model, stack.device), out, preset)
    return trainer.train()


__all__ = ["GRPO_PRESETS", "GRPOConfig", "GRPOTrainer", "build_grpo", "group_advantages", "grpo_loss", "run_grpo"]
