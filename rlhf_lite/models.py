"""The model layer: one base model hosting named LoRA adapters, plus the heads RLHF needs.

The paper's PPO uses four models: policy, reference, critic and reward model (docs/paper.md Sec. 1-2). On
one GPU we keep **one** base model and give the policy, critic and reward model each a LoRA adapter on it
(peft); the critic and reward model also get a small linear head on the last hidden state. The reference
model is the base itself with every adapter disabled, which is exactly the SFT model as long as the base
*is* the SFT model: the SFT stage makes sure of that (the tiny model is fine-tuned in full; a pretrained
model's SFT adapter is merged into it). Every profile uses this arrangement; only how the base is loaded
differs (:mod:`rlhf_lite.loading`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

from .batching import BUCKET_OVERHEAD, length_buckets
from .lora import MergedLoraLinear, adapter_view

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
HEAD_WEIGHTS = "head.safetensors"


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

    def validate(self) -> None:
        """Fail before the model is built, naming the field."""
        from .settings import positive, require

        positive(self, "hidden_size", "num_layers", "num_heads", "intermediate_size")
        require(self, self.hidden_size % self.num_heads == 0 and self.hidden_size // self.num_heads % 2 == 0,
                "hidden_size", f"must be an even multiple of num_heads ({self.num_heads}): rotary embeddings need an "
                "even head width")
        require(self, self.max_positions >= 8, "max_positions", "must be >= 8 (a prompt and a response)")


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

    def validate(self) -> None:
        """Fail before any model loads, naming the field."""
        from .settings import check_common, positive, require

        check_common(self)
        positive(self, "r", "alpha")
        require(self, 0 <= self.dropout < 1, "dropout", "must lie in [0, 1)")
        require(self, len(self.target_modules) > 0, "target_modules", "must name at least one layer")


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


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore padding: (B, T) mask -> (B, T) ids, so left padding changes nothing."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class AdapterStack(nn.Module):
    """One base causal LM hosting named LoRA adapters and scalar heads (docs/paper.md Sec. 1-2).

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
        """LoRA weights of ``name`` in peft's file layout (keys without the adapter name), on the CPU."""
        from peft.utils import get_peft_model_state_dict

        state = get_peft_model_state_dict(self.peft, adapter_name=name)
        return {k: v.detach().cpu().clone() for k, v in state.items()}

    def head_state(self, name: str) -> dict[str, torch.Tensor]:
        """The scalar head of ``name`` ({} for the policy, which has none), on the CPU."""
        if name not in self.heads:
            return {}
        return {k: v.detach().cpu().clone() for k, v in self.heads[name].state_dict().items()}

    def load_adapter_state(self, name: str, state: dict[str, torch.Tensor], head: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`adapter_state` and :meth:`head_state`; a state saved under another name loads too."""
        from peft.utils import set_peft_model_state_dict

        if not state:
            raise ValueError(f"no LoRA weights in the state for adapter {name!r}")
        result = set_peft_model_state_dict(self.peft, state, adapter_name=name)
        unexpected = [k for k in result.unexpected_keys if "lora_" in k]
        if unexpected:
            raise ValueError(f"adapter weights {unexpected[:3]} do not fit this model: saved from another model?")
        self._lora_trainable()
        if name in self.heads:
            h = self.heads[name]
            with torch.no_grad():
                h.weight.copy_(head["weight"])
                if h.bias is not None:
                    h.bias.copy_(head.get("bias", torch.zeros_like(h.bias)))

    def copy_adapter(self, src: str, dst: str) -> None:
        """Initialise adapter ``dst`` from ``src`` (PPO-max #4: the critic starts as the reward model)."""
        self.load_adapter_state(dst, self.adapter_state(src), self.head_state(src))

    def save_adapter(self, name: str, folder: str | Path) -> Path:
        """Write adapter ``name`` to ``folder`` in peft's format, so that ``PeftModel.from_pretrained(base,
        folder)`` loads it: ``adapter_config.json`` and ``adapter_model.safetensors``, plus ``head.safetensors``
        for a critic or reward head. Returns ``folder``."""
        from safetensors.torch import save_file

        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        config = copy.deepcopy(self.peft.peft_config[name])
        config.inference_mode = True
        config.save_pretrained(str(out))
        save_file(self.adapter_state(name), str(out / ADAPTER_WEIGHTS))
        if name in self.heads:
            save_file(self.head_state(name), str(out / HEAD_WEIGHTS))
        return out

    def load_adapter(self, name: str, folder: str | Path) -> None:
        """Load an adapter folder written by :meth:`save_adapter` into slot ``name``; its LoRA settings must
        equal this stack's."""
        from safetensors.torch import load_file

        folder = Path(folder)
        saved = read_lora_settings(folder)
        if saved != self.lora:
            raise ValueError(f"adapter in {folder} was trained with {saved}, but this stack uses {self.lora}")
        from .stage import check_adapter_files

        check_adapter_files(folder)  # a corrupt weight file fails naming itself
        if name in self.heads and not (folder / HEAD_WEIGHTS).is_file():
            raise FileNotFoundError(f"{folder / HEAD_WEIGHTS} is missing: the {name} adapter needs its head")
        head = load_file(str(folder / HEAD_WEIGHTS)) if name in self.heads else {}
        self.load_adapter_state(name, load_file(str(folder / ADAPTER_WEIGHTS)), head)


def read_lora_settings(folder: str | Path) -> LoraSettings:
    """The :class:`LoraSettings` of an adapter folder (its ``adapter_config.json``); FileNotFoundError naming
    the folder when it holds no adapter."""
    folder = Path(folder)
    path = folder / ADAPTER_CONFIG
    if not path.is_file() or not (folder / ADAPTER_WEIGHTS).is_file():
        raise FileNotFoundError(f"{folder} holds no adapter ({ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} expected)")
    try:
        cfg = json.loads(path.read_text())
        targets = set(cfg["target_modules"])
        r, alpha, dropout = cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"]
    except (ValueError, KeyError, TypeError) as e:  # not JSON, or not a LoRA adapter's config
        raise ValueError(f"{path} is not a valid LoRA adapter config ({type(e).__name__}: {e})") from e
    known = LoraSettings().target_modules  # peft stores targets as a set: restore our order
    order = tuple(m for m in known if m in targets) + tuple(sorted(targets - set(known)))
    return LoraSettings(r=r, alpha=alpha, dropout=dropout, target_modules=order)
