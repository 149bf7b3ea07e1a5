"""Adapters as merged weights: ``x (W + s B A)^T`` in one matmul, with a LoRA backward (Hu et al. 2021).

peft runs a LoRA layer as ``W x + s B (A x)``: four extra ops on activations, which on a small model cost
more than the base matmul itself. :func:`adapter_view` gives a model that computes as one adapter with each
LoRA layer merged into a single linear map, sharing every parameter with the original (no copy, no
global switch), so that passes of different adapters may run in different threads at once.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F


def merge_lora(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """``W + scale * B A`` in W's dtype: W (out, in), A (r, in), B (out, r). The one formula of every merged
    pass, so that sampling (no grad) and training passes round alike."""
    return torch.addmm(weight, lora_b.to(weight.dtype), lora_a.to(weight.dtype), alpha=scale)


class _MergedLoraFn(torch.autograd.Function):
    """``y = x (W + s B A)^T`` with the backward of a LoRA layer, not of a full weight (LoRA, Hu et al. 2021).

    Autograd through the merged weight would form dL/dW (one more matmul as large as the forward's) and
    only then reduce it to A and B. Here dA and dB come from rank-r products, as in a separate adapter
    branch: the backward costs one full matmul (dL/dx) plus four thin ones.
    Shapes: x (..., in), W (out, in), A (r, in), B (out, r).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                scale: float) -> torch.Tensor:
        merged = merge_lora(weight, lora_a, lora_b, scale)
        ctx.save_for_backward(x, merged, lora_a, lora_b)
        ctx.scale = scale
        return F.linear(x, merged)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, merged, lora_a, lora_b = ctx.saved_tensors
        grad_x = grad_out @ merged if ctx.needs_input_grad[0] else None
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        g2 = grad_out.reshape(-1, grad_out.shape[-1])  # (N, out)
        a, b = lora_a.to(x.dtype), lora_b.to(x.dtype)
        grad_b = (g2.t() @ (x2 @ a.t())).mul_(ctx.scale)  # (out, N) (N, r) -> (out, r)
        grad_a = ((g2 @ b).t() @ x2).mul_(ctx.scale)  # (r, N) (N, in) -> (r, in)
        return grad_x, None, grad_a.to(lora_a.dtype), grad_b.to(lora_b.dtype), None


class MergedLoraLinear(nn.Module):
    """One adapter of a peft LoRA layer as a single linear map with weight ``W + s B A``.

    Holds references (not copies) to the base layer and the adapter's A and B, so optimizer steps and
    loaded states are seen at once. ``freeze``/``unfreeze`` hold a precomputed merged weight for a run
    of no-grad calls (the sampler's one call per token); otherwise every call merges afresh.
    """

    def __init__(self, layer: nn.Module, name: str) -> None:
        super().__init__()
        # A tuple, not attributes: submodules here would repeat the base's parameters in the view.
        self._parts = (layer.get_base_layer(), layer.lora_A[name], layer.lora_B[name])
        self.scale = float(layer.scaling[name])
        self._frozen: torch.Tensor | None = None
        self._holds = 0

    def merged_weight(self) -> torch.Tensor:
        """``W + s B A`` (out, in), in the base weight's dtype; differentiable in A and B."""
        base, a, b = self._parts
        return merge_lora(base.weight, a.weight, b.weight, self.scale)

    def freeze(self) -> None:
        if self._holds == 0:
            with torch.no_grad():
                self._frozen = self.merged_weight()
        self._holds += 1

    def unfreeze(self) -> None:
        self._holds -= 1
        if self._holds == 0:
            self._frozen = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base, a, b = self._parts
        if self._frozen is not None and not torch.is_grad_enabled():
            y = F.linear(x, self._frozen)
        elif torch.is_grad_enabled() and (a.weight.requires_grad or b.weight.requires_grad):
            y = _MergedLoraFn.apply(x, base.weight, a.weight, b.weight, self.scale)
        else:
            y = F.linear(x, self.merged_weight())
        return y if base.bias is None else y + base.bias


def adapter_view(model: nn.Module, name: str | None) -> nn.Module:
    """A copy of ``model`` (a peft-injected causal LM) that computes as adapter ``name`` with merged weights.

    Only the modules on the way to a LoRA layer are copied (shallowly: they share their parameter and
    buffer dicts with the original); every LoRA layer becomes a :class:`MergedLoraLinear` of adapter
    ``name``, or its plain base layer for ``name=None`` (the reference model). Nothing is copied that
    holds weights, so the view costs no memory and sees every update of the base and the adapters.
    """
    from peft.tuners.lora import LoraLayer

    if isinstance(model, LoraLayer):
        return model.get_base_layer() if name is None else MergedLoraLinear(model, name)
    if not any(isinstance(m, LoraLayer) for m in model.modules()):
        return model  # shared as it is
    view = copy.copy(model)
    view._modules = {key: None if child is None else adapter_view(child, name)
                     for key, child in model._modules.items()}
    return view


__all__ = ["MergedLoraLinear", "adapter_view", "merge_lora"]
