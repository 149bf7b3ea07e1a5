"""GPU profiles as data: which model, which adapters, which budgets, and whether it fits.

The paper trains 7B LLaMA models on 8 x A100-80G (PAPER.md Sec. 6). The ``gpu`` profile runs the same
pipeline on one card: a 4-bit NF4 base (QLoRA) hosting the policy, critic and reward LoRA adapters
(:class:`rlhf_lite.models.AdapterStack`), gradient checkpointing, and an 8-bit paged optimizer. A
:class:`GPUProfile` holds every choice of such a run; the presets are named instances:

* ``COLAB_T4``: Qwen2.5-1.5B-Instruct on a free Colab T4 (16 GB, fp16);
* ``CONSUMER_24GB``: Qwen2.5-7B-Instruct on a 24 GB card (RTX 3090/4090, bf16);
* ``CPU_SMOKE``: the same code path on a tiny Llama saved to a local folder, loaded in 4-bit on the CPU
  (what CI and the notebook run without a GPU).

:func:`estimate_memory` predicts the peak memory of one PPO-max iteration of a profile, component by
component; ``bench/memory.py`` checks it against a measurement and ``docs/what_fits_where.md`` explains it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from .models import (
    AdapterStack,
    LoraSettings,
    TinyModelConfig,
    build_tiny_model,
    load_causal_lm,
    pick_compute_dtype,
)
from .utils import DATA_DIR, REPO_ROOT, pick_device, seed_everything

GIB = 1024**3


# ----- architecture ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelArch:
    """The shape of a decoder-only Llama-family model: all the memory estimate needs.

    Stored with each profile (copied from the model's ``config.json``) so the estimate runs offline.
    """

    hidden_size: int
    num_layers: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    tie_embeddings: bool

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer of one decoder block (the layers 4-bit quantizes)."""
        h, kv, i = self.hidden_size, self.num_kv_heads * self.head_dim, self.intermediate_size
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def linear_params(self) -> int:
        """Parameters in the decoder blocks' linear layers (biases and norms excluded)."""
        return self.num_layers * sum(a * b for a, b in self.linear_shapes().values())

    @property
    def embedding_params(self) -> int:
        """Input embedding plus the LM head when it is not tied to it (never quantized)."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_embeddings else 2)

    @property
    def total_params(self) -> int:
        norms = (2 * self.num_layers + 1) * self.hidden_size
        return self.linear_params + self.embedding_params + norms

    def lora_params(self, lora: LoraSettings) -> int:
        """Parameters of ONE LoRA adapter: r * (in + out) per targeted linear layer."""
        shapes = self.linear_shapes()
        unknown = set(lora.target_modules) - set(shapes)
        if unknown:
            raise ValueError(f"LoRA targets {sorted(unknown)} are not linear layers of this architecture")
        return self.num_layers * sum(lora.r * (shapes[m][0] + shapes[m][1]) for m in lora.target_modules)

    @classmethod
    def from_config(cls, config) -> ModelArch:
        """From a ``transformers`` config (LlamaConfig, Qwen2Config, ...)."""
        return cls(
            hidden_size=config.hidden_size, num_layers=config.num_hidden_layers,
            intermediate_size=config.intermediate_size, num_heads=config.num_attention_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            vocab_size=config.vocab_size, tie_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        )


# Copied from the models' config.json on the Hugging Face hub.
QWEN25_1_5B = ModelArch(hidden_size=1536, num_layers=28, intermediate_size=8960, num_heads=12, num_kv_heads=2,
                        vocab_size=151936, tie_embeddings=True)
QWEN25_7B = ModelArch(hidden_size=3584, num_layers=28, intermediate_size=18944, num_heads=28, num_kv_heads=4,
                      vocab_size=152064, tie_embeddings=False)
TINY = TinyModelConfig()
TINY_VOCAB = 244  # the world tokenizer's vocabulary (data/tokenizer.json)
TINY_ARCH = ModelArch(hidden_size=TINY.hidden_size, num_layers=TINY.num_layers,
                      intermediate_size=TINY.intermediate_size, num_heads=TINY.num_heads,
                      num_kv_heads=TINY.num_heads, vocab_size=TINY_VOCAB, tie_embeddings=True)


# ----- the profile ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class GPUProfile:
    """Every choice of a real-model QLoRA run: model, adapters, memory savers, optimizer and budgets.

    The compute dtype is not a field: it is chosen at run time by :func:`rlhf_lite.models.pick_compute_dtype`
    (bf16 where the GPU supports it, fp16 on a T4, fp32 on the CPU).
    """

    name: str
    """Preset name."""
    model_name: str
    """Hub id or local folder of an instruct (SFT) model: the base, and so also the reference model."""
    arch: ModelArch
    """Shape of that model, for :func:`estimate_memory` (no download needed)."""
    max_params: float
    """Largest model (parameters) the budgets below are sized for; :func:`load_gpu_stack` refuses bigger."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA settings of the policy, critic and reward adapters."""
    quantize_4bit: bool = True
    """Load the base in 4-bit NF4 with double quantization (QLoRA)."""
    gradient_checkpointing: bool = True
    """Recompute each decoder block in the backward pass instead of storing its activations."""
    optimizer: str = "auto"
    """"auto": bitsandbytes' paged 8-bit AdamW on CUDA, torch Adam on the CPU; or "adam", "paged_adamw_8bit"."""
    max_prompt_tokens: int = 256
    """Prompts longer than this lose their earliest turns (PPO) or their earliest tokens (RM pairs)."""
    max_len: int = 384
    """Token budget of an RM pair side or a ptx demonstration (prompt + response + EOS)."""
    max_new_tokens: int = 128
    """Response budget of PPO rollouts (the paper's default)."""
    rollout_batch: int = 8
    """Prompts per PPO iteration (the experience buffer)."""
    minibatch_size: int = 4
    """Rollouts per PPO gradient step."""
    ppo_iterations: int = 20
    """PPO iterations of the notebook's short run."""
    critic_pretrain_iterations: int = 3
    """PPO-max #5: first iterations in which only the critic trains."""
    policy_lr: float = 1e-5
    """Adam learning rate of the policy adapter."""
    critic_lr: float = 5e-5
    """Adam learning rate of the critic adapter and value head."""
    temperature: float = 0.8
    """Rollout sampling temperature (the paper's sampling settings)."""
    top_p: float = 0.9
    """Rollout nucleus sampling."""
    rm_steps: int = 100
    """Optimizer steps of reward-model training."""
    rm_batch_size: int = 4
    """Preference pairs per RM step."""
    rm_lr: float = 1e-4
    """AdamW learning rate of the reward adapter and head."""

    def validate(self) -> None:
        """Fail early on impossible budgets, naming the field."""
        for name in ("max_params", "max_prompt_tokens", "max_len", "max_new_tokens", "rollout_batch",
                     "minibatch_size", "ppo_iterations", "rm_steps", "rm_batch_size"):
            if not getattr(self, name) > 0:
                raise ValueError(f"GPUProfile.{name} must be positive, got {getattr(self, name)}")
        if self.optimizer not in ("auto", "adam", "paged_adamw_8bit"):
            raise ValueError(f"GPUProfile.optimizer must be auto, adam or paged_adamw_8bit, got {self.optimizer!r}")
        if self.max_prompt_tokens >= self.max_len:
            raise ValueError("GPUProfile.max_prompt_tokens must be below max_len (room for a response)")

    def ppo_config(self, **changes):
        """The PPO-max preset (PAPER.md Sec. 3) with this profile's budgets; ``changes`` override fields."""
        from .ppo.config import get_preset

        budget = {"iterations": self.ppo_iterations, "rollout_batch": self.rollout_batch,
                  "minibatch_size": self.minibatch_size, "max_new_tokens": self.max_new_tokens,
                  "critic_pretrain_iterations": self.critic_pretrain_iterations, "policy_lr": self.policy_lr,
                  "critic_lr": self.critic_lr, "temperature": self.temperature, "top_p": self.top_p,
                  "checkpoint_every": 0}
        return replace(get_preset("ppo_max"), **{**budget, **changes})


COLAB_T4 = GPUProfile(
    name="colab_t4", model_name="Qwen/Qwen2.5-1.5B-Instruct", arch=QWEN25_1_5B, max_params=2.0e9,
)
"""A free Colab T4 (16 GB, no bf16: fp16 compute): a 1.5B instruct model, short sequences."""

CONSUMER_24GB = GPUProfile(
    name="consumer_24gb", model_name="Qwen/Qwen2.5-7B-Instruct", arch=QWEN25_7B, max_params=8.0e9,
    max_prompt_tokens=384, max_len=512, rollout_batch=8, minibatch_size=2, ppo_iterations=40,
    policy_lr=5e-6, critic_lr=2e-5, rm_steps=200, rm_batch_size=4, rm_lr=5e-5,
)
"""A 24 GB consumer GPU (RTX 3090/4090, bf16): a 7B instruct model, the paper's model size."""

CPU_SMOKE = GPUProfile(
    name="cpu_smoke", model_name=str(REPO_ROOT / "runs" / "cpu_smoke_model"), arch=TINY_ARCH, max_params=5e6,
    lora=LoraSettings(r=8, alpha=16), max_prompt_tokens=64, max_len=96, max_new_tokens=16, rollout_batch=8,
    minibatch_size=4, ppo_iterations=6, critic_pretrain_iterations=2, policy_lr=1e-3, critic_lr=1e-3,
    temperature=1.0, top_p=1.0, rm_steps=30, rm_batch_size=16, rm_lr=2e-3,
)
"""The CPU stand-in: a tiny random Llama written by :func:`save_tiny_llama`, loaded in 4-bit on the CPU."""

PROFILES: dict[str, GPUProfile] = {p.name: p for p in (COLAB_T4, CONSUMER_24GB, CPU_SMOKE)}


def get_profile(name: str) -> GPUProfile:
    """The preset called ``name`` (ValueError listing the presets if unknown)."""
    if name not in PROFILES:
        raise ValueError(f"unknown GPU profile {name!r}; choose one of: {', '.join(PROFILES)}")
    return PROFILES[name]


# ----- loading --------------------------------------------------------------------------------------
def save_tiny_llama(folder: str | Path, cfg: TinyModelConfig = TINY, seed: int = 0,
                    tokenizer_file: str | Path = DATA_DIR / "tokenizer.json") -> Path:
    """Write a randomly initialised tiny Llama and the world tokenizer to ``folder`` with ``save_pretrained``.

    4-bit loading needs ``from_pretrained`` (shared/STACK.md), so the CPU stand-in of a hub model is a
    folder like the ones the hub serves. Returns ``folder``.
    """
    from .tokenizer import load_tokenizer

    folder = Path(folder)
    tok = load_tokenizer(tokenizer_file)
    model = build_tiny_model(len(tok), tok.pad_token_id, tok.eos_token_id, cfg, seed)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def load_tokenizer_for(name_or_path: str | Path) -> PreTrainedTokenizerBase:
    """``AutoTokenizer`` with a pad token (EOS if the model has none) and left padding, for batched prompts."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(name_or_path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def count_parameters(model: nn.Module) -> int:
    """Parameters of ``model`` as the unquantized model has them (a 4-bit weight packs two per byte)."""
    total = 0
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        total += state.shape.numel() if state is not None else p.numel()
    return total


def load_gpu_stack(profile: GPUProfile, adapters: Sequence[str] = ("policy", "critic", "reward"),
                   device: str | torch.device | None = None, seed: int = 0
                   ) -> tuple[AdapterStack, PreTrainedTokenizerBase]:
    """Load ``profile``'s model as a 4-bit base with the named LoRA adapters, and its tokenizer.

    The compute dtype comes from :func:`pick_compute_dtype` (fp32 on the CPU); gradient checkpointing is
    the non-reentrant kind. Unlike ``peft.prepare_model_for_kbit_training``, nothing is upcast to fp32: that
    would add 2 bytes per embedding and LM-head parameter (2.2 GB on a 7B Qwen). LoRA weights are fp32
    (peft's default). Raises ValueError if the model is bigger than ``profile.max_params``. ``seed`` seeds
    the adapters' initialization, so a run does not depend on what the process did before.
    """
    profile.validate()
    device = pick_device(str(device) if device is not None else None)
    tok = load_tokenizer_for(profile.model_name)
    base = load_causal_lm(profile.model_name, quantize_4bit=profile.quantize_4bit,
                          compute_dtype=pick_compute_dtype(device), device=device)
    n = count_parameters(base)
    if n > profile.max_params:
        raise ValueError(f"{profile.model_name} has {n / 1e9:.2f}B parameters, more than profile "
                         f"{profile.name!r} is sized for ({profile.max_params / 1e9:.2f}B)")
    if profile.gradient_checkpointing:
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    base.config.use_cache = False  # scoring and training passes need no KV cache; the sampler asks for one
    seed_everything(seed)
    return AdapterStack(base, list(adapters), profile.lora), tok


def resolve_optimizer(kind: str, device: torch.device | str) -> str:
    """"auto" -> "paged_adamw_8bit" on CUDA (bitsandbytes' 8-bit states), "adam" elsewhere."""
    if kind == "auto":
        return "paged_adamw_8bit" if torch.device(device).type == "cuda" else "adam"
    return kind


def make_optimizer(params: Iterable[nn.Parameter], lr: float, kind: str = "auto", device: str | torch.device = "cpu",
                   betas: tuple[float, float] = (0.9, 0.95)) -> torch.optim.Optimizer:
    """An optimizer over ``params`` without weight decay: torch Adam, or bitsandbytes' PagedAdamW8bit.

    8-bit states take 2 bytes per parameter instead of 8; paging moves them to CPU RAM under memory
    pressure instead of failing with out-of-memory.
    """
    kind = resolve_optimizer(kind, device)
    params = list(params)
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas)
    if kind == "paged_adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=lr, betas=betas, weight_decay=0.0)
    raise ValueError(f"unknown optimizer {kind!r}")


# ----- the memory estimate ----------------------------------------------------------------------------
NF4_BYTES = 0.5
"""4-bit weights: two per byte."""
DOUBLE_QUANT_BYTES = 1 / 64 + 4 / (64 * 256)
"""Quantization constants per weight with double quantization: one 8-bit absmax per block of 64 weights,
plus one fp32 constant per 256 blocks (QLoRA, Dettmers et al. 2023): 0.127 bits per weight."""
CUDA_CONTEXT_GB = 0.5
"""CUDA context and kernels, outside PyTorch's allocator."""
ALLOCATOR_SLACK = 0.10
"""Fragmentation and caching in PyTorch's CUDA allocator, as a fraction of the tensors' peak."""


def layer_activation_bytes(arch: ModelArch, dtype_bytes: int) -> float:
    """Bytes that one decoder block keeps for its backward pass, per token.

    In the compute dtype: 7 hidden-sized tensors (norm output, q, rotated q, GQA-expanded k and v, attention
    output, second norm output), 3 kv-sized (k, rotated k, v) and 4 intermediate-sized (gate, up, SiLU(gate),
    product). Where the compute dtype is 16-bit, also fp32 copies: the RMSNorm inputs (2 hidden) and the
    inputs of the 7 LoRA adapters, which peft casts to the adapters' fp32 (6 hidden + 1 intermediate).
    Attention scores are not stored (SDPA's fused kernels).
    """
    h, i, kv = arch.hidden_size, arch.intermediate_size, arch.num_kv_heads * arch.head_dim
    own = (7 * h + 3 * kv + 4 * i) * dtype_bytes
    fp32_copies = (8 * h + i) * 4 if dtype_bytes < 4 else 0
    return own + fp32_copies


def estimate_memory(profile: GPUProfile, dtype_bytes: int = 2, device_type: str = "cuda",
                    ptx_tokens: int | None = None) -> dict[str, float | str]:
    """Peak memory (GiB) of one PPO-max iteration of ``profile``, by component.

    ``dtype_bytes`` is the compute dtype's size (2: bf16/fp16 on a GPU; 4: fp32 on the CPU). The iteration
    is the trainer's: a rollout of ``rollout_batch`` prompts with the KV cache; reference log-probs, critic
    values and RM scores of the whole buffer without gradients; then minibatches where the policy loss
    (clipped surrogate + ptx on ``minibatch_size`` demonstrations of ``ptx_tokens`` tokens, default
    ``max_len``) and the critic loss each run forward and backward. Persistent memory (weights, the three
    adapters, the policy and critic gradients and optimizer states) is held throughout; the peak adds the
    largest of the three phases' transients. See docs/what_fits_where.md for the formula.
    """
    a, p = profile.arch, profile
    L, H, V = a.num_layers, a.hidden_size, a.vocab_size
    T = p.max_prompt_tokens + p.max_new_tokens  # rollout sequence length
    N = p.max_new_tokens
    T_ptx = p.max_len if ptx_tokens is None else ptx_tokens
    lora = a.lora_params(p.lora)
    opt = resolve_optimizer(p.optimizer, device_type)
    opt_bytes = 8 if opt == "adam" else 2  # two states per parameter: fp32, or 8-bit

    if p.quantize_4bit:
        linear = a.linear_params * (NF4_BYTES + DOUBLE_QUANT_BYTES)
    else:
        linear = a.linear_params * dtype_bytes
    persistent = {
        "weights_linear_4bit" if p.quantize_4bit else "weights_linear": linear,
        "weights_embedding_lm_head": (a.total_params - a.linear_params) * dtype_bytes,
        "lora_adapters_x3_fp32": 3 * lora * 4,
        "lora_grads_policy_critic": 2 * lora * 4,
        "optimizer_states": 2 * lora * opt_bytes,
        "heads": 2 * (H + 1) * 4,
    }
    # Phase 1, rollout: K and V of every layer for the whole batch, plus last-position logits.
    rollout = {"kv_cache": 2 * L * p.rollout_batch * T * a.num_kv_heads * a.head_dim * dtype_bytes
               + p.rollout_batch * V * (dtype_bytes + 8)}
    # Phase 2, scoring without gradients: the reference logits of the whole buffer dominate (lm_head output,
    # its fp32 copy, divided by the temperature); one block's activations at a time.
    scoring = {"logits_reference_pass": p.rollout_batch * N * V * (dtype_bytes + 8),
               "activations_scoring": p.rollout_batch * T * layer_activation_bytes(a, dtype_bytes)}
    # Phase 3, a policy step: one graph over the rollout minibatch and the ptx minibatch.
    tokens = p.minibatch_size * (T + T_ptx)
    per_layer = layer_activation_bytes(a, dtype_bytes)
    if p.gradient_checkpointing:  # every block's input, plus one block recomputed, plus gradient buffers
        acts = L * tokens * H * dtype_bytes + tokens * per_layer + 4 * tokens * H * dtype_bytes
    else:
        acts = L * tokens * per_layer
    # logits kept for backward in fp32, their gradient and the softmax of logsumexp's backward
    update = {"activations_update": acts,
              "logits_update": p.minibatch_size * (N + T_ptx) * V * (dtype_bytes + 12)}
    phases = {"rollout": rollout, "scoring": scoring, "update": update}
    peak_phase = max(phases, key=lambda k: sum(phases[k].values()))
    out: dict[str, float | str] = {k: v / GIB for k, v in persistent.items()}
    for comps in phases.values():
        out.update({k: v / GIB for k, v in comps.items()})
    out["persistent"] = sum(persistent.values()) / GIB
    out["peak_phase_transient"] = sum(phases[peak_phase].values()) / GIB
    total = out["persistent"] + out["peak_phase_transient"]
    if device_type == "cuda":
        out["allocator_slack"] = ALLOCATOR_SLACK * total
        out["cuda_context"] = CUDA_CONTEXT_GB * 1e9 / GIB
        total += out["allocator_slack"] + out["cuda_context"]
    out["total"] = total
    out["peak_phase"] = peak_phase
    return out


def format_estimate(est: dict[str, float | str]) -> str:
    """A readable multi-line table of :func:`estimate_memory`'s result."""
    lines = []
    for k, v in est.items():
        lines.append(f"  {k:<28} {v:>8}" if isinstance(v, str) else f"  {k:<28} {v:8.3f} GiB")
    return "\n".join(lines)


def fits(profile: GPUProfile, memory_gb: float, dtype_bytes: int = 2) -> bool:
    """True when the estimated peak of one PPO-max iteration fits a card of ``memory_gb`` (decimal GB)."""
    return estimate_memory(profile, dtype_bytes)["total"] * GIB <= memory_gb * 1e9


__all__ = [
    "COLAB_T4", "CONSUMER_24GB", "CPU_SMOKE", "GIB", "PROFILES", "GPUProfile", "ModelArch", "count_parameters",
    "estimate_memory", "fits", "format_estimate", "get_profile", "load_gpu_stack", "load_tokenizer_for",
    "make_optimizer", "resolve_optimizer", "save_tiny_llama",
]
