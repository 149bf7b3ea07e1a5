"""Several processes, one run: the process group and the few collectives data-parallel PPO needs.

``accelerate launch`` (or ``torchrun``) starts one process per GPU, or several on a CPU, with ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` in the environment. :func:`init` joins them through accelerate's
``PartialState`` (NCCL between GPUs, gloo on the CPU) and returns a :class:`Dist`; a process started without
a launcher gets :data:`SINGLE`, and nothing here runs. What the processes share and what they split is
:mod:`rlhf_lite.ppo.distributed`'s business; this module only moves tensors and objects between them.

Only data parallelism is supported: every process holds the whole base model. FSDP and DeepSpeed shard the
base's weights across processes, but the adapters run as merged-weight views that read each base weight
whole (:mod:`rlhf_lite.lora`), so a launch with either is refused with one line.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    """This process's place in the run: ``rank`` of ``world`` processes, ``local_rank`` on its machine."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the logs, checkpoints and final files."""
        return self.rank == 0

    def shard(self, n: int) -> slice:
        """This process's contiguous share of ``n`` items: the first ``n % world`` ranks get one more."""
        per, extra = divmod(n, self.world)
        lo = self.rank * per + min(self.rank, extra)
        return slice(lo, lo + per + (self.rank < extra))

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of ``t`` over every process (a new tensor; ``t`` itself is unchanged)."""
        out = t.detach().clone()
        if self.world > 1:
            dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    def all_gather(self, obj: Any) -> list[Any]:
        """``obj`` of every process, in rank order (pickled: move tensors to the CPU first)."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast_(self, tensors: Sequence[torch.Tensor], src: int = 0) -> None:
        """Overwrite ``tensors`` in place with rank ``src``'s."""
        if self.world > 1:
            for t in tensors:
                dist.broadcast(t.data, src)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


SINGLE = Dist()
"""A process started without a launcher."""


def launched_world() -> int:
    """How many processes the launcher started (1 without one)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def current() -> Dist:
    """The initialized process group as a :class:`Dist` (:data:`SINGLE` when there is none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))


def refuse_sharding() -> None:
    """ValueError when accelerate was configured for FSDP or DeepSpeed (see the module docstring)."""
    for engine, var in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED")):
        if os.environ.get(var, "false").lower() == "true":
            raise ValueError(f"accelerate launch with {engine} ({var}=true): rlhf_lite runs data-parallel PPO with the "
                             "whole base model in every process and cannot shard it; use a config with "
                             "distributed_type MULTI_GPU, and a 4-bit base (--model.quantization nf4) for a large "
                             "model (README, 'More than one GPU')")


def init() -> Dist:
    """Join the processes a launcher started (:data:`SINGLE` without one). Ranks above 0 then print nothing on
    stdout and show no progress bars (warnings and errors still reach stderr)."""
    if launched_world() <= 1:
        return current()
    refuse_sharding()
    if not dist.is_initialized():
        from accelerate import PartialState

        cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
        PartialState(cpu=cpu)  # NCCL between GPUs (and the process's own cuda device), gloo on the CPU
    d = current()
    if not d.is_main:
        os.environ["RLHF_LITE_PROGRESS"] = "0"
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    return d


def place(profile, d: Dist):
    """``profile`` with its model on this process's GPU when several processes share a machine's GPUs."""
    spec = profile.model
    if d.world == 1 or not torch.cuda.is_available() or spec.device not in ("auto", "cuda"):
        return profile
    return dataclasses.replace(profile, model=dataclasses.replace(spec, device=f"cuda:{d.local_rank}"))


def all_reduce_grads(params: Sequence[torch.nn.Parameter], d: Dist) -> None:
    """Sum the gradients of ``params`` over every process, in place, in one flat buffer (parameters without a
    gradient are skipped; every process has the same ones)."""
    grads = [p.grad for p in params if p.grad is not None]
    if d.world == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


__all__ = ["SINGLE", "Dist", "all_reduce_grads", "current", "init", "launched_world", "place", "refuse_sharding"]
