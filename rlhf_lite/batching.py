"""Padded token batches, and length buckets that cut the padding out of forward passes.

Tokenizing (prompt, response) text is :func:`rlhf_lite.text.encode_pair_texts`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def pad_batch(
    seqs: Sequence[Sequence[int]], masks: Sequence[Sequence[int]], pad_id: int, side: str = "right"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad to the longest: returns input_ids, attention_mask and loss_mask, each (B, T)."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    att = torch.zeros((len(seqs), T), dtype=torch.long)
    lm = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        sl = slice(0, len(s)) if side == "right" else slice(T - len(s), T)
        ids[i, sl] = torch.tensor(s, dtype=torch.long)
        att[i, sl] = 1
        lm[i, sl] = torch.tensor(m, dtype=torch.long)
    return ids, att, lm


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) mask -> (B,) index of each row's last real token, for left or right padding."""
    T = attention_mask.shape[1]
    idx = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), idx, -1).max(dim=1).values


def length_buckets(attention_mask: torch.Tensor, rows_per_bucket: int | None = None,
                   overhead: int | None = None) -> list[tuple[torch.Tensor, int, int]]:
    """Group the rows of a padded batch into buckets of similar length, each with its own column span.

    A padded batch costs ``B * T`` token positions although only ``attention_mask.sum()`` are real: with
    the lengths of our data, half the positions of a batch of 128 rows are padding. Running each bucket
    on just the columns ``[lo, hi)`` that hold its real tokens removes most of that waste without
    changing any result, since masked positions never reach a real token (positions come from the
    mask, so trimming leading pad columns changes nothing).

    Rows are sorted by span (stable, so the grouping is deterministic) and cut into consecutive groups:

    * ``overhead`` given: the cheapest cut under the cost ``sum over buckets of (overhead + rows * width)``,
      found exactly by dynamic programming; ``overhead`` is the fixed cost of one more pass in token
      positions (see :data:`BUCKET_OVERHEAD`). A random PPO minibatch of 32 rows padded to its longest
      row (53 columns) holds 37 real tokens per row on average; the cut runs it as a few buckets of
      similar rows. ``rows_per_bucket`` then caps the rows of a bucket;
    * otherwise groups of ``rows_per_bucket`` rows; ``None`` gives one bucket (still trimmed).

    attention_mask: (B, T), left or right padding. Returns ``(rows, lo, hi)`` per bucket: ``rows`` a
    (b,) long tensor of row indices (``arange(B)`` when there is one bucket), ``[lo, hi)`` the columns
    holding every real token of those rows.
    """
    B, T = attention_mask.shape
    real = attention_mask.bool()
    cols = torch.arange(T, device=attention_mask.device).expand(B, T)
    first = torch.where(real, cols, T).min(dim=1).values.clamp(max=T - 1)
    last = torch.where(real, cols, -1).max(dim=1).values.clamp(min=0)
    order = torch.sort(last - first, stable=True).indices
    if overhead is not None:
        ends = cheapest_cut(first[order].cpu().numpy(), last[order].cpu().numpy(), overhead, rows_per_bucket)
    elif rows_per_bucket is None or B <= rows_per_bucket:
        ends = [B]
    else:
        ends = list(range(rows_per_bucket, B, rows_per_bucket)) + [B]
    if len(ends) == 1:  # one bucket keeps the batch's own row order
        order = torch.arange(B, device=attention_mask.device)
    buckets = []
    for start, end in zip([0, *ends[:-1]], ends):
        rows = order[start:end]
        buckets.append((rows, int(first[rows].min()), int(last[rows].max()) + 1))
    return buckets


BUCKET_OVERHEAD = 64
"""Fixed cost of one more forward (and backward) pass, in token positions. Measured on the tiny model on
the 2-core CI machine (fit of time = a + b * rows over 8-64 rows of 53 tokens): a = 1.0 ms and b = 0.72 ms
per row for a forward (74 positions), 2.8 ms and 2.2 ms per row for a forward and backward (67)."""


def cheapest_cut(first: np.ndarray, last: np.ndarray, overhead: int, max_rows: int | None = None) -> list[int]:
    """End indices of the consecutive groups of rows that minimise ``sum(overhead + rows * width)``.

    ``first``/``last``: (B,) first and last real column of each row, in the order the groups keep;
    a group's width is ``max(last) - min(first) + 1`` over its rows. Exact (dynamic programming over
    the B + 1 cut points, O(B^2)); ties go to the earliest cut, so the result is deterministic.
    """
    B = len(first)
    best = np.zeros(B + 1)
    start = np.zeros(B + 1, dtype=np.int64)
    for j in range(1, B + 1):  # best[j]: the cheapest cut of rows [0, j)
        i0 = max(0, j - max_rows) if max_rows else 0
        lo = np.minimum.accumulate(first[i0:j][::-1])[::-1]  # min first over rows [i, j), for every i
        hi = np.maximum.accumulate(last[i0:j][::-1])[::-1]
        cost = best[i0:j] + overhead + (j - np.arange(i0, j)) * (hi - lo + 1)
        k = int(np.argmin(cost))
        best[j], start[j] = cost[k], i0 + k
    ends, j = [], B
    while j > 0:
        ends.append(j)
        j = int(start[j])
    return ends[::-1]
