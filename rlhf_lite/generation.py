"""Batched sampling with the KV cache, and the one gold-score measurement every stage reports.

The sampler is written out (rather than calling ``generate``) because PPO needs three things from
it that ``generate`` does not hand back cheaply: the log-probability of each sampled token (reused
as PPO's ``old_logprobs``, so no second policy forward is needed), a response mask, and whether each
response ended with EOS.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache, LlamaForCausalLM, PreTrainedTokenizerFast

from .models import position_ids_from_mask

CACHE_ARG = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"
"""The KV cache's argument and output name: transformers renamed ``past_key_values`` to ``cache`` during
5.x (5.17 has the old name, 5.24 the new one), so the sampler runs on either."""


@dataclass
class Rollout:
    """Prompts and sampled responses laid out as one left-padded (B, P + N) batch.

    ``input_ids``/``attention_mask``: prompt (left-padded to P) followed by the response (right-padded
    to N). ``response_mask`` (B, P + N) is 1 on response tokens including the EOS. ``logprobs``
    (B, P + N) holds log pi(token_t | <t) of each response token at the sampling temperature (0
    elsewhere); position t is the token itself, so it lines up with ``response_mask``.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor
    finished: torch.Tensor  # (B,) bool: the response ended with EOS
    prompt_len: int

    @property
    def response_ids(self) -> torch.Tensor:
        """(B, N) response tokens, pad after EOS."""
        return self.input_ids[:, self.prompt_len:]

    @property
    def lengths(self) -> torch.Tensor:
        """(B,) number of response tokens, EOS included."""
        return self.response_mask.sum(-1)


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering on (B, V) logits: keep the smallest set with cumulative probability >= top_p."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the token that crosses the threshold
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


@torch.no_grad()
def sample(
    forward: Callable[..., torch.Tensor] | torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Rollout:
    """Sample responses for left-padded prompts (B, P) with the KV cache; stop each row at EOS.

    ``forward`` is a causal LM (anything called as ``forward(input_ids=, attention_mask=,
    position_ids=, cache=, use_cache=True, logits_to_keep=1)``, the cache's name being :data:`CACHE_ARG`),
    e.g. a peft model with the policy adapter active. Recorded log-probs use ``logits / temperature`` and
    ignore top-p truncation (the convention PPO's ratio uses).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    B, P = input_ids.shape
    device = input_ids.device
    cache = DynamicCache()
    ids, mask = input_ids, attention_mask
    positions = position_ids_from_mask(mask)
    step_ids, step_pos = ids, positions
    tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logps = torch.zeros(B, max_new_tokens, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    resp_mask = torch.zeros(B, max_new_tokens, dtype=torch.long, device=device)
    for t in range(max_new_tokens):
        out = forward(input_ids=step_ids, attention_mask=mask, position_ids=step_pos, use_cache=True,
                      logits_to_keep=1, **{CACHE_ARG: cache})
        cache = getattr(out, CACHE_ARG)
        logits = out.logits[:, -1].float() / temperature
        logp_all = logits.log_softmax(-1)
        probs = top_p_filter(logits, top_p).softmax(-1)
        nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        tokens[:, t] = nxt
        logps[:, t] = torch.where(done, 0.0, logp_all.gather(-1, nxt[:, None]).squeeze(-1))
        resp_mask[:, t] = (~done).long()
        finished |= (nxt == eos_id) & ~done
        done |= nxt == eos_id
        if bool(done.all()):
            tokens, logps, resp_mask = tokens[:, : t + 1], logps[:, : t + 1], resp_mask[:, : t + 1]
            break
        mask = torch.cat([mask, (~done).long()[:, None]], dim=1)
        step_ids = nxt[:, None]
        step_pos = positions[:, -1:] + 1 + t
    zeros = torch.zeros(B, P, dtype=torch.long, device=device)
    return Rollout(
        input_ids=torch.cat([input_ids, tokens], 1),
        attention_mask=torch.cat([attention_mask.long(), resp_mask], 1),
        response_mask=torch.cat([zeros, resp_mask], 1),
        logprobs=torch.cat([zeros.float(), logps], 1),
        finished=finished,
        prompt_len=P,
    )


def encode_prompts(tokenizer: PreTrainedTokenizerFast, prompts: Sequence[str], device: torch.device | str = "cpu"
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize prompts left-padded: returns (input_ids, attention_mask), each (B, P)."""
    tokenizer.padding_side = "left"
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False)
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def decode_responses(tokenizer: PreTrainedTokenizerFast, rollout: Rollout) -> list[str]:
    """Response texts without EOS or padding, with a leading space as in HH-RLHF."""
    texts = []
    for row, m in zip(rollout.response_ids.tolist(), rollout.response_mask[:, rollout.prompt_len:].tolist()):
        toks = [t for t, keep in zip(row, m) if keep and t != tokenizer.eos_token_id]
        texts.append(" " + tokenizer.decode(toks, skip_special_tokens=True).strip())
    return texts
