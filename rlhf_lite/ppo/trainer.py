"""The PPO loop (docs/paper.md Sec. 2): it only orchestrates; the math lives in ``core.py``.

One iteration, in phases:

1. **rollout**: sample responses for a batch of prompts with the policy adapter (KV cache);
2. **score**, 3. **shape rewards**, 4. **GAE**: :func:`~rlhf_lite.ppo.experience.make_experience`;
5. **update**: epochs of minibatches; clipped surrogate (+ entropy, + ptx) and (clipped) value loss;
6. **log**: the paper's monitors, the gold score (when a judge is given), samples and checkpoints.

The trainer is given everything it works on (:class:`PPOSetup`): the model stack, the prompts, the SFT
demonstrations of the ptx term, the optimizer factory and an optional gold judge. It knows nothing of
the synthetic world or of how the models were made (:mod:`rlhf_lite.ppo.stage` builds the setup).

Robustness: a non-finite loss, gradient norm or RM score skips that optimizer step (or the whole update)
with a warning and an ``event: nonfinite`` row; ``cfg.max_nonfinite`` such iterations in a row save a
checkpoint and raise :class:`NonFiniteError`. Ctrl-C or SIGTERM stops after the current iteration with a
checkpoint, and :meth:`PPOTrainer.load_checkpoint` resumes a run exactly (the same metrics as without the stop).
"""

from __future__ import annotations

import functools
import json
import math
import random
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..batching import pad_batch
from ..evaluation import GoldEval, evaluate_gold
from ..generation import Rollout, decode_responses, encode_prompts, sample
from ..parallel import Workers
from ..text import Prompt
from ..tracking import samples_markdown
from ..utils import (
    DivergedError,
    MetricsLog,
    Stopwatch,
    progress,
    seed_everything,
    stop_on_signals,
    write_json,
)
from . import core
from .checkpoint import load_trainer, restore_state, save_trainer, trainer_state, trim_metrics
from .config import PPOConfig
from .experience import Experience, make_experience, response_logits, response_values
from .guard import Snapshot, nonfinite
from .monitors import detect_collapse, repeated_trigram_fraction, run_figures
from .run_setup import PPOSetup


class NonFiniteError(DivergedError):
    """``cfg.max_nonfinite`` consecutive iterations skipped their update on NaN or inf; a checkpoint of the
    run (before any non-finite value reached the weights) was saved, and the message names it."""


def backward(loss_fn, mb: dict[str, torch.Tensor], prompt_len: int) -> tuple[float, dict]:
    """Compute a minibatch loss and its gradients; returns the loss value and the loss's stats."""
    loss, stats = loss_fn(mb, prompt_len)
    loss.backward()
    return loss.item(), stats


class PPOTrainer:
    """Runs PPO iterations over a :class:`PPOSetup`, logging to ``out_dir``."""

    token_mean = staticmethod(core.masked_mean)
    """Token mean of every loss term and stat (:class:`~rlhf_lite.ppo.distributed.DistributedPPOTrainer`: this
    process's share of the mean over every process's tokens)."""
    global_mean = staticmethod(core.masked_mean)
    """A token mean whose full value the loss needs (the entropy term's |mean - target|)."""

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
        self.policy_opt = setup.make_optimizer(self.policy_params, cfg.policy_lr, betas=cfg.adam_betas)
        self.critic_opt = setup.make_optimizer(self.critic_params, cfg.critic_lr, betas=cfg.adam_betas)
        self.reward_moments = core.RunningMoments()
        self.iteration = 0
        self.history: list[dict] = []
        self.samples: list[dict] = []
        self.collapse: tuple[int, str] | None = None
        self.baseline: dict | None = None  # gold measurement of the starting policy (the iteration-0 row)
        self.nonfinite_streak = 0  # consecutive iterations with a skipped update
        self.last_nonfinite: str | None = None
        self.events: list[dict] = []  # event rows of the current iteration, logged after its row
        self.stop_requested = False  # set by Ctrl-C or SIGTERM: stop after the current iteration
        self.timer = Stopwatch()

    # --- phase 1: rollout ---
    def rollout(self, prompts: Sequence[Prompt]) -> Rollout:
        ids, att = encode_prompts(self.tok, [p.text for p in prompts], self.device)
        self.stack.eval()
        with torch.no_grad(), self.stack.causal_lm("policy") as policy:
            return sample(policy, ids, att, self.cfg.max_new_tokens, self.tok.eos_token_id,
                          self.tok.pad_token_id, self.cfg.temperature, self.cfg.top_p, self.gen)

    def collect(self, prompts: Sequence[Prompt]) -> tuple[Rollout, Experience, dict]:
        """Phases 1-4: the rollout, its experience buffer and the buffer's monitors."""
        ro = self.rollout(prompts)
        return ro, *make_experience(self.cfg, self.stack, self.setup.reward_model, ro, self.reward_moments)

    # --- phase 5: update ---
    def policy_step_loss(self, mb: dict[str, torch.Tensor], P: int) -> tuple[torch.Tensor, dict]:
        """Clipped surrogate (+ entropy term, + ptx loss) of one minibatch."""
        cfg = self.cfg
        logits = response_logits(self.stack, "policy", mb["input_ids"], mb["attention_mask"], P) / cfg.temperature
        labels = mb["input_ids"][:, P:]
        logp = core.logprobs_from_logits(logits, labels)
        loss, st = core.policy_loss(logp, mb["old_logprobs"], mb["advantages"], mb["mask"], cfg.clip_eps,
                                    self.token_mean)
        stats = {"pg_loss": loss.item(), "clipfrac": st["clipfrac"].item(), "approx_kl": st["approx_kl"].item()}
        entropy = core.entropy_from_logits(logits.detach() if not cfg.entropy_coef else logits)
        stats["entropy"] = self.token_mean(entropy.detach(), mb["mask"]).item()
        if cfg.entropy_coef:
            loss = loss + core.entropy_bonus(entropy, mb["mask"], cfg.entropy_coef, cfg.entropy_target,
                                             self.global_mean)
        if cfg.ptx_coef and self.setup.sft_examples:
            ids, att, lm = self.ptx_batch(labels.shape[0])
            ptx = core.ptx_loss(self.stack.logits("policy", ids, att)[:, :-1], ids[:, 1:], lm[:, 1:], self.token_mean)
            loss = loss + cfg.ptx_coef * ptx
            stats["ptx_loss"] = ptx.item()
        return loss, stats

    def ptx_batch(self, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``rows`` random SFT demonstrations (at most all of them), padded: ids, attention and loss masks."""
        batch = self.rng.sample(self.setup.sft_examples, min(len(self.setup.sft_examples), rows))
        return tuple(t.to(self.device) for t in pad_batch([b[0] for b in batch], [b[1] for b in batch],
                                                          self.tok.pad_token_id))

    def critic_step_loss(self, mb: dict[str, torch.Tensor], P: int) -> tuple[torch.Tensor, dict]:
        """(Clipped) value loss of one minibatch."""
        values = response_values(self.stack, mb["input_ids"], mb["attention_mask"], P)
        loss, st = core.value_loss(values, mb["old_values"], mb["returns"], mb["mask"], self.cfg.value_clip,
                                   self.token_mean)
        return loss, {"value_loss": loss.item(), "vf_clipfrac": st["vf_clipfrac"].item()}

    def losses_backward(self, mb: dict[str, torch.Tensor], P: int, train_policy: bool) -> tuple[dict, dict]:
        """Both losses of a minibatch and their gradients: (stats, {what: loss value}). The two losses share no
        parameter, so their passes run in two threads where ``self.workers`` has two (see rlhf_lite.parallel)."""
        steps = [(self.policy_step_loss, "policy loss")] if train_policy else []
        steps.append((self.critic_step_loss, "value loss"))
        results = self.workers.run([functools.partial(backward, fn, mb, P) for fn, _ in steps])
        stats, losses = {}, {}
        for (_, what), (loss, st) in zip(steps, results):
            stats.update(st)
            losses[what] = loss
        return stats, losses

    def update(self, exp: Experience, train_policy: bool) -> dict:
        """Epochs of minibatch steps; a step whose loss or gradient norm is not finite is skipped."""
        cfg = self.cfg
        self.stack.train()
        agg: dict[str, list[float]] = {}
        skipped = 0
        params = self.policy_params + self.critic_params
        snapshot = Snapshot(params, (self.policy_opt, self.critic_opt))  # the last finite state (see guard.py)
        for epoch in range(cfg.ppo_epochs):
            for i, mb in enumerate(exp.minibatches(cfg.minibatch_size, self.rng)):
                self.policy_opt.zero_grad(set_to_none=True)
                self.critic_opt.zero_grad(set_to_none=True)
                stats, checked = self.losses_backward(mb, exp.prompt_len, train_policy)
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
                bad = self.nonfinite_weights()
                if bad:  # finite inputs, non-finite weights: roll the whole update back
                    snapshot.restore()
                    self.skip_step(f"{' and '.join(bad)} weights after the step of epoch {epoch}, minibatch {i} "
                                   "(update rolled back)")
                    return {"skipped_updates": cfg.ppo_epochs * (cfg.rollout_batch // cfg.minibatch_size)}
                for k, v in stats.items():
                    agg.setdefault(k, []).append(v)
        return {**{k: float(np.mean(v)) for k, v in agg.items()}, "skipped_updates": skipped}

    def nonfinite_weights(self) -> list[str]:
        """The adapters ("policy", "critic") holding a non-finite weight after a step (see guard.py)."""
        return nonfinite({"policy": self.policy_params, "critic": self.critic_params})

    def skip_step(self, what: str) -> None:
        """Record a skipped optimizer step: a warning now, an event row logged after this iteration's row."""
        warnings.warn(f"PPO iteration {self.iteration}: non-finite {what}; update skipped", RuntimeWarning,
                      stacklevel=2)
        self.events.append({"iteration": self.iteration, "event": "nonfinite", "what": what})
        self.last_nonfinite = what

    # --- one iteration ---
    def step(self) -> dict:
        """One PPO iteration, phases 1-6; returns its metrics row."""
        cfg = self.cfg
        self.iteration += 1
        prompts = self.rng.sample(self.setup.train_prompts, cfg.rollout_batch)
        ro, exp, stats = self.collect(prompts)
        texts = decode_responses(self.tok, ro)
        judge = self.setup.judge
        gold = [judge.score(p.raw, t, f) for p, t, f in zip(prompts, texts, ro.finished.tolist())] if judge else []
        train_policy = self.iteration > cfg.critic_pretrain_iterations
        if exp.finite:
            stats.update(self.update(exp, train_policy))
        else:  # every step of this buffer is skipped
            self.skip_step(f"RM reward ({stats['nonfinite_scores']} of {len(prompts)} scores)")
            stats["skipped_updates"] = cfg.ppo_epochs * (cfg.rollout_batch // cfg.minibatch_size)
        row = {"iteration": self.iteration, "repetition_fraction": repeated_trigram_fraction(texts),
               "policy_updated": train_policy, **stats}
        if gold:
            row["train_gold_score"] = float(np.mean(gold))
        if cfg.gold_due(self.iteration):
            row.update(self.gold_eval())
        if self.iteration % cfg.sample_every == 0 or self.iteration == 1:
            self.samples += [{"iteration": self.iteration, **s} for s in self._samples(prompts, texts, gold, exp)]
        row["wall_seconds"] = self.timer()
        return row

    def gold_eval(self) -> dict:
        """The common gold measurement on the test prompts ({} when there is no gold judge)."""
        if self.setup.judge is None:
            return {}
        ev = self.evaluate_policy(self.setup.test_prompts)
        return {"gold_score": ev.score, "eval_response_length": float(np.mean(ev.lengths)),
                **{f"gold/{k}": v for k, v in ev.by_category.items()}}

    def evaluate_policy(self, prompts: Sequence[Prompt], **kwargs) -> GoldEval:
        """:func:`~rlhf_lite.evaluation.evaluate_gold` of the current policy on ``prompts``."""
        with torch.no_grad(), self.stack.causal_lm("policy") as policy:
            return evaluate_gold(policy, self.tok, prompts, self.cfg.max_new_tokens, self.setup.judge,
                                 device=self.device, **kwargs)

    def _samples(self, prompts: Sequence[Prompt], texts, gold, exp, k: int = 4) -> list[dict]:
        scores = exp.rewards.sum(-1).tolist()
        golds = gold or [None] * len(texts)
        return [{"prompt": p.question, "response": t.strip(), "gold": None if g is None else round(g, 3),
                 "shaped_return": round(float(s), 3)} for p, t, g, s in list(zip(prompts, texts, golds, scores))[:k]]

    # --- the run ---
    def train(self) -> dict:
        """Run the remaining iterations, then write summary, samples and plots. Returns the summary.

        Ctrl-C or SIGTERM stops after the current iteration and saves a checkpoint (a second one aborts at
        once, keeping the last periodic checkpoint). After :meth:`load_checkpoint` the run continues where it
        stopped, appending to metrics.jsonl. Raises :class:`NonFiniteError` after ``cfg.max_nonfinite``
        consecutive iterations with a skipped update.
        """
        resumed = self.baseline is not None
        log = self.open_log(resumed)
        if not resumed:
            self.baseline = self.gold_eval()  # the starting policy (SFT), same measurement as every stage
            log.log({"iteration": 0, **self.baseline})
        for event in self.events:  # a resume's changed settings
            log.log(event)
        self.events.clear()
        aborted, self.stop_requested = False, False

        def request_stop(name: str) -> None:
            self.stop_requested = True
            print(f"\n{name}: stopping after the current iteration, with a checkpoint in {self.out / 'checkpoint'} "
                  "(signal again to abort without one)", file=sys.stderr)

        try:
            with stop_on_signals(request_stop):
                bar = progress(range(self.iteration, self.cfg.iterations), f"PPO {self.preset}")
                for _ in bar:
                    if self.should_stop():
                        break
                    row = self.step()
                    self._after_step(row, log)
                    bar.set_postfix(reward=f"{row['reward']:.2f}", kl=f"{row['kl_per_token']:.3f}",
                                    len=f"{row['response_length']:.1f}")
        except KeyboardInterrupt:  # a second signal: the iteration is half done, so no checkpoint of it
            aborted = True
        finally:
            log.close()
        if not aborted:
            self.save_checkpoint(self.out / "checkpoint")
        return self.finish(interrupted=aborted or self.stop_requested)

    def open_log(self, resumed: bool) -> MetricsLog:
        """metrics.jsonl (and its event files), continued after the checkpoint's iteration when ``resumed``."""
        if resumed:
            trim_metrics(self.out / "metrics.jsonl", self.iteration)
        return MetricsLog(self.out / "metrics.jsonl", append=resumed, stage="ppo",
                          purge_step=self.iteration + 1 if resumed else None)

    def should_stop(self) -> bool:
        """Whether Ctrl-C or SIGTERM asked to stop (checked between iterations)."""
        return self.stop_requested

    def _after_step(self, row: dict, log: MetricsLog) -> None:
        """Log an iteration, run the collapse detector, stop on non-finite streaks, checkpoint periodically."""
        self.history.append(row)
        log.log(row)
        if self.samples and self.samples[-1]["iteration"] == self.iteration:
            log.text(self.iteration, "samples/ppo", samples_markdown([s for s in self.samples
                                                                      if s["iteration"] == self.iteration]))
        for event in self.events:
            log.log(event)
        self.events.clear()
        if self.collapse is None:
            self.collapse = detect_collapse(self.history, self.cfg.collapse)
            if self.collapse:
                log.log({"iteration": self.iteration, "event": "collapse", "reason": self.collapse[1]})
        self.nonfinite_streak = self.nonfinite_streak + 1 if row["skipped_updates"] else 0
        ckpt = self.out / "checkpoint"
        if self.nonfinite_streak >= self.cfg.max_nonfinite:
            self.save_checkpoint(ckpt)  # skipped steps never touched the weights: a clean state
            raise NonFiniteError(
                f"{self.nonfinite_streak} consecutive PPO iterations (up to {self.iteration}) skipped their update "
                f"on non-finite values (last: {self.last_nonfinite}); checkpoint saved in {ckpt}; continue with a "
                f"safer setting, e.g. `python -m rlhf_lite ppo --resume {self.out} --policy-lr "
                f"{self.cfg.policy_lr / 10:g}`")
        if self.cfg.checkpoint_every and self.iteration % self.cfg.checkpoint_every == 0:
            self.save_checkpoint(ckpt)

    def finish(self, interrupted: bool = False) -> dict:
        """Write the policy and critic adapters (peft folders), summary.json, samples.jsonl and the monitor
        plot; return the summary."""
        self.stack.save_adapter("policy", self.out / "policy")
        self.stack.save_adapter("critic", self.out / "critic")
        summary = self.summary(self.baseline or {}, interrupted)
        write_json(self.out / "summary.json", summary)
        with (self.out / "samples.jsonl").open("w") as fh:
            for s in self.samples:
                fh.write(json.dumps(s, sort_keys=True) + "\n")
        from ..plotting import plot_ppo

        plot_ppo([self.out], self.out / "ppo_monitors.png", labels=[self.preset])
        return summary

    def summary(self, baseline: dict, interrupted: bool = False) -> dict:
        return {
            "stage": "ppo", "preset": self.preset, "config": self.cfg.to_dict(), "provenance": self.setup.provenance,
            "iterations": self.iteration, "interrupted": interrupted,
            **run_figures(self.history, baseline, self.collapse), "wall_seconds": self.timer(),
        }

    # --- checkpoints ---
    processes = 1
    """Processes of the run (:class:`~rlhf_lite.ppo.distributed.DistributedPPOTrainer`: more than one); a
    checkpoint resumes only with as many."""

    def save_checkpoint(self, path: str | Path) -> None:
        """Adapters, optimizer states, running statistics, RNG states, the iteration and the log state, written
        aside and swapped in durably (:func:`~rlhf_lite.ppo.checkpoint.save_trainer`)."""
        save_trainer(self, Path(path))

    def state_dict(self) -> dict:
        """What ``trainer.pt`` holds besides the adapters (:func:`~rlhf_lite.ppo.checkpoint.trainer_state`)."""
        return trainer_state(self)

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore what :meth:`save_checkpoint` wrote, so that :meth:`train` continues the run exactly: on the
        CPU, the same metrics as a run that never stopped. The checkpoint's config must equal this trainer's
        except the fields a resume may change (:func:`~rlhf_lite.ppo.checkpoint.load_trainer`)."""
        load_trainer(self, Path(path))

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (:func:`~rlhf_lite.ppo.checkpoint.restore_state`)."""
        restore_state(self, state)


__all__ = ["NonFiniteError", "PPOSetup", "PPOTrainer", "backward"]
