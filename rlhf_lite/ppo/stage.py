"""Stage 3: PPO, for every profile: load the stack, the prompts and the judge, check them, and run the trainer.

:func:`build_setup` checks everything cheap before any model loads (the folders, that the RM was trained on
this SFT model, every data row, that prompts fit the token budget), then loads the SFT model once as the
base of the ``policy``, ``critic`` and ``reward`` adapters and loads the trained reward adapter.
:func:`run_ppo` runs :class:`~rlhf_lite.ppo.trainer.PPOTrainer` on it.
"""

from __future__ import annotations

from pathlib import Path

from .. import data as data_mod
from ..loading import load_base, load_tokenizer_for, optimizer_factory, resolve_device
from ..models import AdapterStack, read_lora_settings
from ..outdir import check_out, clear_out
from ..provenance import recorded as recorded_provenance
from ..rm import REWARD
from ..settings import to_dict
from ..sft import encode_demos
from ..stage import (
    SFTRun,
    check_adapter_files,
    data_fingerprint,
    gold_judge_for,
    model_fingerprint,
    raw_prompts,
)
from ..text import format_prompts
from ..utils import DATA_DIR, seed_everything
from ..validate import check_stage_data
from .checkpoint import check_checkpoint
from .config import PPOConfig
from .guard import check_finite_module
from .trainer import PPOSetup, PPOTrainer

N_TEST_PROMPTS = 256


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


def ppo_provenance(cfg: PPOConfig, sft: SFTRun, rm_dir: Path, data_dir: Path, profile) -> dict:
    """What a PPO run is made from (stored in its checkpoints and summary, compared on resume): the SFT model,
    the RM (checked to be trained on that SFT model), the data, the seed, the model and LoRA settings."""
    base = sft.pretrained() if cfg.policy_init == "pretrained" else sft.model
    return {"sft_model": model_fingerprint(sft.model), "rm": check_rm_base(rm_dir, sft, profile.lora),
            "data": data_fingerprint(data_dir), "seed": cfg.seed, "model": to_dict(profile.model),
            "lora": to_dict(profile.lora), "policy_base": str(Path(base).resolve()) if Path(base).exists() else str(base)}


def build_setup(cfg: PPOConfig, sft_dir: str | Path, rm_dir: str | Path, data_dir: str | Path = DATA_DIR,
                profile=None, n_test_prompts: int = N_TEST_PROMPTS, before_load=None) -> PPOSetup:
    """Load the base (SFT or pretrained), add policy/critic/reward adapters, load the RM, init the critic.
    ``before_load(provenance)`` runs after every check and before any model loads (a resume's check)."""
    from ..profiles import TINY

    profile = profile or TINY
    profile.model.validate()
    profile.lora.validate()
    sft, rm_dir, data_dir = SFTRun.open(sft_dir), Path(rm_dir), Path(data_dir)
    provenance = ppo_provenance(cfg, sft, rm_dir, data_dir, profile)
    base_source = sft.pretrained() if cfg.policy_init == "pretrained" else sft.model
    tok = load_tokenizer_for(base_source)
    context = sft.context_length()
    check_stage_data("ppo", data_dir, cfg, profile, tok, context)  # every row, the prompts' token budget
    train_raw, test_raw = raw_prompts(data_dir, "train"), raw_prompts(data_dir, "test", n_test_prompts)
    sft_rows = data_mod.load_sft(data_dir / "sft.jsonl") if cfg.ptx_coef else []
    judge = gold_judge_for(data_dir)
    budget = cfg.max_prompt_tokens or context - cfg.max_new_tokens
    system = profile.model.system_prompt
    train, _ = format_prompts(tok, train_raw, budget, system)
    test, _ = format_prompts(tok, test_raw, budget, system)
    if len(train) < cfg.rollout_batch:
        raise ValueError(f"only {len(train)} training prompts fit {budget} tokens; a rollout needs "
                         f"PPOConfig.rollout_batch = {cfg.rollout_batch}")

    # Fresh adapters draw their initial A matrices from torch's global RNG: seed it here, or the run
    # would depend on whatever the process did before (the pipeline trains SFT and RM first).
    if before_load is not None:
        before_load(provenance)
    seed_everything(cfg.seed)
    device = resolve_device(profile.model)
    stack = AdapterStack(load_base(profile.model, base_source, device), ["policy", "critic", REWARD], profile.lora)
    check_finite_module(stack.base_model, str(base_source))
    stack.load_adapter(REWARD, rm_dir / REWARD)
    check_finite_module(stack, str(rm_dir / REWARD), only=REWARD)
    rm_stack = None
    if cfg.policy_init == "pretrained":
        # The RM adapter was trained on the SFT base: on the pretrained base it would read other features,
        # so the RM keeps its own copy of the SFT base (the only case with two bases).
        rm_stack = AdapterStack(load_base(profile.model, sft.model, device), [REWARD], profile.lora)
        rm_stack.load_adapter(REWARD, rm_dir / REWARD)
        rm_stack.eval()
    if cfg.critic_init == "rm":
        stack.copy_adapter(REWARD, "critic")
    demos = encode_demos(tok, [(r["prompt"], r["response"]) for r in sft_rows], budget + cfg.max_new_tokens,
                         truncate=not profile.model.is_tiny, system_prompt=system)
    return PPOSetup(stack, tok, train, test, demos, rm_stack, judge, optimizer_factory(profile.model, device),
                    provenance)


def run_ppo(out_dir: str | Path, sft_dir: str | Path, rm_dir: str | Path, cfg: PPOConfig, preset: str = "custom",
            data_dir: str | Path = DATA_DIR, resume: bool = False, profile=None, overwrite: bool = True) -> dict:
    """Build the setup and run PPO; writes metrics.jsonl, summary.json, samples, plots, checkpoint.

    ``resume``: continue the run in ``out_dir`` from ``out_dir/checkpoint`` (see
    :meth:`~rlhf_lite.ppo.trainer.PPOTrainer.load_checkpoint`); its config and provenance must match except
    the fields a resume may change. Otherwise ``out_dir`` must be empty or, with ``overwrite``, hold a run
    of this project, whose files are deleted once the models have loaded. Settings, folders and data are all
    checked before any model is loaded.
    """
    cfg.validate()
    out, ckpt = Path(out_dir), Path(out_dir) / "checkpoint"
    if resume:
        check_checkpoint(ckpt, cfg)
    else:
        check_out(out, overwrite, resumable=True)
    check = (lambda prov: check_checkpoint(ckpt, cfg, prov)) if resume else None
    setup = build_setup(cfg, sft_dir, rm_dir, data_dir, profile, before_load=check)
    if not resume:
        clear_out(out)  # the old run's files go only now, with every check passed and the models loaded
    trainer = PPOTrainer(cfg, setup, out, preset)
    if resume:
        trainer.load_checkpoint(ckpt)
    return trainer.train()


__all__ = ["build_setup", "check_rm_base", "ppo_provenance", "run_ppo"]
