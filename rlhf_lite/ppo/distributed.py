"""Data-parallel PPO: ``accelerate launch -m rlhf_lite ppo ...`` on several GPUs (or CPU processes).

Every process holds the whole stack (the base and its adapters, identical on every rank) and does its share
of the work; what they exchange keeps one run that gives the updates of one process with the same global
batch (:class:`DistributedPPOTrainer`, up to float rounding):

* **rollout and scoring**: the global batch of prompts is drawn with the shared RNG; each process samples
  and scores (reference, critic, RM: row by row) its contiguous share, with its own sampling generator;
* **experience**: the scored rows are gathered, so every process builds the same global buffer, and the
  running reward statistics (:class:`~rlhf_lite.ppo.core.RunningMoments`), the advantage whitening and the
  logged monitors see the whole batch exactly as one process does;
* **update**: each global minibatch (and the global ptx batch) is split across processes; every token mean
  divides by the minibatch's token count over all processes (not the mean of per-process means, which
  weights a process's tokens by how many it happened to get), and the adapter gradients are summed with one
  all-reduce after backward. Plain DDP wrapping does not fit here: the passes run through merged-weight views
  and a custom LoRA autograd function (rlhf_lite/lora.py), not through one module's forward, and each
  minibatch has two backward passes (policy and critic). The summed gradients are the same on every process,
  so are the clipped norm and the Adam step: the weights stay identical without being sent again;
* **gold measurement**: each process samples its share of the test prompts (seed ``EVAL_SEED + rank``), and
  the report is computed on all of them;
* **non-finite guard**: whether a step is skipped (losses and gradient norm, summed over the processes) or an
  update rolled back (a non-finite weight on any process, :mod:`rlhf_lite.ppo.guard`) is decided on values
  every process shares, so all skip together and stay in the same collectives;
* **files**: rank 0 writes metrics, event files, checkpoints (with every process's sampling RNG state) and the
  final adapters, and recovers a checkpoint a kill left mid-swap before every process reads it; a checkpoint
  resumes (with the settings a resume may change) on the same number of processes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..batching import pad_batch
from ..distributed import Dist, all_reduce_grads
from ..evaluation import EVAL_SEED, GoldEval
from ..generation import Rollout
from ..text import Prompt
from .checkpoint import recover
from .config import PPOConfig
from .experience import Experience, Scores, build_experience, score_rollout
from .masked import masked_sum
from .run_setup import PPOSetup
from .trainer import PPOTrainer


def check_config(cfg: PPOConfig, world: int, ptx_examples: int | None = None) -> None:
    """Fail (naming the field) on settings that cannot be split over ``world`` processes."""
    if world > 1 and cfg.minibatch_size % world:
        raise ValueError(f"PPOConfig.minibatch_size ({cfg.minibatch_size}) must be divisible by the number of "
                         f"processes ({world}): each process takes an equal share of every minibatch")
    if world > 1 and cfg.ptx_coef and ptx_examples is not None and 0 < min(ptx_examples, cfg.minibatch_size) < world:
        raise ValueError(f"PPOConfig.ptx_coef: the ptx batch of {min(ptx_examples, cfg.minibatch_size)} SFT "
                         f"demonstrations cannot be split over {world} processes")


def rank_seed(seed: int, rank: int) -> int:
    """The sampling seed of process ``rank``: independent streams for every (seed, rank)."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def _pad_cols(t: torch.Tensor, left: int, right: int, value: float = 0) -> torch.Tensor:
    return F.pad(t, (left, right), value=value) if left or right else t


def merge_rollouts(parts: Sequence[tuple[Rollout, Scores]], pad_id: int, device: torch.device
                   ) -> tuple[Rollout, Scores]:
    """One rollout batch (and its scores) from the processes' parts, in rank order, laid out as one process
    would have sampled it: prompts left-padded to the longest, responses right-padded to the longest."""
    P = max(ro.prompt_len for ro, _ in parts)
    N = max(ro.input_ids.shape[1] - ro.prompt_len for ro, _ in parts)
    cols = {k: [] for k in ("input_ids", "attention_mask", "response_mask", "logprobs", "finished",
                            "ref_logprobs", "values", "scores")}
    for ro, sc in parts:
        left, right = P - ro.prompt_len, N - (ro.input_ids.shape[1] - ro.prompt_len)
        cols["input_ids"].append(_pad_cols(ro.input_ids, left, right, pad_id))
        for k in ("attention_mask", "response_mask", "logprobs"):
            cols[k].append(_pad_cols(getattr(ro, k), left, right))
        cols["ref_logprobs"].append(_pad_cols(sc.ref_logprobs, 0, right))
        cols["values"].append(_pad_cols(sc.values, 0, right))
        cols["finished"].append(ro.finished)
        cols["scores"].append(sc.scores)
    t = {k: torch.cat(v).to(device) for k, v in cols.items()}
    ro = Rollout(t["input_ids"], t["attention_mask"], t["response_mask"], t["logprobs"], t["finished"], P)
    return ro, Scores(t["ref_logprobs"], t["values"], t["scores"])


class _NoLog:
    """What ranks above 0 log to: nothing."""

    def log(self, row: dict) -> None: ...

    def text(self, step: int, tag: str, text: str) -> None: ...

    def close(self) -> None: ...


class DistributedPPOTrainer(PPOTrainer):
    """:class:`~rlhf_lite.ppo.trainer.PPOTrainer` on one of ``dist.world`` processes (see the module doc).
    The policy and critic steps run one after the other (``workers=1``): the processes already share the
    machine's cores or each have a GPU."""

    def __init__(self, cfg: PPOConfig, setup: PPOSetup, out_dir, preset: str = "custom", dist: Dist | None = None
                 ) -> None:
        if dist is None or dist.world < 2:
            raise ValueError("DistributedPPOTrainer needs a Dist of two or more processes (see rlhf_lite.distributed)")
        check_config(cfg, dist.world, len(setup.sft_examples))
        super().__init__(cfg, setup, out_dir, preset, workers=1)
        self.dist, self.processes = dist, dist.world
        self.gen.manual_seed(rank_seed(cfg.seed, dist.rank))
        dist.broadcast_(self.policy_params + self.critic_params)  # rank 0's weights are the run's
        self._rank_states: list[dict] = []

    # --- phases 1-4: each process samples and scores its share; all build the global buffer ---
    def collect(self, prompts: Sequence[Prompt]) -> tuple[Rollout, Experience, dict]:
        local = self.rollout(prompts[self.dist.shard(len(prompts))])
        scored = score_rollout(self.cfg, self.stack, self.setup.reward_model, local)
        parts = self.dist.all_gather((_to_cpu(local), _to_cpu(scored)))
        ro, scored = merge_rollouts(parts, self.tok.pad_token_id, self.device)
        return ro, *build_experience(self.cfg, ro, scored, self.reward_moments)

    # --- phase 5: a share of every minibatch, token means over all processes, summed gradients ---
    def token_mean(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """This process's part of the token mean over every process: its masked sum over the global count (the
        parts add up to the mean over all tokens, and so do their gradients)."""
        m = mask.to(device=x.device, dtype=torch.bool).expand_as(x)
        n = float(self.dist.sum(m.sum().to(torch.float64)))
        if n == 0:
            raise ValueError("token mean over all processes: the masks select no elements")
        return masked_sum(x, m) / n

    def global_mean(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The token mean over every process as a value (the same on all), with this process's gradient."""
        part = self.token_mean(x, mask)
        return part + (self.dist.sum(part) - part.detach())

    def ptx_batch(self, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This process's share of the global ptx batch (as many demonstrations as a global minibatch has rows)."""
        batch = self.rng.sample(self.setup.sft_examples, min(len(self.setup.sft_examples), self.cfg.minibatch_size))
        batch = batch[self.dist.shard(len(batch))]
        return tuple(t.to(self.device) for t in pad_batch([b[0] for b in batch], [b[1] for b in batch],
                                                          self.tok.pad_token_id))

    def losses_backward(self, mb: dict[str, torch.Tensor], P: int, train_policy: bool) -> tuple[dict, dict]:
        rows = self.dist.shard(mb["mask"].shape[0])
        stats, losses = super().losses_backward({k: v[rows] for k, v in mb.items()}, P, train_policy)
        all_reduce_grads(self.policy_params + self.critic_params, self.dist)
        keys = sorted(stats) + sorted(losses)
        total = self.dist.sum(torch.tensor([stats[k] for k in sorted(stats)] + [losses[k] for k in sorted(losses)],
                                           dtype=torch.float64)).tolist()
        merged = dict(zip(keys, total))
        return {k: merged[k] for k in stats}, {k: merged[k] for k in losses}

    # --- gold measurement: a share of the test prompts each ---
    def evaluate_policy(self, prompts: Sequence[Prompt], **kwargs) -> GoldEval:
        seed = kwargs.pop("seed", EVAL_SEED) + self.dist.rank
        ev = super().evaluate_policy(list(prompts)[self.dist.shard(len(prompts))], seed=seed, **kwargs)
        parts = self.dist.all_gather((ev.prompts, ev.responses, ev.finished, ev.lengths))
        every = [[x for p in parts for x in p[i]] for i in range(4)]
        report = self.setup.judge.report([p.raw for p in every[0]], every[1], every[2])
        return GoldEval(report, every[0], every[1], every[2], every[3], self.setup.judge, ev.samples_per_prompt)

    # --- logs, stops, checkpoints and final files: rank 0 writes ---
    def open_log(self, resumed: bool):
        return super().open_log(resumed) if self.dist.is_main else _NoLog()

    def should_stop(self) -> bool:
        """Stop when any process was asked to (all stop after the same iteration)."""
        self.stop_requested = bool(self.dist.sum(torch.tensor(float(self.stop_requested))) > 0)
        return self.stop_requested

    def nonfinite_weights(self) -> list[str]:
        """The adapters with a non-finite weight on any process: all roll the update back together, so every
        process keeps taking part in the same collectives (the weights are identical anyway)."""
        own = super().nonfinite_weights()
        names = ("policy", "critic")
        flags = self.dist.sum(torch.tensor([float(n in own) for n in names])).tolist()
        return [n for n, f in zip(names, flags) if f > 0]

    def save_checkpoint(self, path) -> None:
        self._rank_states = self.dist.all_gather({"gen": self.gen.get_state(), "torch_rng": torch.get_rng_state()})
        if self.dist.is_main:
            super().save_checkpoint(path)
        self.dist.barrier()

    def load_checkpoint(self, path) -> None:
        """Rank 0 recovers a checkpoint a kill left mid-swap (:func:`~rlhf_lite.ppo.checkpoint.recover`
        renames folders); then every process reads it."""
        if self.dist.is_main:
            recover(path)
        self.dist.barrier()
        super().load_checkpoint(path)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "ranks": self._rank_states}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        own = state["ranks"][self.dist.rank]
        self.gen.set_state(own["gen"])
        torch.set_rng_state(own["torch_rng"])

    def summary(self, baseline: dict, interrupted: bool = False) -> dict:
        return {**super().summary(baseline, interrupted), "processes": self.dist.world}

    def finish(self, interrupted: bool = False) -> dict:
        summary = super().finish(interrupted) if self.dist.is_main else self.summary(self.baseline or {}, interrupted)
        self.dist.barrier()
        return summary


def _to_cpu(obj):
    """A Rollout or Scores with its tensors on the CPU (to be pickled between processes)."""
    fields = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in vars(obj).items()}
    return type(obj)(**fields)


def make_trainer(cfg: PPOConfig, setup: PPOSetup, out_dir, preset: str, dist: Dist) -> PPOTrainer:
    """The trainer for this process: :class:`PPOTrainer` alone, :class:`DistributedPPOTrainer` with others."""
    if dist.world > 1:
        return DistributedPPOTrainer(cfg, setup, out_dir, preset, dist)
    return PPOTrainer(cfg, setup, out_dir, preset)


__all__ = ["DistributedPPOTrainer", "check_config", "make_trainer", "merge_rollouts", "rank_seed"]
