"""Stage 3: PPO, for every profile: load the stack, the prompts and the judge, check them, and run the trainer.

:func:`build_setup` checks everything cheap before any model loads (with
:func:`~rlhf_lite.policy_setup.policy_inputs`: the folders, that the RM was trained on this SFT model, every
data row, that prompts fit the token budget), then loads the SFT model once as the base of the ``policy``,
``critic`` and ``reward`` adapters and loads the trained reward adapter.
:func:`run_ppo` runs :class:`~rlhf_lite.ppo.trainer.PPOTrainer` on it.
"""

from __future__ import annotations

from pathlib import Path

from .. import data as data_mod
from ..distributed import init, place
from ..loading import load_base, optimizer_factory
from ..models import AdapterStack
from ..outdir import check_out, clear_out
from ..policy_setup import N_TEST_PROMPTS, check_rm_base, load_policy_stack, policy_inputs, policy_provenance
from ..rm import REWARD
from ..sft import encode_demos
from ..stage import SFTRun
from ..utils import DATA_DIR, seed_everything
from .checkpoint import check_checkpoint
from .config import PPOConfig
from .distributed import check_config, make_trainer
from .trainer import PPOSetup


def ppo_provenance(cfg: PPOConfig, sft: SFTRun, rm_dir: Path, data_dir: Path, profile) -> dict:
    """What a PPO run is made from (stored in its checkpoints and summary, compared on resume): the SFT model,
    the RM (checked to be trained on that SFT model), the data, the seed, the model and LoRA settings."""
    return policy_provenance(cfg, sft, rm_dir, data_dir, profile, pretrained=cfg.policy_init == "pretrained")


def build_setup(cfg: PPOConfig, sft_dir: str | Path, rm_dir: str | Path, data_dir: str | Path = DATA_DIR,
                profile=None, n_test_prompts: int = N_TEST_PROMPTS, before_load=None) -> PPOSetup:
    """Load the base (SFT or pretrained), add policy/critic/reward adapters, load the RM, init the critic.
    ``before_load(provenance)`` runs after every check and before any model loads (a resume's check)."""
    from ..profiles import TINY

    profile = profile or TINY
    rm_dir, data_dir = Path(rm_dir), Path(data_dir)
    inputs = policy_inputs("ppo", cfg, sft_dir, rm_dir, data_dir, profile, n_test_prompts,
                           pretrained=cfg.policy_init == "pretrained", need_train=("rollout_batch", "a rollout"))
    sft_rows = data_mod.load_sft(data_dir / "sft.jsonl") if cfg.ptx_coef else []

    if before_load is not None:
        before_load(inputs.provenance)
    # Fresh adapters draw their initial A matrices from torch's global RNG: seed it here, or the run
    # would depend on whatever the process did before (the pipeline trains SFT and RM first).
    seed_everything(cfg.seed)
    stack = load_policy_stack(profile, inputs.base_source, ["policy", "critic", REWARD], rm_dir)
    device = stack.device
    rm_stack = None
    if cfg.policy_init == "pretrained":
        # The RM adapter was trained on the SFT base: on the pretrained base it would read other features,
        # so the RM keeps its own copy of the SFT base (the only case with two bases).
        rm_stack = AdapterStack(load_base(profile.model, inputs.sft.model, device), [REWARD], profile.lora)
        rm_stack.load_adapter(REWARD, rm_dir / REWARD)
        rm_stack.eval()
    if cfg.critic_init == "rm":
        stack.copy_adapter(REWARD, "critic")
    tok = inputs.tokenizer
    demos = encode_demos(tok, [(r["prompt"], r["response"]) for r in sft_rows], inputs.prompt_budget + cfg.max_new_tokens,
                         truncate=not profile.model.is_tiny, system_prompt=profile.model.system_prompt)
    return PPOSetup(stack, tok, inputs.train_prompts, inputs.test_prompts, demos, rm_stack, inputs.judge,
                    optimizer_factory(profile.model, device), inputs.provenance)


def run_ppo(out_dir: str | Path, sft_dir: str | Path, rm_dir: str | Path, cfg: PPOConfig, preset: str = "custom",
            data_dir: str | Path = DATA_DIR, resume: bool = False, profile=None, overwrite: bool = True) -> dict:
    """Build the setup and run PPO; writes metrics.jsonl, summary.json, samples, plots, checkpoint.

    ``resume``: continue the run in ``out_dir`` from ``out_dir/checkpoint`` (see
    :meth:`~rlhf_lite.ppo.trainer.PPOTrainer.load_checkpoint`); its config and provenance must match except
    the fields a resume may change. Otherwise ``out_dir`` must be empty or, with ``overwrite``, hold a run
    of this project, whose files are deleted once the models have loaded. Settings, folders and data are all
    checked before any model is loaded. Under ``accelerate launch`` with several processes the run is data
    parallel (:mod:`rlhf_lite.ppo.distributed`): every process checks, rank 0 clears and writes.
    """
    from ..profiles import TINY

    cfg.validate()
    dist = init()  # the processes `accelerate launch` started (one without it)
    check_config(cfg, dist.world)
    out, ckpt = Path(out_dir), Path(out_dir) / "checkpoint"
    if resume:
        check_checkpoint(ckpt, cfg, processes=dist.world)
    else:
        check_out(out, overwrite, resumable=True)
    check = (lambda prov: check_checkpoint(ckpt, cfg, prov, processes=dist.world)) if resume else None
    setup = build_setup(cfg, sft_dir, rm_dir, data_dir, place(profile or TINY, dist), before_load=check)
    if not resume and dist.is_main:
        clear_out(out)  # the old run's files go only now, with every check passed and the models loaded
    dist.barrier()
    trainer = make_trainer(cfg, setup, out, preset, dist)
    if resume:
        trainer.load_checkpoint(ckpt)
    return trainer.train()


__all__ = ["build_setup", "check_rm_base", "ppo_provenance", "run_ppo"]
