"""Turning (prompt, response) text into padded token batches."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerFast


def encode_example(
    tokenizer: PreTrainedTokenizerFast, prompt: str, response: str, max_len: int, add_eos: bool = True
) -> tuple[list[int], list[int]]:
    """Token ids of ``prompt + response (+ EOS)`` and a 0/1 list marking the response tokens.

    Prompt and response are tokenized separately so the boundary is exact. Raises ValueError if the
    example does not fit ``max_len`` (the model's context): silent truncation would cut the EOS the
    reward model reads.
    """
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    r = tokenizer(response, add_special_tokens=False)["input_ids"]
    if add_eos:
        r = r + [tokenizer.eos_token_id]
    if len(p) + len(r) > max_len:
        raise ValueError(f"example of {len(p) + len(r)} tokens exceeds the context of {max_len}: {prompt[-60:]!r}")
    return p + r, [0] * len(p) + [1] * len(r)


def encode_examples(
    tokenizer: PreTrainedTokenizerFast, prompts: Sequence[str], responses: Sequence[str], max_len: int,
    add_eos: bool = True,
) -> list[tuple[list[int], list[int]]]:
    """:func:`encode_example` over many pairs, with two batched tokenizer calls (about 10x faster)."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if not prompts:
        return []
    ps = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    rs = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if add_eos else []
    out = []
    for prompt, p, r in zip(prompts, ps, rs):
        r = r + eos
        if len(p) + len(r) > max_len:
            raise ValueError(f"example of {len(p) + len(r)} tokens exceeds the context of {max_len}: {prompt[-60:]!r}")
        out.append((p + r, [0] * len(p) + [1] * len(r)))
    return out


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


def length_buckets(attention_mask: torch.Tensor, rows_per_bucket: int | None) -> list[tuple[torch.Tensor, int, int]]:
    """Group the rows of a padded batch into buckets of similar length, each with its own column span.

    A padded batch costs ``B * T`` token positions although only ``attention_mask.sum()`` are real: with
    the lengths of our data, half the positions of a batch of 128 rows are padding. Running each bucket
    of ``rows_per_bucket`` rows on just the columns ``[lo, hi)`` that hold its real tokens removes most
    of that waste without changing any result, since masked positions never reach a real token
    (positions come from the mask, so trimming leading pad columns changes nothing).

    attention_mask: (B, T), left or right padding. Returns ``(rows, lo, hi)`` per bucket: ``rows`` a
    (b,) long tensor of row indices (rows sorted by span, stable, so the grouping is deterministic),
    ``[lo, hi)`` the columns holding every real token of those rows. ``rows_per_bucket=None`` gives
    one bucket (still trimmed to the batch's real columns).
    """
    B, T = attention_mask.shape
    real = attention_mask.bool()
    cols = torch.arange(T, device=attention_mask.device).expand(B, T)
    first = torch.where(real, cols, T).min(dim=1).values.clamp(max=T - 1)
    last = torch.where(real, cols, -1).max(dim=1).values.clamp(min=0)
    if rows_per_bucket is None or B <= rows_per_bucket:
        order, size = torch.arange(B, device=attention_mask.device), B
    else:
        order, size = torch.sort(last - first, stable=True).indices, rows_per_bucket
    buckets = []
    for i in range(0, B, size):
        rows = order[i:i + size]
        buckets.append((rows, int(first[rows].min()), int(last[rows].max()) + 1))
    return buckets
