"""What a PPO run is given besides its config: :class:`PPOSetup` (built by :func:`rlhf_lite.ppo.stage.build_setup`
or by hand, as the tests do)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..evaluation import GoldJudge
from ..loading import OptimizerFactory, make_optimizer
from ..models import AdapterStack
from ..text import Prompt


@dataclass
class PPOSetup:
    """Everything a run needs besides its config."""

    stack: AdapterStack
    """One base with ``policy``, ``critic`` and ``reward`` adapters (the reward adapter already trained)."""
    tokenizer: object
    train_prompts: list[Prompt]
    test_prompts: list[Prompt]
    sft_examples: list[tuple[list[int], list[int]]] = field(default_factory=list)
    """(ids, response mask) demonstrations of the ptx term (PPO-max #8)."""
    rm_stack: AdapterStack | None = None
    """Where the RM lives when it is not on ``stack`` (a policy from the pretrained model)."""
    judge: GoldJudge | None = None
    """The oracle, logged and never trained on; None (real data such as HH-RLHF): no gold metrics."""
    make_optimizer: OptimizerFactory = make_optimizer
    """``factory(params, lr, betas)``: torch AdamW on the CPU, 8-bit paged AdamW on CUDA profiles."""
    provenance: dict = field(default_factory=dict)
    """Fingerprints of the SFT model, the RM and the data; stored in checkpoints and the summary."""

    @property
    def reward_model(self) -> AdapterStack:
        return self.rm_stack if self.rm_stack is not None else self.stack


__all__ = ["PPOSetup"]
