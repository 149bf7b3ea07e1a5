"""The model layer: one base model hosting named LoRA adapters, plus the heads RLHF needs.

Paper Sec. 2 (PAPER.md Sec. 1-2) uses four models: policy, reference, critic and reward model. On one
GPU we keep **one** base model and give the policy, critic and reward model each a LoRA adapter on it
(peft); the critic and reward model also get a small linear head on the last hidden state. The
reference model is the base itself with every adapter disabled, which is exactly the SFT model as long
as the base *is* the SFT model. This is the arrangement both profiles use:

* ``tiny``: a few-layer ``LlamaForCausalLM`` built from a config and trained from scratch (SFT is a
  full-parameter fine-tune, then the SFT weights become the base);
* ``gpu``: a Hugging Face model loaded with ``from_pretrained``, optionally in 4-bit NF4.
"""

from __future__ import annotations

import contextlib
import copy
import json
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from .batching import BUCKET_OVERHEAD, length_buckets
from .utils import quiet_hf_progress

ADAPTER_FILE = "adapter.pt"
ADAPTER_META = "adapter.json"


@dataclass(frozen=True)
class TinyModelConfig:
    """Architecture of the tiny profile's from-scratch decoder (a small Llama)."""

    hidden_size: int = 128
    """Width of the residual stream."""
    num_layers: int = 3
    """Number of decoder blocks."""
    num_heads: int = 4
    """Attention heads (no grouped-query attention at this size)."""
    intermediate_size: int = 384
    """Width of the SwiGLU feed-forward layer."""
    max_positions: int = 128
    """Context length: prompt plus response must fit."""


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyper-parameters shared by the policy, critic and reward adapters."""

    r: int = 16
    """Rank of each low-rank update."""
    alpha: int = 32
    """Scaling numerator: the update is ``alpha / r * B @ A``."""
    dropout: float = 0.0
    """Dropout on the adapter input (0 keeps rollouts and updates deterministic)."""
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    """Names of the linear layers that get adapters."""


def build_tiny_model(vocab_size: int, pad_id: int, eos_id: int, cfg: TinyModelConfig, seed: int) -> LlamaForCausalLM:
    """A randomly initialised small Llama, built offline from a config (no download)."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_positions,
        tie_word_embeddings=True,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        bos_token_id=eos_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def guard_bnb_repack(model: nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights into its CPU inference layout.

    On CPUs with AVX512-BF16, an eval-mode ``Linear4bit`` forward under ``no_grad`` permanently repacks
    its weight; later backward passes then run through a kernel without autograd and LoRA gradients
    silently become ``None`` (see shared/STACK.md). Returns the number of layers guarded.
    """
    count = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def pick_compute_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 where the GPU supports it, fp16 on older GPUs such as a T4, fp32 on the CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.float32
    # A T4 only emulates bf16 (slowly); count native support only, so it gets fp16.
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def load_causal_lm(
    name_or_path: str | Path,
    quantize_4bit: bool = False,
    compute_dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> PreTrainedModel:
    """Load a causal LM by hub name or local folder, optionally as a 4-bit NF4 base.

    The 4-bit path works on the CPU too (tested with a tiny model saved to a folder); the repack
    guard is applied after loading.
    """
    device = torch.device(device)
    compute_dtype = compute_dtype or pick_compute_dtype(device)
    kwargs: dict = {"dtype": compute_dtype}
    if quantize_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else "cpu"
    quiet_hf_progress()
    model = AutoModelForCausalLM.from_pretrained(str(name_or_path), **kwargs)
    if not quantize_4bit:
        model.to(device)
    guard_bnb_repack(model)
    return model


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore padding: (B, T) mask -> (B, T) ids, so left padding changes nothing."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def merge_lora(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """``W + scale * B A`` in W's dtype: W (out, in), A (r, in), B (out, r). The one formula of every merged
    pass, so that sampling (no grad) and training passes round alike."""
    return torch.addmm(weight, lora_b.to(weight.dtype), lora_a.to(weight.dtype), alpha=scale)


class _MergedLoraFn(torch.autograd.Function):
    """``y = x (W + s B A)^T`` with the backward of a LoRA layer, not of a full weight (LoRA, Hu et al. 2021).

    Autograd through the merged weight would form dL/dW (one more matmul as large as the forward's) and
    only then reduce it to A and B. Here dA and dB come from rank-r products, as in a separate adapter
    branch: the backward costs one full matmul (dL/dx) plus four thin ones.
    Shapes: x (..., in), W (out, in), A (r, in), B (out, r).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                scale: float) -> torch.Tensor:
        merged = merge_lora(weight, lora_a, lora_b, scale)
        ctx.save_for_backward(x, merged, lora_a, lora_b)
        ctx.scale = scale
        return F.linear(x, merged)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, merged, lora_a, lora_b = ctx.saved_tensors
        grad_x = grad_out @ merged if ctx.needs_input_grad[0] else None
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        g2 = grad_out.reshape(-1, grad_out.shape[-1])  # (N, out)
        a, b = lora_a.to(x.dtype), lora_b.to(x.dtype)
        grad_b = (g2.t() @ (x2 @ a.t())).mul_(ctx.scale)  # (out, N) (N, r) -> (out, r)
        grad_a = ((g2 @ b).t() @ x2).mul_(ctx.scale)  # (r, N) (N, in) -> (r, in)
        return grad_x, None, grad_a.to(lora_a.dtype), grad_b.to(lora_b.dtype), None


class MergedLoraLinear(nn.Module):
    """One adapter of a peft LoRA layer as a single linear map with weight ``W + s B A``.

    Holds references (not copies) to the base layer and the adapter's A and B, so optimizer steps and
    loaded states are seen at once. ``freeze``/``unfreeze`` hold a precomputed merged weight for a run
    of no-grad calls (the sampler's one call per token); otherwise every call merges afresh.
    """

    def __init__(self, layer: nn.Module, name: str) -> None:
        super().__init__()
        # A tuple, not attributes: submodules here would repeat the base's parameters in the view.
        self._parts = (layer.get_base_layer(), layer.lora_A[name], layer.lora_B[name])
        self.scale = float(layer.scaling[name])
        self._frozen: torch.Tensor | None = None
        self._holds = 0

    def merged_weight(self) -> torch.Tensor:
        """``W + s B A`` (out, in), in the base weight's dtype; differentiable in A and B."""
        base, a, b = self._parts
        return merge_lora(base.weight, a.weight, b.weight, self.scale)

    def freeze(self) -> None:
        if self._holds == 0:
            with torch.no_grad():
                self._frozen = self.merged_weight()
        self._holds += 1

    def unfreeze(self) -> None:
        self._holds -= 1
        if self._holds == 0:
            self._frozen = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base, a, b = self._parts
        if self._frozen is not None and not torch.is_grad_enabled():
            y = F.linear(x, self._frozen)
        elif torch.is_grad_enabled() and (a.weight.requires_grad or b.weight.requires_grad):
            y = _MergedLoraFn.apply(x, base.weight, a.weight, b.weight, self.scale)
        else:
            y = F.linear(x, self.merged_weight())
        return y if base.bias is None else y + base.bias


def adapter_view(model: nn.Module, name: str | None) -> nn.Module:
    """A copy of ``model`` (a peft-injected causal LM) that computes as adapter ``name`` with merged weights.

    Only the modules on the way to a LoRA layer are copied (shallowly: they share their parameter and
    buffer dicts with the original); every LoRA layer becomes a :class:`MergedLoraLinear` of adapter
    ``name``, or its plain base layer for ``name=None`` (the reference model). Nothing is copied that
    holds weights, so the view costs no memory and sees every update of the base and the adapters.
    """
    from peft.tuners.lora import LoraLayer

    if isinstance(model, LoraLayer):
        return model.get_base_layer() if name is None else MergedLoraLinear(model, name)
    if not any(isinstance(m, LoraLayer) for m in model.modules()):
        return model  # shared as it is
    view = copy.copy(model)
    view._modules = {key: None if child is None else adapter_view(child, name)
                     for key, child in model._modules.items()}
    return view


@dataclass
class StackSpec:
    """What an :class:`AdapterStack` holds, saved next to its adapters."""

    adapters: list[str]
    lora: LoraSettings
    heads: dict[str, bool] = field(default_factory=dict)  # head name -> has bias


class AdapterStack(nn.Module):
    """One base causal LM hosting named LoRA adapters and scalar heads (PAPER.md Sec. 1-2).

    * ``logits(name, ...)`` runs the LM with adapter ``name`` (``None``: adapters disabled, i.e. the
      reference model);
    * ``values(name, ...)`` runs adapter ``name`` and applies head ``name`` at every position.

    Only one adapter is active per forward pass, so the policy and critic need separate passes.
    """

    HEAD_BIAS: ClassVar[dict[str, bool]] = {"reward": False, "critic": True}  # the paper's RM head has no bias

    def __init__(self, base: PreTrainedModel, adapters: Sequence[str], lora: LoraSettings) -> None:
        super().__init__()
        from peft import LoraConfig, get_peft_model

        if not adapters:
            raise ValueError("AdapterStack needs at least one adapter name")
        for p in base.parameters():
            p.requires_grad_(False)
        self.lora = lora
        self.adapter_names = list(adapters)
        self.bucket_overhead: int | None = BUCKET_OVERHEAD
        """Length buckets of forward passes cut at the least cost with this fixed cost per pass (see
        :func:`length_buckets`); None: buckets of ``bucket_rows`` rows."""
        self.bucket_rows: int | None = None
        """The most rows in one length bucket; None: no limit (with ``bucket_overhead`` None: one bucket)."""
        self.merge_adapters = True
        """Run adapter passes on merged weights ``W + s B A`` where the base allows it (see :meth:`causal_lm`)."""
        lcfg = LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules), bias="none",
        )
        with warnings.catch_warnings():  # peft 0.21 calls a transformers 5 property deprecated in favour of another
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            self.peft = get_peft_model(base, lcfg, adapter_name=self.adapter_names[0])
        for name in self.adapter_names[1:]:
            self.peft.add_adapter(name, lcfg)
        hidden = base.config.hidden_size
        self.heads = nn.ModuleDict({
            name: nn.Linear(hidden, 1, bias=self.HEAD_BIAS[name])
            for name in self.adapter_names if name in self.HEAD_BIAS
        })
        for head in self.heads.values():
            nn.init.zeros_(head.weight)  # a fresh head scores everything 0: no arbitrary initial signal
            if head.bias is not None:
                nn.init.zeros_(head.bias)
        # peft toggles requires_grad with set_adapter; we decide trainability ourselves.
        for n, p in self.peft.named_parameters():
            p.requires_grad_("lora_" in n)
        self.heads.to(next(base.parameters()).device)
        from peft.tuners.lora import LoraLayer

        self._lora_layers = [m for m in self.base_model.modules() if isinstance(m, LoraLayer)]
        self._views: dict[str | None, PreTrainedModel] = {}  # merged-weight models, see causal_lm
        self._view_layers: dict[str | None, list[MergedLoraLinear]] = {}
        self._lora_params = [p for n, p in self.peft.named_parameters() if "lora_" in n]

    # ----- plumbing -------------------------------------------------------------------------------
    @property
    def base_model(self) -> PreTrainedModel:
        """The wrapped causal LM (with LoRA layers injected)."""
        return self.peft.base_model.model

    @property
    def device(self) -> torch.device:
        return next(self.heads.parameters()).device if len(self.heads) else self.base_model.device

    def activate(self, name: str | None) -> contextlib.AbstractContextManager:
        """Context in which adapter ``name`` is active (``None``: all adapters disabled)."""
        if name is None:
            return self._adapters_off()
        if name not in self.adapter_names:
            raise KeyError(f"unknown adapter {name!r}; this stack has {self.adapter_names}")
        self.peft.set_adapter(name)
        self._lora_trainable()
        return contextlib.nullcontext()

    def _lora_trainable(self) -> None:
        # peft's set_adapter (also run when disable_adapter ends) switches requires_grad off on the
        # other adapters, and autograd then drops their gradients: we decide trainability ourselves.
        for p in self._lora_params:
            p.requires_grad_(True)

    @contextlib.contextmanager
    def _adapters_off(self) -> Iterator[None]:
        """peft's ``disable_adapter``, leaving every adapter trainable afterwards (see ``_lora_trainable``)."""
        try:
            with self.peft.disable_adapter():
                yield
        finally:
            self._lora_trainable()

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """The trainable parameters belonging to adapter ``name`` (its LoRA matrices and head)."""
        params = [p for n, p in self.peft.named_parameters() if "lora_" in n and n.endswith(f".{name}.weight")]
        if name in self.heads:
            params += list(self.heads[name].parameters())
        return params

    def mergeable(self) -> bool:
        """Whether adapters can run as merged weights ``W + s B A`` (see :meth:`causal_lm`): float base
        weights (not 4-bit ones) and no LoRA dropout (which only a separate adapter branch can apply)."""
        return self.merge_adapters and self.lora.dropout == 0 and all(
            layer.get_base_layer().weight.dtype.is_floating_point for layer in self._lora_layers)

    def _view(self, name: str | None) -> PreTrainedModel:
        """The merged-weight model of adapter ``name`` (``None``: the plain base), built on first use."""
        if name is not None and name not in self.adapter_names:
            raise KeyError(f"unknown adapter {name!r}; this stack has {self.adapter_names}")
        if name not in self._views:
            view = adapter_view(self.base_model, name)
            view.train(self.training)
            self._views[name] = view
            self._view_layers[name] = [m for m in view.modules() if isinstance(m, MergedLoraLinear)]
        return self._views[name]

    @contextlib.contextmanager
    def causal_lm(self, name: str | None) -> Iterator[PreTrainedModel]:
        """Context giving the causal LM that computes as adapter ``name`` (``None``: the reference model).

        On a float base this is a merged-weight view (:func:`adapter_view`): the same modules and weight
        tensors as the base, with each LoRA layer computing ``x (W + s B A)^T`` as one matmul instead of
        peft's ``W x + s B (A x)`` (four extra ops on activations, which on a small model cost more than
        the base matmul itself). It changes no shared state, so passes of different adapters may run in
        different threads at once. In a no-grad context the merged weights are computed once on entry
        and dropped on exit (sampling calls the model once per token); with gradients on they are
        recomputed in every pass and gradients reach A and B. The base tensors are never modified, so the
        reference model stays bit-exact. A 4-bit base cannot hold merged weights: there this activates
        peft's adapter (or disables all adapters) on ``base_model`` and yields it.
        """
        if not self.mergeable():
            with self.activate(name):
                yield self.base_model
            return
        view = self._view(name)
        frozen = [] if torch.is_grad_enabled() else self._view_layers[name]
        for m in frozen:
            m.freeze()
        try:
            yield view
        finally:
            for m in frozen:
                m.unfreeze()

    def train(self, mode: bool = True) -> AdapterStack:
        super().train(mode)
        for view in self._views.values():  # not submodules (they would repeat the base's parameters)
            view.train(mode)
        return self

    # ----- forward passes -------------------------------------------------------------------------
    def hidden(self, name: str | None, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last hidden states (B, T, H) with adapter ``name`` active (``None``: adapters disabled).

        The adapter runs as :meth:`causal_lm` gives it (merged weights on a float base). Rows run in
        length buckets (:func:`length_buckets`); padded positions of the result are 0.
        """
        B, T = input_ids.shape
        buckets = length_buckets(attention_mask, self.bucket_rows, self.bucket_overhead)
        with self.causal_lm(name) as lm:
            def run(rows: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
                ids, att = input_ids[rows, lo:hi], attention_mask[rows, lo:hi]
                return lm.model(input_ids=ids, attention_mask=att, position_ids=position_ids_from_mask(att)
                                ).last_hidden_state

            if len(buckets) == 1 and buckets[0][1:] == (0, T):
                return run(*buckets[0])
            out: torch.Tensor | None = None
            for rows, lo, hi in buckets:
                h = run(rows, lo, hi)
                if out is None:  # padded positions stay 0: every consumer masks them
                    out = h.new_zeros(B, T, h.shape[-1])
                out[rows, lo:hi] = h
        return out

    def logits(self, name: str | None, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """LM logits (B, T, V) with adapter ``name`` (``None`` gives the reference model)."""
        hidden = self.hidden(name, input_ids, attention_mask)
        return self.base_model.lm_head(hidden).float()

    def values(self, name: str, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Head ``name`` applied at every position: (B, T). The critic's V_t; the RM reads one t."""
        hidden = self.hidden(name, input_ids, attention_mask)
        head = self.heads[name]
        return head(hidden.to(head.weight.dtype)).squeeze(-1).float()

    def values_and_logits(
        self, name: str, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Head values (B, T) and LM logits (B, T, V) from one pass (the RM's optional LM term)."""
        hidden = self.hidden(name, input_ids, attention_mask)
        head = self.heads[name]
        return head(hidden.to(head.weight.dtype)).squeeze(-1).float(), self.base_model.lm_head(hidden).float()

    # ----- adapter surgery and persistence --------------------------------------------------------
    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        """LoRA weights of ``name`` (keys without the adapter name) plus its head, on the CPU."""
        suffix = f".{name}.weight"
        state = {
            "lora." + n[: -len(suffix)]: p.detach().cpu().clone()
            for n, p in self.peft.named_parameters() if "lora_" in n and n.endswith(suffix)
        }
        if name in self.heads:
            for k, v in self.heads[name].state_dict().items():
                state["head." + k] = v.detach().cpu().clone()
        return state

    def load_adapter_state(self, name: str, state: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`adapter_state`; a state saved under another adapter name loads too."""
        params = dict(self.peft.named_parameters())
        lora_keys = [k for k in state if k.startswith("lora.")]
        if not lora_keys:
            raise ValueError(f"no LoRA weights in the state for adapter {name!r}")
        with torch.no_grad():
            for key in lora_keys:
                target = f"{key[len('lora.'):]}.{name}.weight"
                if target not in params:
                    raise KeyError(f"adapter weight {target} not found: was it saved from another model?")
                params[target].copy_(state[key].to(params[target].dtype))
            if name in self.heads:
                head = self.heads[name]
                head.weight.copy_(state["head.weight"])
                if head.bias is not None:
                    head.bias.copy_(state.get("head.bias", torch.zeros_like(head.bias)))

    def copy_adapter(self, src: str, dst: str) -> None:
        """Initialise adapter ``dst`` from ``src`` (PPO-max: the critic starts as the reward model)."""
        self.load_adapter_state(dst, self.adapter_state(src))

    def save_adapter(self, name: str, out_dir: str | Path) -> None:
        """Write adapter ``name`` with its head: ``adapter.pt`` and ``adapter.json``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        torch.save(self.adapter_state(name), out / ADAPTER_FILE)
        meta = {"name": name, "lora": asdict(self.lora), "head_bias": self.HEAD_BIAS.get(name)}
        (out / ADAPTER_META).write_text(json.dumps(meta, indent=2) + "\n")

    def load_adapter(self, name: str, in_dir: str | Path) -> None:
        """Load an adapter written by :meth:`save_adapter` into slot ``name``."""
        path = Path(in_dir) / ADAPTER_FILE
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: expected an adapter folder written by rlhf_lite")
        meta = json.loads((Path(in_dir) / ADAPTER_META).read_text())
        saved = LoraSettings(**{**meta["lora"], "target_modules": tuple(meta["lora"]["target_modules"])})
        if saved != self.lora:
            raise ValueError(f"adapter in {in_dir} was trained with {saved}, but this stack uses {self.lora}")
        self.load_adapter_state(name, torch.load(path, map_location="cpu", weights_only=True))


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Temporarily put ``module`` in eval mode (dropout off), restoring its mode afterwards."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)
