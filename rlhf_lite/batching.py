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
