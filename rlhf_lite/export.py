"""Hand-off: a trained policy as a plain Hugging Face model folder that any tool loads.

A PPO run saves its policy as a peft LoRA adapter (``RUN/policy``): ``PeftModel.from_pretrained(base,
RUN/policy)`` loads it on its base, the SFT model. :func:`export_policy` merges the adapter into that base
and writes the result with ``save_pretrained``, so ``AutoModelForCausalLM.from_pretrained(OUT)`` (TRL's
trainers, vLLM, the Hub) needs neither peft nor this project.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .loading import load_tokenizer_for
from .utils import quiet_hf_progress, read_json


def policy_base(run_dir: str | Path) -> str:
    """The base model folder of a PPO run's policy (recorded in its summary's provenance)."""
    run = Path(run_dir)
    summary = read_json(run / "summary.json")
    base = summary.get("provenance", {}).get("policy_base")
    if base is None:
        raise ValueError(f"{run / 'summary.json'} records no policy base (not a PPO run of this version)")
    return base


def export_policy(run_dir: str | Path, out_dir: str | Path, dtype: torch.dtype | None = None,
                  overwrite: bool = True) -> Path:
    """Merge ``run_dir/policy`` into its base model and write a plain model folder (weights, config and
    tokenizer) to ``out_dir``; returns ``out_dir``. ``dtype``: the saved weights' dtype (default: the base's).
    A model already in ``out_dir`` is replaced only with ``overwrite`` (see :mod:`rlhf_lite.outdir`)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from .outdir import check_out, clear_out
    from .stage import check_adapter_files

    run, out = Path(run_dir), check_out(out_dir, overwrite)
    if not (run / "policy" / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{run / 'policy'} holds no policy adapter: is {run} a finished PPO run?")
    check_adapter_files(run / "policy")
    base_dir = policy_base(run)
    quiet_hf_progress()
    try:
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype or "auto")
    except OSError as e:
        raise FileNotFoundError(f"cannot load the policy's base model {base_dir}: {str(e).splitlines()[0]}") from e
    merged = PeftModel.from_pretrained(base, str(run / "policy")).merge_and_unload()
    merged.config.use_cache = True
    clear_out(out)  # an earlier export's shards go only now, with the merged model in hand
    merged.save_pretrained(out)
    load_tokenizer_for(base_dir).save_pretrained(out)
    return out


__all__ = ["export_policy", "policy_base"]
