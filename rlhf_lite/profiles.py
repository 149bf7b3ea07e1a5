"""Profiles as data: one model, its adapters, and the settings of every stage, composed.

A :class:`Profile` is a :class:`~rlhf_lite.loading.ModelSpec` (where the model comes from, its precision and
device), the :class:`~rlhf_lite.models.LoraSettings` of every adapter, and one config per stage
(:class:`~rlhf_lite.sft.SFTConfig`, :class:`~rlhf_lite.rm.RMConfig`, :class:`~rlhf_lite.ppo.config.PPOConfig`)
with its budgets. No field is repeated between them. The profile's ``ppo`` is its *vanilla* PPO (budgets,
learning rates, sampling); every preset (``ppo_max``, the ablations) adds its tricks on top of it.

The named profiles:

* ``tiny`` (default): a 3-layer Llama trained from scratch on the world, on a CPU in minutes;
* ``smol``: SmolLM2-135M-Instruct, a real pretrained instruct model that this project fetches from PyPI,
  LoRA on a float base (bf16 or fp32) on the CPU, NF4 on CUDA;
* ``colab_t4``: Qwen2.5-1.5B-Instruct in 4-bit on a free Colab T4 (16 GB, fp16 compute);
* ``consumer_24gb``: Qwen2.5-7B-Instruct in 4-bit on a 24 GB card (RTX 3090/4090, bf16).

``with_model(profile, "path/or/hub-id")`` replaces the model of any profile (the CLI's ``--model``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from .beyond.bon import BoNConfig
from .beyond.dpo import DPOConfig
from .beyond.grpo import GRPOConfig
from .loading import ModelSpec
from .memory import QWEN25_1_5B, QWEN25_7B, SMOLLM2_135M, TINY_ARCH
from .models import LoraSettings
from .ppo.config import PPOConfig, get_preset
from .rm import RMConfig
from .settings import SettingError
from .sft import SFTConfig


@dataclass(frozen=True)
class Profile:
    """Every choice of a run: the model, the adapters, and each stage's settings and budgets."""

    name: str
    """Profile name."""
    description: str
    """What the profile is for, in one line."""
    model: ModelSpec = field(default_factory=ModelSpec)
    """The model: source, quantization, dtype, device, memory savers."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA settings of every adapter (SFT of a pretrained model, reward model, policy, critic)."""
    sft: SFTConfig = field(default_factory=SFTConfig)
    """Settings of the SFT stage."""
    rm: RMConfig = field(default_factory=RMConfig)
    """Settings of the reward-model stage."""
    ppo: PPOConfig = field(default_factory=PPOConfig)
    """The profile's vanilla PPO; presets add their tricks to it (see :meth:`ppo_config`)."""
    dpo: DPOConfig = field(default_factory=DPOConfig)
    """Settings of the DPO stage (notebook 06)."""
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    """Settings of the GRPO stage (notebook 06)."""
    bon: BoNConfig = field(default_factory=BoNConfig)
    """Settings of the best-of-n stage (notebook 06)."""

    def ppo_config(self, preset: str = "vanilla", **changes) -> PPOConfig:
        """Preset ``preset`` on this profile's PPO settings; ``changes`` override fields afterwards."""
        return replace(get_preset(preset, self.ppo), **changes)

    @property
    def context_length(self) -> int | None:
        """The model's context length where the profile knows it without loading the model (tiny only)."""
        return self.model.tiny.max_positions if self.model.is_tiny else None

    @property
    def max_prompt_tokens(self) -> int:
        """Longest model prompt of a PPO rollout: PPOConfig.max_prompt_tokens, or the tiny model's context
        minus the response budget."""
        if self.ppo.max_prompt_tokens is not None:
            return self.ppo.max_prompt_tokens
        if self.context_length is None:
            raise SettingError(f"profile {self.name!r}: PPOConfig.max_prompt_tokens must be set for a pretrained model")
        return self.context_length - self.ppo.max_new_tokens

    def validate(self) -> None:
        """Check every part before any model loads (each error names its field)."""
        self.model.validate()
        self.lora.validate()
        self.sft.validate()
        self.rm.validate()
        self.ppo.validate(self.context_length)
        for cfg in (self.dpo, self.grpo, self.bon):
            cfg.validate(self.context_length)
        if not self.model.is_tiny and self.ppo.max_prompt_tokens is None:
            raise SettingError(f"profile {self.name!r}: PPOConfig.max_prompt_tokens must be set for a pretrained "
                               "model (its context is known only once it loads)")


def with_model(profile: Profile, source: str | None) -> Profile:
    """``profile`` with its model source replaced (``None``: unchanged). A pretrained model has no LM
    pretraining phase in SFT; the tiny model's architecture is kept for ``source="tiny"`` only."""
    if source is None or source == profile.model.source:
        return profile
    sft = profile.sft if source == "tiny" or not profile.model.is_tiny else replace(profile.sft, pretrain_steps=0)
    return replace(profile, model=replace(profile.model, source=source, arch=None), sft=sft)


# ----- the named profiles -----------------------------------------------------------------------------
TINY = Profile(
    name="tiny",
    description="a 3-layer Llama trained from scratch on the world; the whole paper on a CPU in minutes",
    model=ModelSpec(source="tiny", arch=TINY_ARCH),
)

# A pretrained instruct model: SFT is a LoRA fine-tune on the demonstrations (merged into the base), the
# learning rates are those of LoRA on a pretrained model, sampling is the paper's (temperature 0.8,
# top-p 0.9). Budgets are small: one PPO iteration of a 135M model takes tens of seconds on two cores.
_PRETRAINED_SFT = SFTConfig(pretrain_steps=0, sft_steps=150, batch_size=16, lr=2e-4, warmup_steps=10,
                            weight_decay=0.0, log_every=10, eval_every=50, max_new_tokens=32, n_eval_prompts=64)
_PRETRAINED_RM = RMConfig(steps=100, batch_size=8, lr=1e-4, warmup_steps=10, lm_coef=None, eval_every=25,
                          n_eval_pairs=64, n_fresh_prompts=32, max_new_tokens=32, eval_batch_size=16)

_PRETRAINED_PPO = PPOConfig(iterations=20, rollout_batch=8, minibatch_size=4, ppo_epochs=2, max_new_tokens=128,
                            max_prompt_tokens=256, temperature=0.8, top_p=0.9, policy_lr=1e-5, critic_lr=5e-5,
                            gold_every=5, gold_early_until=0, sample_every=5, checkpoint_every=5)

# DPO, GRPO and best-of-n on a pretrained model: PPO's sampling and learning rates, short budgets.
_PRETRAINED_DPO = DPOConfig(steps=100, batch_size=8, lr=1e-5, warmup_steps=10, eval_every=25, max_new_tokens=128,
                            max_prompt_tokens=256)
_PRETRAINED_GRPO = GRPOConfig(iterations=20, prompts_per_iteration=2, group_size=4, minibatch_size=4, max_new_tokens=128,
                              max_prompt_tokens=256, temperature=0.8, top_p=0.9, lr=1e-5, gold_every=5, sample_every=5)
_PRETRAINED_BON = BoNConfig(n_max=16, ns=(1, 2, 4, 8, 16), n_test_prompts=64, max_new_tokens=128, max_prompt_tokens=256)
_SMOL_BUDGET = {"max_new_tokens": 24, "max_prompt_tokens": 96}  # the smol PPO budget

# SmolLM2 on two CPU cores, sized so that the whole pipeline takes under an hour (docs in notebook 05).
# Measured here: fp32 with merged-weight LoRA is the fast path (bf16 matrix products ran 5-14x slower on
# this CPU, NF4 through bitsandbytes ~10x slower), so "auto" keeps the base float on the CPU and NF4 on
# CUDA. The world's answers are short: 24 new tokens cover them (and leave room to pad). SFT: 100 steps of
# 16 demonstrations at 5e-4 take the model from ordinary English to the world's answers (the invented
# facts are the slowest part); RM: 100 steps of 8 pairs reach ~0.7 test accuracy; every gold measurement
# uses all 256 test prompts, as the tiny profile's does; the final RM numbers use 500 of the 2000 test pairs.
SMOL = Profile(
    name="smol",
    description="SmolLM2-135M-Instruct (fetched from PyPI), LoRA on a float base; NF4 on CUDA",
    model=ModelSpec(source="smollm2", quantization="auto", dtype="auto", system_prompt=False, max_params=2e8,
                    arch=SMOLLM2_135M),
    lora=LoraSettings(r=16, alpha=32),
    sft=replace(_PRETRAINED_SFT, sft_steps=100, lr=5e-4, eval_every=50, max_new_tokens=24, n_eval_prompts=256),
    rm=replace(_PRETRAINED_RM, lr=3e-4, eval_every=50, max_new_tokens=24, eval_batch_size=64, n_test_pairs=500),
    ppo=replace(_PRETRAINED_PPO, rollout_batch=16, minibatch_size=8, max_new_tokens=24, max_prompt_tokens=96,
                policy_lr=1e-4, critic_lr=1e-4, checkpoint_every=10),
    dpo=replace(_PRETRAINED_DPO, lr=1e-4, **_SMOL_BUDGET),
    grpo=replace(_PRETRAINED_GRPO, prompts_per_iteration=4, minibatch_size=8, lr=1e-4, **_SMOL_BUDGET),
    bon=replace(_PRETRAINED_BON, **_SMOL_BUDGET),
)

COLAB_T4 = Profile(
    name="colab_t4",
    description="Qwen2.5-1.5B-Instruct in 4-bit NF4 on a free Colab T4 (16 GB, fp16 compute)",
    model=ModelSpec(source="Qwen/Qwen2.5-1.5B-Instruct", quantization="nf4", gradient_checkpointing=True,
                    max_params=2.0e9, arch=QWEN25_1_5B),
    sft=replace(_PRETRAINED_SFT, batch_size=8, max_len=384),
    rm=replace(_PRETRAINED_RM, batch_size=4, max_len=384, eval_batch_size=8),
    ppo=_PRETRAINED_PPO,
    dpo=_PRETRAINED_DPO,
    grpo=_PRETRAINED_GRPO,
    bon=_PRETRAINED_BON,
)

CONSUMER_24GB = Profile(
    name="consumer_24gb",
    description="Qwen2.5-7B-Instruct in 4-bit NF4 on a 24 GB card (RTX 3090/4090, bf16), the paper's model size",
    model=ModelSpec(source="Qwen/Qwen2.5-7B-Instruct", quantization="nf4", gradient_checkpointing=True,
                    max_params=8.0e9, arch=QWEN25_7B),
    sft=replace(_PRETRAINED_SFT, batch_size=4, max_len=512),
    rm=replace(_PRETRAINED_RM, steps=200, batch_size=4, lr=5e-5, max_len=512, eval_batch_size=4),
    ppo=replace(_PRETRAINED_PPO, iterations=40, minibatch_size=2, max_prompt_tokens=384, policy_lr=5e-6,
                critic_lr=2e-5),
    dpo=replace(_PRETRAINED_DPO, batch_size=4, lr=5e-6, max_prompt_tokens=384),
    grpo=replace(_PRETRAINED_GRPO, minibatch_size=2, lr=5e-6, max_prompt_tokens=384),
    bon=replace(_PRETRAINED_BON, max_prompt_tokens=384),
)

PROFILES: dict[str, Profile] = {p.name: p for p in (TINY, SMOL, COLAB_T4, CONSUMER_24GB)}


def get_profile(name: str) -> Profile:
    """The named profile (ValueError listing the profiles if unknown)."""
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose one of: {', '.join(PROFILES)}")
    return PROFILES[name]


__all__ = ["COLAB_T4", "CONSUMER_24GB", "PROFILES", "SMOL", "TINY", "Profile", "get_profile", "with_model"]
