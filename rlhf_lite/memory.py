"""What fits where: the shape of a model and the peak memory of one PPO-max iteration, estimated offline.

The paper trains 7B LLaMA models on 8 x A100-80G (docs/paper.md Sec. 6); this project fits the whole PPO
set-up on one card with a 4-bit base and three LoRA adapters. :func:`estimate_memory` predicts the peak
memory of one PPO-max iteration of a profile, component by component, from the model's shape
(:class:`ModelArch`, stored with each profile so no download is needed); ``bench/memory.py`` checks it
against a measurement and ``docs/what_fits_where.md`` explains the formula.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .models import LoraSettings, TinyModelConfig

if TYPE_CHECKING:
    from .profiles import Profile

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
SMOLLM2_135M = ModelArch(hidden_size=576, num_layers=30, intermediate_size=1536, num_heads=9, num_kv_heads=3,
                         vocab_size=49152, tie_embeddings=True)
_TINY = TinyModelConfig()
TINY_VOCAB = 244  # the world tokenizer's vocabulary (data/tokenizer.json)
TINY_ARCH = ModelArch(hidden_size=_TINY.hidden_size, num_layers=_TINY.num_layers,
                      intermediate_size=_TINY.intermediate_size, num_heads=_TINY.num_heads,
                      num_kv_heads=_TINY.num_heads, vocab_size=TINY_VOCAB, tie_embeddings=True)


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


def estimate_memory(profile: Profile, dtype_bytes: int = 2, device_type: str = "cuda",
                    ptx_tokens: int | None = None) -> dict[str, float | str]:
    """Peak memory (GiB) of one PPO-max iteration of ``profile``, by component.

    ``dtype_bytes`` is the compute dtype's size (2: bf16/fp16 on a GPU; 4: fp32 on the CPU). The iteration
    is the trainer's: a rollout of ``rollout_batch`` prompts with the KV cache; reference log-probs, critic
    values and RM scores of the whole buffer without gradients; then minibatches where the policy loss
    (clipped surrogate + ptx on ``minibatch_size`` demonstrations of ``ptx_tokens`` tokens, default the
    rollout length ``max_prompt_tokens + max_new_tokens``) and the critic loss each run forward and backward. Persistent memory (weights, the three
    adapters, the policy and critic gradients and optimizer states) is held throughout; the peak adds the
    largest of the three phases' transients. See docs/what_fits_where.md for the formula.
    """
    from .loading import resolve_optimizer, resolve_quantization

    a, spec, p = profile.model.arch, profile.model, profile.ppo
    if a is None:
        raise ValueError(f"profile {profile.name!r} stores no model shape (ModelSpec.arch): nothing to estimate")
    L, H, V = a.num_layers, a.hidden_size, a.vocab_size
    N = p.max_new_tokens
    T = profile.max_prompt_tokens + N  # rollout sequence length
    T_ptx = T if ptx_tokens is None else ptx_tokens
    lora = a.lora_params(profile.lora)
    opt = resolve_optimizer(spec.optimizer, device_type)
    opt_bytes = 8 if opt == "adam" else 2  # two states per parameter: fp32, or 8-bit
    quantized = resolve_quantization(spec, device_type) == "nf4"

    if quantized:
        linear = a.linear_params * (NF4_BYTES + DOUBLE_QUANT_BYTES)
    else:
        linear = a.linear_params * dtype_bytes
    persistent = {
        "weights_linear_4bit" if quantized else "weights_linear": linear,
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
    if spec.gradient_checkpointing:  # every block's input, plus one block recomputed, plus gradient buffers
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


def fits(profile: Profile, memory_gb: float, dtype_bytes: int = 2) -> bool:
    """True when the estimated peak of one PPO-max iteration fits a card of ``memory_gb`` (decimal GB)."""
    return estimate_memory(profile, dtype_bytes)["total"] * GIB <= memory_gb * 1e9


__all__ = ["GIB", "QWEN25_1_5B", "QWEN25_7B", "SMOLLM2_135M", "TINY_ARCH", "ModelArch", "estimate_memory", "fits",
           "format_estimate", "layer_activation_bytes"]
