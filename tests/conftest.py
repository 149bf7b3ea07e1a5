"""Shared fixtures: small random models built offline."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rlhf_lite.models import AdapterStack, LoraSettings, TinyModelConfig, build_tiny_model
from rlhf_lite.utils import set_cpu_threads

set_cpu_threads()  # OMP_NUM_THREADS if set: two threads on a busy two-core machine run ~50x slower

SMALL = TinyModelConfig(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, max_positions=64)
SMALL_LORA = LoraSettings(r=4, alpha=8)
VOCAB, PAD, EOS = 40, 0, 1


def make_stack(adapters=("policy", "critic", "reward"), seed: int = 0, randomize: bool = True,
               vocab: int = VOCAB) -> AdapterStack:
    """A 2-layer Llama with the named adapters; adapters and heads randomized so they matter."""
    base = build_tiny_model(vocab, PAD, EOS, SMALL, seed)
    stack = AdapterStack(base, list(adapters), SMALL_LORA)
    if randomize:
        randomize_adapters(stack, seed + 1, head_scale=0.3)
    return stack.eval()


def randomize_adapters(stack: AdapterStack, seed: int = 1, head_scale: float = 1.0) -> None:
    """Random LoRA matrices (scale 0.1) and head weights (scale ``head_scale``), so that adapters matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in stack.peft.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        for head in stack.heads.values():
            head.weight.copy_(torch.randn(head.weight.shape, generator=g) * head_scale)


@pytest.fixture
def stack() -> AdapterStack:
    return make_stack()


@pytest.fixture(scope="session")
def small_world(tmp_path_factory):
    """A small world data folder (64 demonstrations, 128 + 32 preference pairs, 32 + 16 prompts)."""
    from rlhf_lite.world import WorldSizes, generate_world

    out = tmp_path_factory.mktemp("small_world")
    generate_world(out, seed=0, sizes=WorldSizes(sft=64, prefs_train=128, prefs_test=32, prompts_train=32,
                                                  prompts_test=16))
    return out


@pytest.fixture(scope="session")
def world_tok():
    """The world's word-level tokenizer (data/tokenizer.json)."""
    from rlhf_lite.tokenizer import load_tokenizer
    from rlhf_lite.utils import DATA_DIR

    return load_tokenizer(DATA_DIR / "tokenizer.json")


CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system You are a helpful assistant. <|im_end|> {% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant{% endif %}"
)


def save_chat_llama(folder, cfg: TinyModelConfig | None = None, seed: int = 0):
    """A tiny random Llama with an instruct model's tokenizer (the world's vocabulary plus ChatML turn tokens,
    a chat template, EOS = ``<|im_end|>``), saved to ``folder`` as a hub model folder. Returns (folder, tok)."""
    from tokenizers import AddedToken, Tokenizer
    from transformers import PreTrainedTokenizerFast

    from rlhf_lite.utils import DATA_DIR

    raw = Tokenizer.from_file(str(DATA_DIR / "tokenizer.json"))
    raw.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<|im_start|>", "<|im_end|>")])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="<|im_end|>", unk_token="<unk>",
                                  padding_side="left", clean_up_tokenization_spaces=False)
    tok.chat_template = CHAT_TEMPLATE
    cfg = cfg or TinyModelConfig(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, max_positions=128)
    model = build_tiny_model(len(tok), tok.pad_token_id, tok.eos_token_id, cfg, seed)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, tok
