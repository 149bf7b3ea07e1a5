"""Text in one place: the HH-RLHF transcript format, and how a model sees a prompt and a response.

Every data file of this project (the synthetic world's and imported HH-RLHF) keeps Anthropic HH-RLHF's
transcript format: a conversation starts with ``"\\n\\nHuman:"`` and alternates ``"\\n\\nHuman:"`` /
``"\\n\\nAssistant:"`` turns; a *prompt* is everything through the last ``"\\n\\nAssistant:"`` and a
*response* is the text after it, usually starting with a space.

A model sees that text in its own format. The tiny world model was trained on the HH text itself; an
instruct model (SmolLM2, Qwen) expects its chat template, whose end-of-turn token is its EOS. A
:class:`Prompt` carries both forms: the raw HH text, which the gold judge reads, and the model text, which
the policy is sampled on, so the same gold measurement serves every profile.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"

_EXCERPT_CHARS = 60
_TURN = re.compile(f"({re.escape(HUMAN)}|{re.escape(ASSISTANT)})")
_LAST_TURN = re.compile(r"\n\nHuman:(?P<q>(?:(?!\n\nHuman:|\n\nAssistant:).)*)\n\nAssistant:\s*\Z", re.DOTALL)


def excerpt(text: str, tail: bool = False) -> str:
    """Quote at most 60 characters of ``text`` (its start, or its end if ``tail``) with ``repr``."""
    if len(text) > _EXCERPT_CHARS:
        keep = _EXCERPT_CHARS - 3
        text = "..." + text[-keep:] if tail else text[:keep] + "..."
    return repr(text)


# ----- the HH format ----------------------------------------------------------------------------------
def split_hh(text: str) -> tuple[str, str]:
    """Split an HH-RLHF transcript into ``(prompt, response)``.

    ``prompt`` is everything through the LAST ``"\\n\\nAssistant:"`` (inclusive), so it keeps every
    earlier turn; ``response`` is the text after it, unchanged (its usual leading space is kept).
    The word ``"Human:"`` inside a response is fine; ``"\\n\\nHuman:"`` is a new turn.

    Raises:
        TypeError: ``text`` is not a ``str``.
        ValueError: the transcript does not start with ``"\\n\\nHuman:"``, has no ``"\\n\\nAssistant:"``
            turn, ends with a Human turn after the last Assistant turn, or its final response is
            empty or whitespace only.  The message quotes a short excerpt of the offending text.
    """
    if not isinstance(text, str):
        raise TypeError(f"transcript must be a str, got {type(text).__name__}")
    if not text.startswith(HUMAN):
        raise ValueError(f"transcript does not start with {HUMAN!r}; it starts with {excerpt(text)}")
    cut = text.rfind(ASSISTANT)
    if cut < 0:
        raise ValueError(f"transcript has no {ASSISTANT!r} turn, so there is no final response: {excerpt(text)}")
    cut += len(ASSISTANT)
    prompt, response = text[:cut], text[cut:]
    human_at = response.find(HUMAN)
    if human_at >= 0:
        raise ValueError(f"transcript ends with a Human turn after the last {ASSISTANT!r}, so there is no final "
                         f"assistant response: {excerpt(response[human_at:])}")
    if not response.strip():
        raise ValueError(f"the final response (after the last {ASSISTANT!r}) is empty: {response!r}; "
                         f"transcript ends {excerpt(text, tail=True)}")
    return prompt, response


def check_hh_prompt(prompt: str) -> None:
    """ValueError unless ``prompt`` is an HH prompt: it starts with a Human turn and ends with
    ``"\\n\\nAssistant:"`` (the open turn the model answers)."""
    if not prompt.startswith(HUMAN):
        raise ValueError(f"prompt does not start with {HUMAN!r}; it starts with {excerpt(prompt)}")
    if not prompt.endswith(ASSISTANT):
        raise ValueError(f"prompt must end with {ASSISTANT!r}; it ends {excerpt(prompt, tail=True)}")


def last_human_turn(prompt: str) -> str:
    """The last Human turn of an HH prompt, whitespace-normalized; ValueError if the format is off."""
    m = _LAST_TURN.search(prompt)
    if m is None or not prompt.lstrip(" ").startswith(HUMAN):
        raise ValueError(f"not an HH-RLHF prompt ending with '\\n\\nAssistant:': {prompt[:80]!r}")
    return " ".join(m.group("q").split())


def hh_messages(prompt: str) -> list[dict[str, str]]:
    """An HH prompt as chat messages (``user`` / ``assistant``), without the open last Assistant turn."""
    parts = _TURN.split(prompt)[1:]  # [marker, text, marker, text, ...]
    roles = {HUMAN: "user", ASSISTANT: "assistant"}
    msgs = [{"role": roles[m], "content": t.strip()} for m, t in zip(parts[::2], parts[1::2])]
    if not msgs or msgs[-1] != {"role": "assistant", "content": ""}:
        raise ValueError(f"not an HH prompt ending with {ASSISTANT!r}: {prompt[-60:]!r}")
    return msgs[:-1]


def human_turn_starts(prompt: str) -> list[int]:
    """Character offsets of every ``"\\n\\nHuman:"`` in ``prompt`` (where a shorter conversation can start)."""
    return [m.start() for m in re.finditer(re.escape(HUMAN), prompt)]


# ----- what a model sees ------------------------------------------------------------------------------
def uses_chat_template(tokenizer) -> bool:
    """Whether the tokenizer formats conversations with a chat template (an instruct model)."""
    return bool(getattr(tokenizer, "chat_template", None))


def model_prompt(tokenizer, prompt: str, system_prompt: bool = True) -> str:
    """The text the model sees for HH ``prompt``: its chat template applied to the turns when the tokenizer
    has one, the HH text itself otherwise (the tiny world model was trained on it).

    ``system_prompt=False`` passes an empty system message where the template would add its default one
    (SmolLM2's is 14 tokens of every prompt); the gold judge never reads it.
    """
    if not uses_chat_template(tokenizer):
        return prompt
    messages = hh_messages(prompt)
    if not system_prompt:
        messages = [{"role": "system", "content": ""}, *messages]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def model_response(tokenizer, response: str) -> str:
    """The text of ``response`` as the model writes it: HH responses start with a space (after
    ``"Assistant:"``), a chat template's assistant turn does not."""
    return response.strip() if uses_chat_template(tokenizer) else response


def last_user_turn(text: str) -> str:
    """The last user message of an HH prompt or of a ChatML-formatted one, for tables of samples."""
    if HUMAN in text:
        return text.rsplit(HUMAN, 1)[1].replace(ASSISTANT, "").strip()
    if "<|im_start|>user" in text:
        return text.rsplit("<|im_start|>user", 1)[1].split("<|im_end|>", 1)[0].strip()
    return text.strip()


@dataclass(frozen=True)
class Prompt:
    """An HH prompt in both forms: ``raw`` (the HH text, what the gold judge reads) and ``text`` (what the
    model is given: the raw text, or the chat template applied to it)."""

    raw: str
    text: str

    @property
    def question(self) -> str:
        """The last Human turn, for tables of samples."""
        return last_user_turn(self.raw)


def format_prompts(tokenizer, prompts: Iterable[str], max_tokens: int | None = None,
                   system_prompt: bool = True) -> tuple[list[Prompt], int]:
    """:class:`Prompt` objects for HH ``prompts``, and how many were dropped.

    With ``max_tokens``, a prompt whose model text is longer loses its earliest exchanges, whole turns at
    a time, so that the model always sees a well-formed conversation; a prompt whose last Human turn alone
    is too long is dropped. Prompts that fit are kept unchanged, so a run whose prompts all fit (the tiny
    world's) sees exactly its data.
    """
    prompts = list(prompts)
    texts = [model_prompt(tokenizer, p, system_prompt) for p in prompts]
    if max_tokens is None:
        return [Prompt(p, t) for p, t in zip(prompts, texts)], 0
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []
    out, dropped = [], 0
    for raw, text, n in zip(prompts, texts, lengths):
        if n <= max_tokens:
            out.append(Prompt(raw, text))
            continue
        for start in human_turn_starts(raw)[1:]:  # drop earlier exchanges, oldest first
            shorter = raw[start:]
            t = model_prompt(tokenizer, shorter, system_prompt)
            if len(tokenizer(t, add_special_tokens=False)["input_ids"]) <= max_tokens:
                out.append(Prompt(raw, t))
                break
        else:
            dropped += 1
    return out, dropped


def encode_pair_texts(tokenizer, prompt_texts: Sequence[str], responses: Sequence[str], max_len: int,
                      truncate: bool = False, add_eos: bool = True) -> list[tuple[list[int], list[int]]]:
    """Token ids of ``prompt + response (+ EOS)`` and a 0/1 list marking the response tokens (EOS included).

    ``prompt_texts`` are model texts (see :func:`model_prompt`); responses are HH responses, turned into the
    model's form by :func:`model_response`. Prompt and response are tokenized separately (two batched calls),
    so the boundary is exact. An example longer than ``max_len`` raises ValueError (silent truncation would
    cut the EOS the reward model reads), unless ``truncate``: then the response keeps at most
    ``max_len // 2`` tokens and the EOS, and the prompt keeps its LAST tokens, as many as still fit (the turn
    being answered matters most).
    """
    if len(prompt_texts) != len(responses):
        raise ValueError(f"{len(prompt_texts)} prompts but {len(responses)} responses")
    if not prompt_texts:
        return []
    ps = tokenizer(list(prompt_texts), add_special_tokens=False)["input_ids"]
    rs = tokenizer([model_response(tokenizer, r) for r in responses], add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if add_eos else []
    out = []
    for text, p, body in zip(prompt_texts, ps, rs):
        r = body + eos
        if len(p) + len(r) > max_len:
            if not truncate:
                raise ValueError(f"example of {len(p) + len(r)} tokens exceeds the limit of {max_len}: "
                                 f"{text[-60:]!r}")
            r = body[: max(1, max_len // 2 - len(eos))] + eos
            p = p[max(0, len(p) - (max_len - len(r))):]
        out.append((p + r, [0] * len(p) + [1] * len(r)))
    return out


__all__ = [
    "ASSISTANT", "HUMAN", "Prompt", "check_hh_prompt", "encode_pair_texts", "excerpt", "format_prompts",
    "hh_messages", "human_turn_starts", "last_human_turn", "last_user_turn", "model_prompt", "model_response",
    "split_hh", "uses_chat_template",
]
