"""What every stage that trains or samples a policy on the SFT model loads and checks: PPO, DPO, GRPO and best-of-n.

:func:`policy_inputs` checks everything cheap before any model loads (the profile's settings, the folders,
that the RM was trained on this SFT model, every data row the stage reads and its token budget, the config
against the data's size) and returns the tokenizer, the prompts formatted for the model, the gold judge and
the provenance of the run. :func:`load_policy_stack` then loads the base once with the stage's adapters and,
where the stage uses one, the trained reward adapter, and checks that every loaded weight is finite.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .evaluation import GoldJudge
from .loading import load_base, load_tokenizer_for, resolve_device
from .models import AdapterStack, read_lora_settings
from .ppo.guard import check_finite_module
from .provenance import recorded as recorded_provenance
from .rm import REWARD
from .settings import to_dict
from .stage import (
    SFTRun,
    check_adapter_files,
    data_fingerprint,
    gold_judge_for,
    model_fingerprint,
    raw_prompts,
)
from .text import Prompt, format_prompts
from .validate import check_stage_data

N_TEST_PROMPTS = 256
"""Test prompts of every gold measurement of a policy stage."""


def check_rm_base(rm_dir: Path, sft: SFTRun, lora) -> dict:
    """Check that ``rm_dir`` holds a reward model trained on the SFT model ``sft`` with ``lora``; return its
    fingerprint. An RM adapter reads the features of the base it was trained on: on another SFT model it
    would score noise."""
    if not (rm_dir / REWARD).is_dir():
        raise FileNotFoundError(f"{rm_dir} holds no reward model (missing {rm_dir / REWARD}); run the rm stage first")
    saved = read_lora_settings(rm_dir / REWARD)
    if saved != lora:
        raise ValueError(f"the reward model in {rm_dir} has LoRA settings {saved}, but this profile uses {lora}: "
                         "train the RM with the same profile")
    check_adapter_files(rm_dir / REWARD)
    recorded = recorded_provenance(rm_dir / "summary.json").get("sft_model")
    current = model_fingerprint(sft.model)
    if not isinstance(recorded, dict) or "sha256" not in recorded:
        raise ValueError(f"{rm_dir / 'summary.json'} does not record the SFT model the RM was trained on")
    if recorded["sha256"] != current["sha256"]:
        raise ValueError(f"the reward model in {rm_dir} was trained on the SFT model {recorded['path']} (sha256 "
                         f"{recorded['sha256']}), but {current['path']} is another model (sha256 {current['sha256']}):"
                         " pass the --sft folder the RM was trained on, or retrain the RM")
    return {"path": str(rm_dir.resolve()), "sha256": model_fingerprint(rm_dir / REWARD)["sha256"]}


def policy_provenance(cfg, sft: SFTRun, rm_dir: str | Path | None, data_dir: str | Path, profile,
                      pretrained: bool = False) -> dict:
    """What a policy run is made from (stored in its summary; PPO also in its checkpoints, compared on resume):
    the SFT model, the RM (checked to be trained on that SFT model; absent when ``rm_dir`` is None), the data,
    the seed, the model and LoRA settings, and ``policy_base``, the folder :mod:`rlhf_lite.export` merges the
    saved policy into (the model before SFT when ``pretrained``)."""
    base = sft.pretrained() if pretrained else sft.model
    provenance: dict = {"sft_model": model_fingerprint(sft.model)}
    if rm_dir is not None:
        provenance["rm"] = check_rm_base(Path(rm_dir), sft, profile.lora)
    provenance.update(data=data_fingerprint(data_dir), seed=cfg.seed, model=to_dict(profile.model),
                      lora=to_dict(profile.lora),
                      policy_base=str(Path(base).resolve()) if Path(base).exists() else str(base))
    return provenance


@dataclass
class PolicyInputs:
    """The checked inputs of a policy stage, before any model is loaded."""

    sft: SFTRun
    base_source: str | Path
    """What the policy's base (and so the reference) is: the SFT model, or the model before SFT."""
    tokenizer: object
    train_prompts: list[Prompt]
    test_prompts: list[Prompt]
    judge: GoldJudge | None
    """The data's gold judge; None for imported HH-RLHF."""
    provenance: dict
    """:func:`policy_provenance` of the run."""
    prompt_budget: int
    """Longest model prompt in tokens."""
    context: int
    """The SFT model's context length."""


def policy_inputs(stage: str, cfg, sft_dir: str | Path, rm_dir: str | Path | None, data_dir: str | Path, profile,
                  n_test_prompts: int = N_TEST_PROMPTS, pretrained: bool = False,
                  need_train: tuple[str, str] | None = None) -> PolicyInputs:
    """Check a policy stage's settings, folders and data; load only the tokenizer.

    ``stage``: "ppo", "dpo", "grpo" or "bon" (which data files :func:`~rlhf_lite.validate.check_stage_data`
    checks). ``cfg`` is the stage's config: it has ``seed``, ``max_new_tokens``, ``max_prompt_tokens`` and
    ``validate(context_length=, rows=)``. ``rm_dir`` None: the stage uses no reward model. ``pretrained``: the
    policy's base is the model before SFT (PPO's ``policy_init="pretrained"``). ``need_train``: (field, what
    needs it): at least ``cfg.<field>`` training prompts must fit the prompt budget.
    """
    profile.model.validate()
    profile.lora.validate()
    sft, data_dir = SFTRun.open(sft_dir), Path(data_dir)
    provenance = policy_provenance(cfg, sft, rm_dir, data_dir, profile, pretrained)
    base_source = sft.pretrained() if pretrained else sft.model
    tok = load_tokenizer_for(base_source)
    context = sft.context_length()
    check_stage_data(stage, data_dir, cfg, profile, tok, context)  # every row, the prompts' token budget
    train_raw, test_raw = raw_prompts(data_dir, "train"), raw_prompts(data_dir, "test", n_test_prompts)
    budget = cfg.max_prompt_tokens or context - cfg.max_new_tokens
    system = profile.model.system_prompt
    train, _ = format_prompts(tok, train_raw, budget, system)
    test, _ = format_prompts(tok, test_raw, budget, system)
    if need_train is not None:
        name, purpose = need_train
        value = getattr(cfg, name)
        if len(train) < value:
            raise ValueError(f"only {len(train)} training prompts fit {budget} tokens; {purpose} needs "
                             f"{type(cfg).__name__}.{name} = {value}")
    return PolicyInputs(sft, base_source, tok, train, test, gold_judge_for(data_dir), provenance, budget, context)


def load_policy_stack(profile, base_source: str | Path, adapters: list[str], rm_dir: str | Path | None = None
                      ) -> AdapterStack:
    """The base from ``base_source`` (as the profile's model spec says) with ``adapters``; the trained reward
    adapter of ``rm_dir`` goes into slot ``reward`` when given (``adapters`` must then include it). A
    non-finite weight in the base or the reward adapter fails here, naming the folder. Fresh adapters draw
    their initial A matrices from torch's global RNG: the caller seeds it first."""
    stack = AdapterStack(load_base(profile.model, base_source, resolve_device(profile.model)), adapters, profile.lora)
    check_finite_module(stack.base_model, str(base_source))
    if rm_dir is not None:
        stack.load_adapter(REWARD, Path(rm_dir) / REWARD)
        check_finite_module(stack, str(Path(rm_dir) / REWARD), only=REWARD)
    return stack


__all__ = ["N_TEST_PROMPTS", "PolicyInputs", "check_rm_base", "load_policy_stack", "policy_inputs",
           "policy_provenance"]
