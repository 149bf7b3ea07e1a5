"""Masked statistics: sums, means, variances and whitening over the entries a mask selects.

Masks are treated as binary: any nonzero entry selects the position. Masked-out entries never influence a
result, even when they hold garbage (NaN, -100 labels, ...), because they are selected away with
``torch.where`` rather than multiplied by 0. TRL's helpers of the same names are the model; an empty mask
is an error where a silent 0 or NaN would hide an empty batch.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _bool_mask(x: Tensor, mask: Tensor) -> Tensor:
    """Mask as a bool tensor broadcast to ``x``'s shape."""
    return mask.to(device=x.device, dtype=torch.bool).expand_as(x)


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``x`` over entries where ``mask`` is nonzero.

    x: any shape; mask: broadcastable to x. dim=None sums everything (0-dim tensor); otherwise sums
    along ``dim``. An empty mask sums to 0 (a sum over an empty set is well defined, so no error).
    """
    m = _bool_mask(x, mask)
    masked = torch.where(m, x, torch.zeros_like(x))
    return masked.sum() if dim is None else masked.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over entries where ``mask`` is nonzero.

    dim=None: 0-dim tensor; raises ValueError if the mask selects nothing (a silent 0 or NaN would hide
    an empty batch). dim given: the mean along ``dim``; rows whose mask is empty give 0, not NaN.
    """
    m = _bool_mask(x, mask)
    count = m.sum(dim) if dim is not None else m.sum()
    if dim is None and count.item() == 0:
        raise ValueError("masked_mean: the mask selects no elements (mask.sum() == 0); nothing to average.")
    return masked_sum(x, m, dim) / count.clamp(min=1).to(x.dtype)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``x`` over all masked entries (0-dim tensor).

    unbiased=True divides by n - 1 (like ``torch.var``) and needs n >= 2; unbiased=False divides by n.
    Raises ValueError when there are too few masked entries.
    """
    m = _bool_mask(x, mask)
    n = int(m.sum().item())
    if n < (2 if unbiased else 1):
        raise ValueError(
            f"masked_var: the mask selects {n} element(s); need at least {2 if unbiased else 1} "
            f"(unbiased={unbiased})."
        )
    mean = masked_mean(x, m)
    sq_dev = masked_sum((x - mean) ** 2, m)
    return sq_dev / (n - 1 if unbiased else n)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Whiten ``x`` with the mean and (unbiased) variance of its masked entries.

    Returns (x - mean) / sqrt(var + eps) on the mask; shift_mean=False adds the mean back, so the
    output keeps the original mean and is only rescaled. Masked-out positions of the output are 0.
    Same shape as x.
    """
    m = _bool_mask(x, mask)
    mean, var = masked_mean(x, m), masked_var(x, m)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(m, whitened, torch.zeros_like(whitened))


__all__ = ["masked_mean", "masked_sum", "masked_var", "masked_whiten"]
