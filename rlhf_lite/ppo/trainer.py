"""The PPO loop (PAPER.md Sec. 2): it only orchestrates; the math lives in ``core.py``.

One iteration, in phases:

1. **rollout**: sample responses for a batch of prompts with the policy adapter (KV cache);
2. **score**: reference log-probs (adapters off), old values (critic), RM score at the EOS, gold score
   (logged only, never trained on);
3. **shape rewards**: optional normalization of the RM score, then -eta * KL_t per token + score at EOS;
4. **GAE**: advantages and returns over response tokens (optionally whitened and clipped);
5. **update**: epochs of minibatches; clipped surrogate (+ entropy, + ptx) and (clipped) value loss;
6. **log**: the paper's monitors, the collapse detector, samples and checkpoints.

Robustness: a non-finite loss, gradient norm or RM score skips that optimizer step (or the whole update)
with a warning and an ``event: nonfinite`` row; ``cfg.max_nonfinite`` such iterations in a row save a
checkpoint and raise :class:`NonFiniteError`. Ctrl-C stops after the current iteration with a checkpoint,
and :meth:`PPOTrainer.load_checkpoint` resumes a run exactly (the same metrics as without the stop).

Tensors in phases 2-5 live in *response space*: (B, N) with N the longest response of the buffer,
where column i is response token i. Logits at sequence position P-1+i predict token i, and the critic's
value there is the value of the state before token i.
"""

from __future__ import annotations

import functools
import json
import math
import random
import shutil
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerFast

from .. import data as data_mod
from .. import world
from ..batching import encode_examples, last_token_index, pad_batch
from ..evaluation import evaluate_gold
from ..generation import Rollout, decode_responses, encode_prompts, sample
from ..models import AdapterStack, LoraSettings
from ..parallel import Workers
from ..sft import load_sft_model, model_fingerprint
from ..tokenizer import load_tokenizer
from ..utils import DATA_DIR, MetricsLog, Stopwatch, progress, read_json, seed_everything, write_json
from . import core
from .config import CollapseBands, PPOConfig


class NonFiniteError(RuntimeError):
    """``cfg.max_nonfinite`` consecutive iterations skipped their update on NaN or inf; a checkpoint of the
    run (before any non-finite value reached the weights) was saved, and the message names it."""


# ----- the buffer ---------------------------------------------------------------------------------
@dataclass
class Experience:
    """One rollout buffer in response space; all (B, N) unless stated."""

    input_ids: torch.Tensor  # (B, P + N) prompt + response
    attention_mask: torch.Tensor  # (B, P + N)
    prompt_len: int
    mask: torch.Tensor  # response tokens (float)
    old_logprobs: torch.Tensor  # log pi_old(token)
    ref_logprobs: torch.Tensor  # log pi_ref(token)
    old_values: torch.Tensor  # V_old(state before token)
    rewards: torch.Tensor  # shaped per-token rewards
    advantages: torch.Tensor
    returns: torch.Tensor
    finite: bool = True  # False: a non-finite RM score, so the buffer must not be trained on

    def minibatches(self, size: int, rng: random.Random) -> list[dict[str, torch.Tensor]]:
        """Shuffled minibatches of ``size`` rows, each a dict of the row-sliced tensors."""
        order = list(range(self.mask.shape[0]))
        rng.shuffle(order)
        out = []
        for i in range(0, len(order), size):
            idx = torch.tensor(order[i : i + size])
            out.append({k: v[idx] for k, v in asdict(self).items() if isinstance(v, torch.Tensor)})
        return out


def response_logits(stack: AdapterStack, name: str | None, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    prompt_len: int) -> torch.Tensor:
    """Logits (B, N, V) that predict the N response tokens; lm_head runs on those positions only."""
    hidden = stack.hidden(name, input_ids, attention_mask)[:, prompt_len - 1 : -1]
    return stack.base_model.lm_head(hidden).float()


def response_values(stack: AdapterStack, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    prompt_len: int) -> torch.Tensor:
    """Critic values (B, N) of the states before each response token."""
    return stack.values("critic", input_ids, attention_mask)[:, prompt_len - 1 : -1]


def rm_scores(stack: AdapterStack, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """RM score (B,) read at each sequence's last token (the EOS, or the cap when there is none)."""
    values = stack.values("reward", input_ids, attention_mask)
    return values.gather(1, last_token_index(attention_mask)[:, None]).squeeze(1)


def backward(loss_fn: Callable[[dict[str, torch.Tensor], int], tuple[torch.Tensor, dict]],
             mb: dict[str, torch.Tensor], prompt_len: int) -> tuple[float, dict]:
    """Compute a minibatch loss and its gradients; returns the loss value and the loss's stats."""
    loss, stats = loss_fn(mb, prompt_len)
    loss.backward()
    return loss.item(), stats


# ----- monitors -----------------------------------------------------------------------------------
def repeated_trigram_fraction(texts: Sequence[str]) -> float:
    """Fraction of responses containing a repeated word trigram (the "pattern collapse" symptom)."""
    def has_repeat(t: str) -> bool:
        w = t.split()
        grams = [tuple(w[i : i + 3]) for i in range(len(w) - 2)]
        return len(grams) != len(set(grams))
    return float(np.mean([has_repeat(t) for t in texts])) if texts else 0.0


def detect_collapse(history: Sequence[dict], bands: CollapseBands) -> tuple[int, str] | None:
    """The paper's warning signs (Sec. 5.1): first iteration where a monitor left its band for
    ``bands.patience`` consecutive iterations, and why; None if never.

    ``history`` rows need ``iteration``, ``response_length``, ``kl_per_token``, ``ref_perplexity``,
    ``reward``, and ``gold_score`` on the rows where the gold measurement was taken.
    """
    k = bands.baseline_iterations
    if len(history) <= k:
        return None
    base_len = float(np.mean([h["response_length"] for h in history[:k]]))
    base_ppl = float(np.mean([h["ref_perplexity"] for h in history[:k]]))
    streak = 0
    peak_gold, reward_at_peak = -np.inf, None
    for h in history:
        reasons = []
        if h["response_length"] > bands.length_ratio * base_len:
            reasons.append(f"response length {h['response_length']:.1f} > {bands.length_ratio} x {base_len:.1f}")
        if h["kl_per_token"] > bands.kl_max:
            reasons.append(f"KL {h['kl_per_token']:.2f} nats/token > {bands.kl_max}")
        if h["ref_perplexity"] > bands.ref_perplexity_ratio * base_ppl:
            reasons.append(f"reference perplexity {h['ref_perplexity']:.1f} > {bands.ref_perplexity_ratio} x "
                           f"{base_ppl:.1f}")
        gold = h.get("gold_score")
        if gold is not None:
            if gold > peak_gold:
                peak_gold, reward_at_peak = gold, h["reward"]
            elif gold < peak_gold - bands.gold_drop and h["reward"] > reward_at_peak + bands.reward_rise:
                reasons.append(f"gold {gold:.2f} fell from its peak {peak_gold:.2f} while the RM reward rose "
                               f"to {h['reward']:.2f}")
        streak = streak + 1 if reasons else 0
        if streak >= bands.patience and h["iteration"] >= k:
            return int(h["iteration"]), "; ".join(reasons)
    return None


# ----- set-up ---------------------------------------------------------------------------------------
@dataclass
class PPOSetup:
    """Everything a run needs besides its config: the stack, tokenizer and data."""

    stack: AdapterStack
    tokenizer: PreTrainedTokenizerFast
    train_prompts: list[str]
    test_prompts: list[str]
    sft_examples: list[tuple[list[int], list[int]]] = field(default_factory=list)
    rm_stack: AdapterStack | None = None  # where the RM lives when it is not on ``stack`` (pretrained base)
    gold_fn: Callable[[str, str, bool], float] | None = world.gold_score
    """The oracle, logged and never trained on; None (real data such as HH-RLHF): no gold metrics."""

    @property
    def reward_model(self) -> AdapterStack:
        return self.rm_stack if self.rm_stack is not None else self.stack


def check_rm_base(rm_dir: Path, sft_dir: Path) -> LoraSettings:
    """Check that ``rm_dir`` holds a reward model trained on the SFT model in ``sft_dir``; return its LoRA settings.

    An RM adapter reads the features of the base it was trained on: on another SFT model it would score
    noise. The RM stage records the SFT model's fingerprint (path and sha256 of its weights).
    """
    rm_meta_path = rm_dir / "adapter" / "adapter.json"
    if not rm_meta_path.exists():
        raise FileNotFoundError(f"{rm_dir} holds no reward model (missing {rm_meta_path}); run the rm stage first")
    rm_summary = read_json(rm_dir / "summary.json")
    recorded = rm_summary.get("sft_model")
    if recorded is None:
        warnings.warn(f"{rm_dir / 'summary.json'} does not record its SFT model (an older RM run): cannot check "
                      f"that it was trained on {sft_dir}", stacklevel=2)
    else:
        current = model_fingerprint(sft_dir)
        if recorded["sha256"] != current["sha256"]:
            raise ValueError(f"the reward model in {rm_dir} was trained on the SFT model {recorded['path']} "
                             f"(sha256 {recorded['sha256']}), but {current['path']} is another model (sha256 "
                             f"{current['sha256']}): pass the --sft folder the RM was trained on, or retrain the RM")
    lora = rm_summary["config"]["lora"]
    return LoraSettings(**{**lora, "target_modules": tuple(lora["target_modules"])})


def build_setup(cfg: PPOConfig, sft_dir: str | Path, rm_dir: str | Path, data_dir: str | Path = DATA_DIR,
                n_test_prompts: int = 256) -> PPOSetup:
    """Load the base (SFT or pretrained), add policy/critic/reward adapters, load the RM, init the critic.

    Everything cheap is checked before any model is loaded: the folders, that the RM was trained on
    this SFT model, every data row (DataError names file:line) and that prompt + response fit the context.
    """
    sft_dir, rm_dir, data_dir = Path(sft_dir), Path(rm_dir), Path(data_dir)
    which = "pretrained" if cfg.policy_init == "pretrained" else "model"
    for d in dict.fromkeys([sft_dir / which, sft_dir / "model"]):
        if not (d / "config.json").exists():
            raise FileNotFoundError(f"{d} has no model: run `python -m rlhf_lite sft --out {sft_dir}` first")
    lora = check_rm_base(rm_dir, sft_dir)
    train = [r["prompt"] for r in data_mod.load_prompts(data_dir / "prompts_train.jsonl")]
    test = [r["prompt"] for r in data_mod.load_prompts(data_dir / "prompts_test.jsonl")][:n_test_prompts]
    sft_rows = data_mod.load_sft(data_dir / "sft.jsonl") if cfg.ptx_coef else []
    tok = load_tokenizer(sft_dir / which / "tokenizer.json")
    context = read_json(sft_dir / which / "config.json")["max_position_embeddings"]
    cfg.validate(context_length=context)
    longest = max(len(ids) for ids in tok(train + test, add_special_tokens=False)["input_ids"])
    if longest + cfg.max_new_tokens > context:
        raise ValueError(f"PPOConfig.max_new_tokens ({cfg.max_new_tokens}) plus the longest prompt in {data_dir} "
                         f"({longest} tokens) exceeds the model's context length ({context})")

    # Fresh adapters draw their initial A matrices from torch's global RNG: seed it here, or the run
    # would depend on whatever the process did before (the pipeline trains SFT and RM first).
    seed_everything(cfg.seed)
    base = load_sft_model(sft_dir, which)[0]
    stack = AdapterStack(base, ["policy", "critic", "reward"], lora)
    stack.load_adapter("reward", rm_dir / "adapter")
    rm_stack = None
    if cfg.policy_init == "pretrained":
        # The RM adapter was trained on the SFT base: on the pretrained base it would read other
        # features, so the RM keeps its own copy of the SFT base (the only case with two bases).
        rm_stack = AdapterStack(load_sft_model(sft_dir, "model")[0], ["reward"], lora)
        rm_stack.load_adapter("reward", rm_dir / "adapter")
        rm_stack.eval()
    if cfg.critic_init == "rm":
        stack.copy_adapter("reward", "critic")
    sft_examples = encode_examples(tok, [r["prompt"] for r in sft_rows], [r["response"] for r in sft_rows], context)
    return PPOSetup(stack, tok, train, test, sft_examples, rm_stack)


# ----- the loop -------------------------------------------------------------------------------------
class PPOTrainer:
    """Runs PPO iterations over a :class:`PPOSetup`, logging to ``out_dir``."""

    def __init__(self, cfg: PPOConfig, setup: PPOSetup, out_dir: str | Path, preset: str = "custom",
                 workers: int | None = None) -> None:
        """``workers``: threads for the policy's and the critic's minibatch step, which share no parameters
        (see :mod:`rlhf_lite.parallel`). Default: 2 on a CPU with two or more intra-op threads, where the
        adapters run as merged weights; otherwise 1 (one after the other)."""
        self.cfg, self.setup, self.preset = cfg, setup, preset
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.stack, self.tok = setup.stack, setup.tokenizer
        self.device = self.stack.device
        if workers is None:  # threads need merged-weight views: peft's adapter switching is global state
            cpu = self.device.type == "cpu" and torch.get_num_threads() > 1
            workers = 2 if cpu and self.stack.mergeable() else 1
        elif workers > 1 and not self.stack.mergeable():
            raise ValueError("PPOTrainer(workers > 1) needs adapters that run as merged weights (a float base "
                             "without LoRA dropout): peft's own adapter switching cannot run in threads")
        self.workers = Workers(workers)
        seed_everything(cfg.seed)
        self.rng = random.Random(cfg.seed)
        self.gen = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.policy_params = self.stack.adapter_parameters("policy")
        self.critic_params = self.stack.adapter_parameters("critic")
        self.policy_opt = torch.optim.Adam(self.policy_params, lr=cfg.policy_lr, betas=cfg.adam_betas)
        self.critic_opt = torch.optim.Adam(self.critic_params, lr=cfg.critic_lr, betas=cfg.adam_betas)
        self.reward_moments = core.RunningMoments()
        self.iteration = 0
        self.history: list[dict] = []
        self.samples: list[dict] = []
        self.collapse: tuple[int, str] | None = None
        self.baseline: dict | None = None  # gold measurement of the starting policy (the iteration-0 row)
        self.nonfinite_streak = 0  # consecutive iterations with a skipped update
        self.last_nonfinite: str | None = None
        self.events: list[dict] = []  # event rows of the current iteration, logged after its row
        self.stop_requested = False  # set by Ctrl-C: stop after the current iteration
        self.timer = Stopwatch()

    # --- phase 1: rollout ---
    def rollout(self, prompts: Sequence[str]) -> Rollout:
        ids, att = encode_prompts(self.tok, prompts, self.device)
        self.stack.eval()
        with torch.no_grad(), self.stack.causal_lm("policy") as policy:
            return sample(policy, ids, att, self.cfg.max_new_tokens, self.tok.eos_token_id,
                          self.tok.pad_token_id, self.cfg.temperature, self.cfg.top_p, self.gen)

    # --- phases 2-4: score, shape rewards, GAE ---
    @torch.no_grad()
    def make_experience(self, ro: Rollout) -> tuple[Experience, dict]:
        cfg, P = self.cfg, ro.prompt_len
        ids, att = ro.input_ids, ro.attention_mask
        mask = ro.response_mask[:, P:].float()
        old_logp = ro.logprobs[:, P:]
        ref_logits = response_logits(self.stack, None, ids, att, P) / cfg.temperature
        ref_logp = core.logprobs_from_logits(ref_logits, ids[:, P:]) * mask
        values = response_values(self.stack, ids, att, P) * mask
        scores = rm_scores(self.setup.reward_model, ids, att)
        finite = bool(torch.isfinite(scores).all())
        if not finite:  # skip this buffer's update; a NaN must not reach the running moments, which persist
            self.skip_step(f"RM reward ({int((~torch.isfinite(scores)).sum())} of {len(scores)} scores)")
            used = scores
        # Score reparameterization (Sec. 5.3.1): normalize+clip or scale with running statistics.
        elif cfg.reward_norm_clip is not None:
            used = core.normalize_and_clip_rewards(scores, self.reward_moments, cfg.reward_norm_clip)
        elif cfg.reward_scaling:
            used = core.scale_rewards(scores, self.reward_moments)
        else:
            self.reward_moments.update(scores)
            used = scores
        kl = core.kl_k1(old_logp, ref_logp) * mask
        rewards = core.shape_rewards(used, kl, mask, cfg.kl_coef)
        adv, ret = core.compute_gae(rewards, values, mask, cfg.gamma, cfg.lam)
        if cfg.adv_norm_clip is not None:
            adv = core.normalize_and_clip_advantages(adv, mask, cfg.adv_norm_clip)
        behaviour = ref_logp if cfg.old_policy == "reference" else old_logp
        exp = Experience(ids, att, P, mask, behaviour, ref_logp, values, rewards, adv, ret, finite)
        seq_kl = (kl * mask).sum(-1)
        stats = {
            "reward": scores.mean().item(),
            "reward_std": scores.std().item() if len(scores) > 1 else 0.0,
            "reward_used": used.mean().item(),
            "kl_per_token": core.masked_mean(kl, mask).item(),
            "kl_per_sequence": seq_kl.mean().item(),
            "kl_k3_per_token": core.masked_mean(core.kl_k3(old_logp, ref_logp), mask).item(),
            "response_length": mask.sum(-1).mean().item(),
            "finished_fraction": ro.finished.float().mean().item(),
            "policy_perplexity": core.response_perplexity(old_logp, mask).mean().item(),
            "ref_perplexity": core.response_perplexity(ref_logp, mask).mean().item(),
            "advantage_mean": core.masked_mean(adv, mask).item(),
            "return_mean": core.masked_mean(ret, mask).item(),
            "value_mean": core.masked_mean(values, mask).item(),
            "explained_variance": core.explained_variance(values, ret, mask),
        }
        return exp, stats

    # --- phase 5: update ---
    def policy_step_loss(self, mb: dict[str, torch.Tensor], P: int) -> tuple[torch.Tensor, dict]:
        cfg = self.cfg
        logits = response_logits(self.stack, "policy", mb["input_ids"], mb["attention_mask"], P) / cfg.temperature
        labels = mb["input_ids"][:, P:]
        logp = core.logprobs_from_logits(logits, labels)
        loss, st = core.policy_loss(logp, mb["old_logprobs"], mb["advantages"], mb["mask"], cfg.clip_eps)
        stats = {"pg_loss": loss.item(), "clipfrac": st["clipfrac"].item(), "approx_kl": st["approx_kl"].item()}
        entropy = core.entropy_from_logits(logits.detach() if not cfg.entropy_coef else logits)
        stats["entropy"] = core.masked_mean(entropy.detach(), mb["mask"]).item()
        if cfg.entropy_coef:
            loss = loss + core.entropy_bonus(entropy, mb["mask"], cfg.entropy_coef, cfg.entropy_target)
        if cfg.ptx_coef and self.setup.sft_examples:
            batch = self.rng.sample(self.setup.sft_examples, min(len(self.setup.sft_examples), labels.shape[0]))
            ids, att, lm = pad_batch([b[0] for b in batch], [b[1] for b in batch], self.tok.pad_token_id)
            ids, att, lm = ids.to(self.device), att.to(self.device), lm.to(self.device)
            ptx_logits = self.stack.logits("policy", ids, att)[:, :-1]
            ptx = core.ptx_loss(ptx_logits, ids[:, 1:], lm[:, 1:])
            loss = loss + cfg.ptx_coef * ptx
            stats["ptx_loss"] = ptx.item()
        return loss, stats

    def critic_step_loss(self, mb: dict[str, torch.Tensor], P: int) -> tuple[torch.Tensor, dict]:
        values = response_values(self.stack, mb["input_ids"], mb["attention_mask"], P)
        loss, st = core.value_loss(values, mb["old_values"], mb["returns"], mb["mask"], self.cfg.value_clip)
        return loss, {"value_loss": loss.item(), "vf_clipfrac": st["vf_clipfrac"].item()}

    def update(self, exp: Experience, train_policy: bool) -> dict:
        """Epochs of minibatch steps; a step whose loss or gradient norm is not finite is skipped."""
        cfg = self.cfg
        self.stack.train()
        agg: dict[str, list[float]] = {}
        skipped = 0
        params = self.policy_params + self.critic_params
        for epoch in range(cfg.ppo_epochs):
            for i, mb in enumerate(exp.minibatches(cfg.minibatch_size, self.rng)):
                stats = {}
                checked = {}  # what must be finite for the step to be taken
                self.policy_opt.zero_grad(set_to_none=True)
                self.critic_opt.zero_grad(set_to_none=True)
                # The two losses share no parameters: their passes run at once (see rlhf_lite.parallel).
                steps = [(self.critic_step_loss, "value loss")]
                if train_policy:
                    steps.insert(0, (self.policy_step_loss, "policy loss"))
                results = self.workers.run([functools.partial(backward, fn, mb, exp.prompt_len) for fn, _ in steps])
                for (_, what), (loss, st) in zip(steps, results):
                    stats.update(st)
                    checked[what] = loss
                if cfg.max_grad_norm is not None:  # one norm over policy and critic (PPO-max #6)
                    stats["grad_norm"] = core.clip_grad_norm_global(params, cfg.max_grad_norm)
                else:
                    stats["grad_norm"] = core.global_grad_norm(params)
                checked["gradient norm"] = stats["grad_norm"]
                bad = [name for name, v in checked.items() if not math.isfinite(v)]
                if bad:  # one NaN step would poison Adam's moments and the weights for good
                    self.policy_opt.zero_grad(set_to_none=True)
                    self.critic_opt.zero_grad(set_to_none=True)
                    self.skip_step(f"{' and '.join(bad)} (epoch {epoch}, minibatch {i})")
                    skipped += 1
                    continue  # its stats stay out of the means
                if train_policy:
                    self.policy_opt.step()
                self.critic_opt.step()
                for k, v in stats.items():
                    agg.setdefault(k, []).append(v)
        return {**{k: float(np.mean(v)) for k, v in agg.items()}, "skipped_updates": skipped}

    def skip_step(self, what: str) -> None:
        """Record a skipped optimizer step: a warning now, an event row logged after this iteration's row."""
        warnings.warn(f"PPO iteration {self.iteration}: non-finite {what}; update skipped", RuntimeWarning,
                      stacklevel=2)
        self.events.append({"iteration": self.iteration, "event": "nonfinite", "what": what})
        self.last_nonfinite = what

    # --- one iteration, and the run ---
    def step(self) -> dict:
        cfg = self.cfg
        self.iteration += 1
        prompts = self.rng.sample(self.setup.train_prompts, cfg.rollout_batch)
        ro = self.rollout(prompts)
        exp, stats = self.make_experience(ro)
        texts = decode_responses(self.tok, ro)
        gold_fn = self.setup.gold_fn
        gold = [gold_fn(p, t, f) for p, t, f in zip(prompts, texts, ro.finished.tolist())] if gold_fn else []
        train_policy = self.iteration > cfg.critic_pretrain_iterations
        if exp.finite:
            stats.update(self.update(exp, train_policy))
        else:  # every step of this buffer is skipped
            stats["skipped_updates"] = cfg.ppo_epochs * (cfg.rollout_batch // cfg.minibatch_size)
        row = {"iteration": self.iteration, "repetition_fraction": repeated_trigram_fraction(texts),
               "policy_updated": train_policy, **stats}
        if gold:
            row["train_gold_score"] = float(np.mean(gold))
        if self.iteration % cfg.gold_every == 0 or self.iteration == cfg.iterations:
            row.update(self.gold_eval())
        if self.iteration % cfg.sample_every == 0 or self.iteration == 1:
            self.samples += [{"iteration": self.iteration, **s} for s in self._samples(prompts, texts, gold, exp)]
        row["wall_seconds"] = self.timer()
        return row

    def gold_eval(self) -> dict:
        """The common gold measurement on the test prompts ({} when there is no gold judge)."""
        if self.setup.gold_fn is None:
            return {}
        with torch.no_grad(), self.stack.causal_lm("policy") as policy:
            ev = evaluate_gold(policy, self.tok, self.setup.test_prompts, self.cfg.max_new_tokens,
                               device=self.device)
        return {"gold_score": ev.score, "eval_response_length": float(np.mean(ev.lengths)),
                **{f"gold/{k}": v for k, v in ev.report.items() if k not in ("overall", "n")}}

    def _samples(self, prompts, texts, gold, exp, k: int = 4) -> list[dict]:
        scores = exp.rewards.sum(-1).tolist()
        golds = gold or [None] * len(texts)
        return [{"prompt": p.split("Human:")[-1].replace("\n\nAssistant:", "").strip(), "response": t.strip(),
                 "gold": None if g is None else round(g, 3), "shaped_return": round(float(s), 3)}
                for p, t, g, s in list(zip(prompts, texts, golds, scores))[:k]]

    def train(self) -> dict:
        """Run the remaining iterations, then write summary, samples and plots. Returns the summary.

        Ctrl-C stops after the current iteration and saves a checkpoint (a second Ctrl-C aborts at once,
        keeping the last periodic checkpoint). After :meth:`load_checkpoint` the run continues where it
        stopped, appending to metrics.jsonl. Raises :class:`NonFiniteError` after ``cfg.max_nonfinite``
        consecutive iterations with a skipped update.
        """
        cfg = self.cfg
        ckpt, metrics = self.out / "checkpoint", self.out / "metrics.jsonl"
        resumed = self.baseline is not None
        if resumed:
            trim_metrics(metrics, self.iteration)
        log = MetricsLog(metrics, append=resumed)
        if not resumed:
            self.baseline = self.gold_eval()  # the starting policy (SFT), same measurement as every stage
            log.log({"iteration": 0, **self.baseline})
        self.stop_requested, aborted = False, False
        in_main = threading.current_thread() is threading.main_thread()  # signals only reach the main thread
        prev = signal.signal(signal.SIGINT, self._on_sigint) if in_main else None
        try:
            bar = progress(range(self.iteration, cfg.iterations), f"PPO {self.preset}")
            for _ in bar:
                if self.stop_requested:
                    break
                row = self.step()
                self.history.append(row)
                log.log(row)
                for event in self.events:
                    log.log(event)
                self.events.clear()
                bar.set_postfix(reward=f"{row['reward']:.2f}", kl=f"{row['kl_per_token']:.3f}",
                                len=f"{row['response_length']:.1f}")
                if self.collapse is None:
                    self.collapse = detect_collapse(self.history, cfg.collapse)
                    if self.collapse:
                        log.log({"iteration": self.iteration, "event": "collapse", "reason": self.collapse[1]})
                self.nonfinite_streak = self.nonfinite_streak + 1 if row["skipped_updates"] else 0
                if self.nonfinite_streak >= cfg.max_nonfinite:
                    self.save_checkpoint(ckpt)  # skipped steps never touched the weights: a clean state
                    raise NonFiniteError(
                        f"{self.nonfinite_streak} consecutive PPO iterations (up to {self.iteration}) skipped "
                        f"their update on non-finite values (last: {self.last_nonfinite}); checkpoint saved "
                        f"in {ckpt}; continue with `python -m rlhf_lite ppo --resume {self.out}` and the same "
                        "settings")
                if cfg.checkpoint_every and self.iteration % cfg.checkpoint_every == 0:
                    self.save_checkpoint(ckpt)
        except KeyboardInterrupt:  # a second Ctrl-C: the iteration is half done, so no checkpoint of it
            aborted = True
        finally:
            if in_main:
                signal.signal(signal.SIGINT, prev if prev is not None else signal.default_int_handler)
            log.close()
        if not aborted:
            self.save_checkpoint(ckpt)
        summary = self.summary(self.baseline, interrupted=aborted or self.stop_requested)
        write_json(self.out / "summary.json", summary)
        with (self.out / "samples.jsonl").open("w") as fh:
            for s in self.samples:
                fh.write(json.dumps(s, sort_keys=True) + "\n")
        from ..plotting import plot_ppo

        plot_ppo([self.out], self.out / "ppo_monitors.png", labels=[self.preset])
        return summary

    def _on_sigint(self, signum: int, frame: object) -> None:
        """First Ctrl-C: finish this iteration, save a checkpoint, stop. A second one aborts at once."""
        if self.stop_requested:
            raise KeyboardInterrupt
        self.stop_requested = True
        print(f"\nCtrl-C: stopping after the current iteration, with a checkpoint in {self.out / 'checkpoint'} "
              "(press again to abort without one)", file=sys.stderr)

    def summary(self, baseline: dict, interrupted: bool = False) -> dict:
        h = self.history
        golds = [baseline.get("gold_score")] + [r["gold_score"] for r in h if "gold_score" in r]
        golds = [g for g in golds if g is not None] or [None]
        return {
            "stage": "ppo",
            "preset": self.preset,
            "config": self.cfg.to_dict(),
            "iterations": self.iteration,
            "interrupted": interrupted,
            "initial_reward": h[0]["reward"] if h else None,
            "final_reward": h[-1]["reward"] if h else None,
            "initial_gold_score": golds[0],
            "peak_gold_score": max(golds) if golds[0] is not None else None,
            "final_gold_score": golds[-1],
            "final_kl": h[-1]["kl_per_token"] if h else None,
            "final_kl_per_sequence": h[-1]["kl_per_sequence"] if h else None,
            "initial_response_length": h[0]["response_length"] if h else None,
            "final_response_length": h[-1]["response_length"] if h else None,
            "final_repetition_fraction": h[-1]["repetition_fraction"] if h else None,
            "collapse_detected": self.collapse is not None,
            "collapse_iteration": self.collapse[0] if self.collapse else None,
            "collapse_reason": self.collapse[1] if self.collapse else None,
            "wall_seconds": self.timer(),
        }

    # --- checkpoints ---
    def save_checkpoint(self, path: str | Path) -> None:
        """Adapters, heads, optimizer states, running statistics, RNG states, the iteration and the log
        state; ``meta.json`` holds the iteration and config in plain JSON."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")  # written aside, then swapped in: a kill never leaves half
        shutil.rmtree(tmp, ignore_errors=True)
        self.stack.save_adapter("policy", tmp / "policy")
        self.stack.save_adapter("critic", tmp / "critic")
        torch.save({
            "iteration": self.iteration,
            "policy_opt": self.policy_opt.state_dict(),
            "critic_opt": self.critic_opt.state_dict(),
            "reward_moments": self.reward_moments.state_dict(),
            "rng": self.rng.getstate(),
            "gen": self.gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "history": self.history,
            "samples": self.samples,
            "collapse": self.collapse,
            "baseline": self.baseline,
            "nonfinite_streak": self.nonfinite_streak,
            "wall_seconds": self.timer(),
        }, tmp / "trainer.pt")
        write_json(tmp / "meta.json", {"iteration": self.iteration, "preset": self.preset,
                                       "config": self.cfg.to_dict()})
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore what :meth:`save_checkpoint` wrote, so that :meth:`train` continues the run exactly:
        on the CPU, the same metrics as a run that never stopped. The checkpoint's config must equal this
        trainer's except ``iterations``, which may be raised to extend the run.
        """
        path = Path(path)
        check_checkpoint(path, self.cfg)
        self.stack.load_adapter("policy", path / "policy")
        self.stack.load_adapter("critic", path / "critic")
        state = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
        self.policy_opt.load_state_dict(state["policy_opt"])
        self.critic_opt.load_state_dict(state["critic_opt"])
        self.reward_moments.load_state_dict(state["reward_moments"])
        self.rng.setstate(state["rng"])
        self.gen.set_state(state["gen"])
        torch.set_rng_state(state["torch_rng"])
        self.iteration, self.history, self.samples = state["iteration"], state["history"], state["samples"]
        self.collapse = tuple(state["collapse"]) if state["collapse"] else None
        self.baseline, self.nonfinite_streak = state["baseline"], state["nonfinite_streak"]
        self.timer.start -= state["wall_seconds"]  # wall_seconds keep counting from the first start


def check_checkpoint(path: str | Path, cfg: PPOConfig) -> dict:
    """Check that ``path`` holds a checkpoint that ``cfg`` can continue; return its meta.json.

    Every setting must match the checkpoint's except ``iterations``, which may not be below the
    iteration already reached. Reads only meta.json, so it is cheap enough to run before any model loads.
    """
    path = Path(path)
    if not (path / "meta.json").exists():
        raise FileNotFoundError(f"{path} holds no checkpoint (missing meta.json): nothing to resume")
    meta = read_json(path / "meta.json")
    saved, wanted = meta["config"], json.loads(json.dumps(cfg.to_dict()))  # tuples as lists, like the file
    diff = [f"{k}: checkpoint {saved.get(k)!r}, requested {wanted.get(k)!r}"
            for k in sorted(set(saved) | set(wanted)) if k != "iterations" and saved.get(k) != wanted.get(k)]
    if diff:
        raise ValueError(f"cannot resume from {path}: its config differs ({'; '.join(diff)}); use the preset "
                         f"({meta['preset']!r}), seed and --set of the original run (only iterations may change)")
    if cfg.iterations < meta["iteration"]:
        raise ValueError(f"cannot resume from {path}: PPOConfig.iterations ({cfg.iterations}) is below the "
                         f"iteration it reached ({meta['iteration']})")
    return meta


def trim_metrics(path: Path, iteration: int) -> None:
    """Drop metrics rows after ``iteration``: a run killed between checkpoints logged rows a resume repeats."""
    if path.exists():
        rows = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("iteration", 0) <= iteration]
        path.write_text("".join(line + "\n" for line in rows))


def run_ppo(out_dir: str | Path, sft_dir: str | Path, rm_dir: str | Path, cfg: PPOConfig, preset: str = "custom",
            data_dir: str | Path = DATA_DIR, resume: bool = False) -> dict:
    """Build the setup and run PPO; writes metrics.jsonl, summary.json, samples, plots, checkpoint.

    ``resume``: continue the run in ``out_dir`` from ``out_dir/checkpoint`` (see :meth:`PPOTrainer.load_checkpoint`).
    Settings, folders and data are all checked before any model is loaded.
    """
    cfg.validate()
    if resume:
        check_checkpoint(Path(out_dir) / "checkpoint", cfg)
    setup = build_setup(cfg, sft_dir, rm_dir, data_dir)
    trainer = PPOTrainer(cfg, setup, out_dir, preset)
    if resume:
        trainer.load_checkpoint(Path(out_dir) / "checkpoint")
    return trainer.train()
