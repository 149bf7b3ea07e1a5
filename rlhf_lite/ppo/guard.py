"""Non-finite weights: found after every optimizer step, rolled back, and never saved.

The trainer skips a step whose loss or gradient norm is not finite, but an optimizer step with finite
inputs can still leave an inf or NaN in a weight (an 8-bit optimizer state, a half-precision overflow). One
such weight poisons every later rollout, and sampling then fails deep inside torch. So the trainer takes a
:class:`Snapshot` of the trainable adapter weights and the optimizer states at the start of each update, checks
the weights after each step (:func:`nonfinite`), and on a hit restores the snapshot: the update is skipped
like one with a NaN loss, and a checkpoint saved afterwards holds the last finite state.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch


def nonfinite(named: dict[str, Sequence[torch.nn.Parameter]]) -> list[str]:
    """Names of the groups (``{"policy": params, ...}``) holding a non-finite weight."""
    return [name for name, params in named.items()
            if params and not bool(torch.stack([torch.isfinite(p).all() for p in params]).all())]


class Snapshot:
    """A copy of parameters (on the CPU) and optimizer states, to restore after a step that went non-finite."""

    def __init__(self, params: Sequence[torch.nn.Parameter], optimizers: Sequence[torch.optim.Optimizer]) -> None:
        self.params = list(params)
        self.values = [p.detach().to("cpu", copy=True) for p in self.params]
        self.optimizers = list(optimizers)
        self.states = [copy.deepcopy(o.state_dict()) for o in self.optimizers]

    def restore(self) -> None:
        with torch.no_grad():
            for p, v in zip(self.params, self.values):
                p.copy_(v.to(p.device))
        for o, s in zip(self.optimizers, self.states):
            o.load_state_dict(s)


def check_finite_module(module: torch.nn.Module, where: str, only: str = "") -> None:
    """ValueError naming ``where`` (a model or adapter folder) when a floating weight of ``module`` (those whose
    name contains ``only``) is not finite: a diverged SFT or RM run must fail here, not in the first rollout."""
    for name, p in module.named_parameters():
        if only in name and p.is_floating_point() and not bool(torch.isfinite(p).all()):
            raise ValueError(f"{where} holds non-finite weights ({name}): the run that wrote it diverged; retrain it")


__all__ = ["Snapshot", "check_finite_module", "nonfinite"]
