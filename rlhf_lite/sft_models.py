"""The model the SFT stage trains: the tiny model in full, or a LoRA adapter on a pretrained model.

:func:`make_sft_model` hides the difference from :func:`rlhf_lite.sft.train_sft`: both give a causal LM to
compute the loss with, the parameters to train, and a way to save the result as a plain model folder
(:func:`save_sft_model`; a LoRA adapter is merged into a float copy of the base first).
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .loading import (
    load_base,
    load_tokenizer_for,
    optimizer_factory,
    resolve_device,
    resolve_source,
)
from .models import AdapterStack, build_tiny_model
from .tokenizer import load_tokenizer

SFT_ADAPTER = "sft"
PRETRAINED_CONTEXT = 512
"""Default token budget of a demonstration for a pretrained model (SFTConfig.max_len overrides it)."""


@dataclass
class SFTModel:
    """What the SFT stage trains: ``model`` (the tiny LM, or an :class:`AdapterStack` with one ``sft``
    adapter), its tokenizer, the trainable ``params``, and where it came from."""

    model: nn.Module
    tokenizer: object
    params: list[nn.Parameter]
    device: torch.device
    context: int
    source: str
    parameters: int
    make_optimizer: object

    @property
    def stack(self) -> AdapterStack | None:
        return self.model if isinstance(self.model, AdapterStack) else None

    @contextlib.contextmanager
    def causal_lm(self) -> Iterator[nn.Module]:
        """The causal LM being trained: the tiny model, or the base with the SFT adapter."""
        if self.stack is None:
            yield self.model
        else:
            with self.stack.causal_lm(SFT_ADAPTER) as lm:
                yield lm


def make_sft_model(profile, data_dir: str | Path, seed: int) -> SFTModel:
    """The model to fine-tune for ``profile``: a fresh tiny Llama (the world tokenizer from ``data_dir``), or
    the profile's pretrained model with a fresh LoRA adapter (its own tokenizer and chat template)."""
    spec = profile.model
    device = resolve_device(spec)
    factory = optimizer_factory(spec, device)
    if spec.is_tiny:
        tok_file = Path(data_dir) / "tokenizer.json"
        if not tok_file.is_file():
            raise FileNotFoundError(f"{tok_file} not found: the tiny model uses the world's tokenizer; pick a "
                                    "pretrained model (--model) for data without one")
        tok = load_tokenizer(tok_file)
        model = build_tiny_model(len(tok), tok.pad_token_id, tok.eos_token_id, spec.tiny, seed).to(device)
        params = list(model.parameters())
        return SFTModel(model, tok, params, device, spec.tiny.max_positions, "tiny", sum(p.numel() for p in params),
                        factory)
    source = resolve_source(spec.source)
    tok = load_tokenizer_for(source)
    base = load_base(spec, source, device)
    n = sum(p.numel() for p in base.parameters())
    stack = AdapterStack(base, [SFT_ADAPTER], profile.lora)
    return SFTModel(stack, tok, stack.adapter_parameters(SFT_ADAPTER), device, PRETRAINED_CONTEXT, source, n, factory)


def save_sft_model(sm: SFTModel, profile, out: Path) -> Path:
    """Write the SFT model as a plain Hugging Face folder ``out/model`` (with its tokenizer) and return it.

    A LoRA adapter is saved to ``out/sft_adapter`` and merged into a float copy of the base: the reference
    model of every later stage ("the base with adapters off") is then the SFT model, also when that base is
    quantized again for training.
    """
    target = out / "model"
    if sm.stack is None:
        sm.model.save_pretrained(target)
        sm.tokenizer.save_pretrained(target)
        return target
    from peft import PeftModel

    sm.stack.save_adapter(SFT_ADAPTER, out / "sft_adapter")
    sm.model = sm.params = None  # free the training copy before loading the float one
    gc.collect()
    base = load_base(profile.model, sm.source, sm.device, quantize=False)
    merged = PeftModel.from_pretrained(base, str(out / "sft_adapter")).merge_and_unload()
    merged.config.use_cache = True  # a plain model folder, for any tool
    merged.save_pretrained(target)
    sm.tokenizer.save_pretrained(target)
    return target


__all__ = ["SFTModel", "make_sft_model", "save_sft_model"]
