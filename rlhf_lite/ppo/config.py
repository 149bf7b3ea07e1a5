"""PPO settings: one dataclass, and the presets as data (docs/paper.md Sec. 2-3).

Every trick of the paper is one field. An optional trick with a value is ``float | None`` (None: off);
a choice between variants is a ``Literal`` string. A preset is a named set of changes to a base config (a
profile's vanilla PPO, :data:`VANILLA` for the tiny profile); presets differ from their parent only in the
fields they list, which a test checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from ..settings import check_common, fits_data, positive, require, to_dict, warn_setting


@dataclass(frozen=True)
class CollapseBands:
    """The paper's warning signs (paper Sec. 5.2, Fig. 4; docs/paper.md Sec. 4): a run has collapsed when a
    monitor leaves its band.

    Bands are relative to the first ``baseline_iterations`` iterations (the SFT policy's behaviour).
    """

    baseline_iterations: int = 3
    """Iterations averaged to fix the baseline of length and perplexity."""
    length_ratio: float = 1.6
    """Flag when mean response length exceeds this multiple of its baseline."""
    kl_max: float = 0.5
    """Flag when KL(policy || reference) per response token exceeds this many nats."""
    ref_perplexity_ratio: float = 3.0
    """Flag when the reference model's perplexity of the responses exceeds this multiple of its baseline."""
    gold_drop: float = 0.25
    """Flag when the gold score has fallen this far below its peak while the RM reward has risen
    at least ``reward_rise`` above its value at that peak."""
    reward_rise: float = 0.25
    """See ``gold_drop``."""
    patience: int = 2
    """Consecutive iterations outside a band before the flag is raised."""

    def validate(self, iterations: int | None = None) -> None:
        """Refuse bands that switch the detector off or make it fire on healthy runs (naming the field); warn
        when a run of ``iterations`` is too short for it to fire."""
        require(self, self.baseline_iterations >= 1, "baseline_iterations", "must be >= 1 (the bands are relative "
                "to the first iterations)")
        require(self, self.patience >= 1, "patience", "must be >= 1")
        for name in ("length_ratio", "ref_perplexity_ratio"):
            require(self, getattr(self, name) > 1, name, "must be > 1 (a multiple of the baseline)")
        positive(self, "kl_max", "gold_drop")
        require(self, self.reward_rise >= 0, "reward_rise", "must be >= 0")
        if iterations is not None:
            first = max(self.baseline_iterations + 1, self.patience)
            warn_setting(self, iterations < first, "baseline_iterations", f"with patience {self.patience} lets the "
                         f"collapse detector fire from iteration {first} on, after this run's {iterations}")


@dataclass(frozen=True)
class PPOConfig:
    """Settings of one PPO run. Defaults are the tiny profile's vanilla PPO."""

    # --- budget and sampling (Sec. 2) ---
    iterations: int = 60
    """PPO iterations (rollout, then updates)."""
    rollout_batch: int = 64
    """Prompts sampled per iteration: the experience buffer (PPO-max #7: keep it small)."""
    minibatch_size: int = 32
    """Rollouts per gradient step; must divide rollout_batch."""
    ppo_epochs: int = 2
    """Passes over each buffer."""
    max_new_tokens: int = 24
    """Response budget (the length cap of the collapse plots)."""
    max_prompt_tokens: int | None = None
    """Prompts whose model text is longer lose their earliest exchanges (whole turns); None: the model's
    context length minus max_new_tokens."""
    temperature: float = 1.0
    """Sampling temperature of rollouts (log-probs use the same temperature)."""
    top_p: float = 1.0
    """Nucleus sampling of rollouts (1.0: off)."""
    # --- optimization ---
    policy_lr: float = 1e-3
    """Adam learning rate of the policy adapter."""
    critic_lr: float = 1e-3
    """Adam learning rate of the critic adapter and value head."""
    adam_betas: tuple[float, float] = (0.9, 0.95)
    """Adam betas (as in the paper's scripts)."""
    # --- PPO core (Sec. 3, PPO-max #9) ---
    gamma: float = 1.0
    """Discount of GAE."""
    lam: float = 0.95
    """lambda of GAE."""
    clip_eps: float = 0.2
    """Clip range of the surrogate objective."""
    # --- score reparameterization (Sec. 5.3.1, Fig. 6) ---
    reward_norm: Literal["none", "normalize", "scale"] = "none"
    """PPO-max #2: "normalize": (r - running mean) / running std over all scores seen; "scale": r / running
    std only (the variant that collapses first in Fig. 6); "none": the raw RM score."""
    reward_clip: float | None = None
    """Clip the (normalized or scaled) RM score to +-d (PPO-max #2 uses d = 0.8); None: no clipping."""
    adv_norm_clip: float | None = None
    """Whiten advantages per buffer, then clip to +-d (Fig. 6's advantage normalization)."""
    # --- policy constraints (Sec. 5.3.2, Fig. 7) ---
    kl_coef: float | None = None
    """PPO-max #1: eta of the token-level KL penalty -eta * (log pi - log pi_ref) in the reward."""
    entropy_coef: float | None = None
    """Entropy bonus in the paper's form: loss += coef * |mean entropy - entropy_target|."""
    entropy_target: float = 1.0
    """Target entropy (nats per token) of the entropy bonus."""
    old_policy: Literal["rollout", "reference"] = "rollout"
    """"rollout": the usual PPO ratio; "reference": the "importance sampling" variant, where the
    ratio's old policy is the reference model."""
    # --- value function and gradients (Sec. 5.3, 5.4) ---
    value_clip: float | None = None
    """PPO-max #3: clip the new values to old +- c in the value loss."""
    max_grad_norm: float | None = None
    """PPO-max #6: one global gradient-norm clip over the policy and critic parameters."""
    ptx_coef: float | None = None
    """PPO-max #8: lambda of the pretraining (LM) loss on SFT demonstrations added to the policy loss."""
    # --- initialization (Sec. 5.3.3, Fig. 8) ---
    critic_init: Literal["sft", "rm"] = "sft"
    """"sft": critic adapter and head start fresh on the SFT base; "rm": PPO-max #4, the critic
    starts as the reward model."""
    critic_pretrain_iterations: int = 0
    """PPO-max #5: iterations at the start in which only the critic trains (not in the paper's code)."""
    policy_init: Literal["sft", "pretrained"] = "sft"
    """"sft" or "pretrained": the base (policy and reference) is the LM-pretrained model before SFT."""
    # --- monitoring ---
    gold_every: int = 10
    """Iterations between gold-score measurements on the test prompts (the common measurement)."""
    gold_every_early: int = 2
    """Iterations between gold measurements up to ``gold_early_until``: early in a run, where vanilla PPO's
    gold score peaks and turns (Fig. 4), it is measured more often."""
    gold_early_until: int = 20
    """Last iteration of the denser early gold schedule (0: none, only ``gold_every``)."""
    sample_every: int = 10
    """Iterations between sample tables in the log."""
    checkpoint_every: int = 20
    """Iterations between checkpoints (0: only at the end)."""
    max_nonfinite: int = 3
    """Consecutive iterations with a skipped (non-finite) update after which the run saves a checkpoint
    and stops with NonFiniteError."""
    collapse: CollapseBands = field(default_factory=CollapseBands)
    """Bands of the pattern-collapse detector."""
    seed: int = 0
    """Seed of prompt order and sampling."""

    def validate(self, context_length: int | None = None, rows: dict[str, int] | None = None) -> None:
        """Fail before any training on impossible settings, naming the field; ``context_length`` (the model's)
        and ``rows`` (rows per data file, once the data is checked) add the checks against them."""
        check_common(self)
        self.collapse.validate(self.iterations)
        positive(self, "iterations", "rollout_batch", "minibatch_size", "ppo_epochs", "max_new_tokens", "gold_every",
                 "gold_every_early", "sample_every", "policy_lr", "critic_lr", "clip_eps", "temperature")
        require(self, self.gold_early_until >= 0, "gold_early_until", "must be >= 0 (0: no early schedule)")
        for name in ("reward_clip", "adv_norm_clip", "value_clip", "max_grad_norm", "kl_coef", "entropy_coef",
                     "ptx_coef", "max_prompt_tokens"):
            require(self, getattr(self, name) is None or getattr(self, name) > 0, name, "must be > 0 or None (off)")
        require(self, self.rollout_batch % self.minibatch_size == 0, "rollout_batch",
                f"must be divisible by minibatch_size ({self.minibatch_size})")
        require(self, 0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        require(self, 0 <= self.gamma <= 1, "gamma", "must lie in [0, 1]")
        require(self, 0 <= self.lam <= 1, "lam", "must lie in [0, 1]")
        require(self, 0 <= self.critic_pretrain_iterations < self.iterations, "critic_pretrain_iterations",
                f"must be in [0, iterations={self.iterations})")
        require(self, self.checkpoint_every >= 0, "checkpoint_every", "must be >= 0")
        require(self, self.max_nonfinite >= 1, "max_nonfinite", "must be >= 1")
        require(self, all(0 <= b < 1 for b in self.adam_betas), "adam_betas", "must both lie in [0, 1)")
        require(self, self.entropy_target >= 0, "entropy_target", "must be >= 0 (nats per token)")
        fits_data(self, "rollout_batch", rows, "prompts_train.jsonl", "training prompts")
        if context_length is not None:
            require(self, self.max_new_tokens < context_length, "max_new_tokens",
                    f"must be below the model's context length ({context_length})")

    def gold_due(self, iteration: int) -> bool:
        """Whether the gold score is measured after ``iteration``: every ``gold_every`` iterations, every
        ``gold_every_early`` up to ``gold_early_until``, and at the last iteration."""
        early = iteration <= self.gold_early_until and iteration % self.gold_every_early == 0
        return early or iteration % self.gold_every == 0 or iteration == self.iterations

    def to_dict(self) -> dict:
        return to_dict(self)


# ----- presets as data ----------------------------------------------------------------------------
VANILLA = PPOConfig()
"""Plain PPO: GAE, clipped surrogate, unclipped value loss, critic from the SFT model; no KL penalty, no
reward or advantage normalization, no value or gradient clipping. It is the paper's "vanilla PPO" of
Fig. 4: the RLHF loop with nothing that holds the policy near the reference, so the RM can be
over-optimized freely."""

PPO_MAX_CHANGES: dict = {
    "kl_coef": 0.2, "reward_norm": "normalize", "reward_clip": 0.8, "value_clip": 0.2, "critic_init": "rm",
    "critic_pretrain_iterations": 5, "max_grad_norm": 1.0, "ptx_coef": 0.5,
}
"""PPO-max (paper Sec. 5.4, docs/paper.md Sec. 3): KL penalty, reward normalization and clipping, value
clipping, critic from the RM, critic pretraining, global gradient clipping and the ptx loss, on the same
small buffer as vanilla PPO."""


@dataclass(frozen=True)
class Preset:
    """A named set of changes to its parent preset ("base": the profile's vanilla PPO config) and what it shows."""

    name: str
    parent: str
    changes: dict
    description: str

    def config(self, base: PPOConfig | None = None) -> PPOConfig:
        """This preset on top of ``base`` (default :data:`VANILLA`, the tiny profile's)."""
        base = VANILLA if base is None else base
        parent = base if self.parent == "base" else PRESETS[self.parent].config(base)
        return replace(parent, **self.changes)


def _p(name: str, parent: str, description: str, **changes) -> Preset:
    return Preset(name=name, parent=parent, changes=changes, description=description)


PRESETS: dict[str, Preset] = {p.name: p for p in [
    _p("vanilla", "base", "plain PPO; the RM is free to be over-optimized (Fig. 4)"),
    _p("ppo_max", "base", "the paper's PPO-max recipe (Sec. 5.4, Fig. 9)", **PPO_MAX_CHANGES),
    # Fig. 6: score reparameterization, each on top of vanilla PPO
    _p("reward_scale", "vanilla", "Fig. 6: reward scaling, divide by running std", reward_norm="scale"),
    _p("reward_norm_0.3", "vanilla", "Fig. 6: reward normalize and clip, d = 0.3", reward_norm="normalize",
       reward_clip=0.3),
    _p("reward_norm_0.8", "vanilla", "Fig. 6: reward normalize and clip, d = 0.8", reward_norm="normalize",
       reward_clip=0.8),
    _p("adv_norm_0.5", "vanilla", "Fig. 6: advantage whiten and clip, d = 0.5", adv_norm_clip=0.5),
    _p("adv_norm_0.12", "vanilla", "Fig. 6: advantage whiten and clip, d = 0.12", adv_norm_clip=0.12),
    # Fig. 7: policy constraints, on top of vanilla PPO
    _p("kl_penalty", "vanilla", "Fig. 7: token-level KL penalty, eta = 0.2", kl_coef=0.2),
    _p("entropy_bonus", "vanilla", "Fig. 7: entropy term |H - target|, coef 0.05, target 0.15 nats (below the SFT "
       "policy's entropy of about 0.2, so a rise of the entropy is never paid for)", entropy_coef=0.05,
       entropy_target=0.15),
    _p("entropy_bonus_1.0", "vanilla", "Fig. 7: the entropy term with the default target of 1.0 nats, about five "
       "times the SFT policy's entropy: an exploration bonus", entropy_coef=0.05),
    _p("importance_sampling", "vanilla", "Fig. 7: old policy fixed to the reference", old_policy="reference"),
    _p("kl_and_is", "vanilla", "Fig. 7: KL penalty plus importance sampling", kl_coef=0.2, old_policy="reference"),
    # Fig. 8: initialization, on top of PPO-max (policy from pretrained, critic from SFT) or vanilla
    _p("policy_from_pretrained", "ppo_max", "Fig. 8: PPO-max with the policy (and reference) from the "
       "pretrained, non-SFT model", policy_init="pretrained"),
    _p("critic_from_sft", "ppo_max", "Fig. 8: PPO-max with the critic from the SFT model and a fresh head",
       critic_init="sft"),
    _p("critic_pretrain", "vanilla", "Fig. 8: vanilla PPO plus critic pretraining (5 iterations)",
       critic_pretrain_iterations=5),
    # Leave one out: PPO-max without one of its tricks (#4, the critic from the RM, is critic_from_sft)
    _p("ppo_max_minus_kl", "ppo_max", "PPO-max without the KL penalty (#1)", kl_coef=None),
    _p("ppo_max_minus_reward_norm", "ppo_max", "PPO-max without reward normalization and clipping (#2)",
       reward_norm="none", reward_clip=None),
    _p("ppo_max_minus_value_clip", "ppo_max", "PPO-max without value clipping (#3)", value_clip=None),
    _p("ppo_max_minus_critic_pretrain", "ppo_max", "PPO-max without critic pretraining (#5)",
       critic_pretrain_iterations=0),
    _p("ppo_max_minus_grad_clip", "ppo_max", "PPO-max without global gradient clipping (#6)", max_grad_norm=None),
    _p("ppo_max_minus_ptx", "ppo_max", "PPO-max without the ptx loss (#8)", ptx_coef=None),
]}


def get_preset(name: str, base: PPOConfig | None = None) -> PPOConfig:
    """The PPOConfig of preset ``name`` on ``base`` (a profile's vanilla PPO; default the tiny profile's);
    ValueError listing the presets if unknown."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name].config(base)
