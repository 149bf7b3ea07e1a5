"""The ``dpo``, ``grpo`` and ``bon`` commands of ``python -m rlhf_lite``, with the conventions of every stage
(:mod:`rlhf_lite.cli`): ``--profile``/``--model``/``--data``/``--out``/``--seed``, one flag per config field,
``--preset`` and ``--list-presets``, ``--set field=value``."""

from __future__ import annotations

import argparse
import dataclasses

from ..settings import replace_fields
from .measure import StagePreset, preset_config


def _presets(part: str) -> dict[str, StagePreset]:
    from .bon import BON_PRESETS
    from .dpo import DPO_PRESETS
    from .grpo import GRPO_PRESETS

    return {"dpo": DPO_PRESETS, "grpo": GRPO_PRESETS, "bon": BON_PRESETS}[part]


def stage_config(args: argparse.Namespace, part: str):
    """(profile, config) of a ``part`` command: the profile with ``--model`` and the other parts' changes, and
    ``--preset`` on the profile's ``part`` settings with this stage's flags on top; None for --list-presets."""
    from ..cli import build_profile, config_changes

    presets = _presets(part)
    if args.list_presets:
        width = max(len(n) for n in presets)
        for name, p in presets.items():
            print(f"{name:<{width}}  {p.description}")
        return None
    required = ("sft", "out") if part == "dpo" else ("sft", "rm", "out")  # DPO's --rm only measures
    missing = [n for n in required if getattr(args, n) is None]
    if missing:
        raise SystemExit(f"{part} needs --{' --'.join(missing)}")
    prefix = f"{part}."
    changes = config_changes(args)
    profile = build_profile(args, {k: v for k, v in changes.items() if not k.startswith(prefix)})
    profile.model.validate()
    cfg = preset_config(presets, args.preset, getattr(profile, part))
    cfg = replace_fields(cfg, {k[len(prefix):]: v for k, v in changes.items() if k.startswith(prefix)},
                         type(cfg).__name__)
    if args.seed is not None:
        cfg = dataclasses.replace(cfg, seed=args.seed)
    return profile, cfg


def _gold(s: dict) -> str:
    if s.get("final_gold_score") is None:
        return ""
    return f"gold {s['initial_gold_score']:.3f} -> {s['final_gold_score']:.3f} (peak {s['peak_gold_score']:.3f}), "


def _flag(s: dict) -> str:
    return f"collapse at {s['collapse_iteration']}" if s["collapse_detected"] else "no collapse"


def cmd_dpo(args: argparse.Namespace) -> None:
    from .dpo import train_dpo

    made = stage_config(args, "dpo")
    if made is None:
        return
    profile, cfg = made
    s = train_dpo(args.out, args.sft, cfg, args.data, profile, rm_dir=args.rm, preset=args.preset,
                  overwrite=args.overwrite)
    print(f"DPO {args.preset} ({profile.name}) done in {s['wall_seconds']:.0f}s: {_gold(s)}KL/response "
          f"{s['final_kl_per_sequence']:.2f}, implicit-reward accuracy {s['final_reward_accuracy']:.3f}, {_flag(s)} "
          f"-> {args.out}")


def cmd_grpo(args: argparse.Namespace) -> None:
    from .grpo import run_grpo

    made = stage_config(args, "grpo")
    if made is None:
        return
    profile, cfg = made
    s = run_grpo(args.out, args.sft, args.rm, cfg, args.preset, args.data, profile, overwrite=args.overwrite)
    print(f"GRPO {args.preset} ({profile.name}) done in {s['wall_seconds']:.0f}s: reward {s['initial_reward']:.2f} -> "
          f"{s['final_reward']:.2f}, {_gold(s)}KL {s['final_kl']:.3f}, {_flag(s)} -> {args.out}")


def cmd_bon(args: argparse.Namespace) -> None:
    from .bon import run_bon

    made = stage_config(args, "bon")
    if made is None:
        return
    profile, cfg = made
    s = run_bon(args.out, args.sft, args.rm, cfg, args.data, profile, args.preset, overwrite=args.overwrite)
    figures = ", ".join(f"n={r['n']}: " + (f"gold {r['gold_score']:.3f}" if "gold_score" in r else
                                           f"RM {r['reward']:.2f}") for r in s["rows"])
    print(f"best-of-n ({profile.name}) done in {s['wall_seconds']:.0f}s: {figures} -> {args.out}")


def add_beyond_stages(stage) -> None:
    """Register the three commands with the parser's ``stage(name, help, own_parts)`` helper."""
    specs = [
        ("dpo", "DPO (Rafailov et al. 2023) on the preference pairs: a policy adapter, no RM, no sampling", cmd_dpo,
         "a reward model whose score of the measured samples is logged (optional; DPO never trains on it)"),
        ("grpo", "GRPO (Shao et al. 2024) against the reward model: group-relative advantages, no critic", cmd_grpo,
         "folder written by the rm stage"),
        ("bon", "best-of-n sampling of the SFT model against the reward model, for a range of n", cmd_bon,
         "folder written by the rm stage"),
    ]
    for name, help_text, func, rm_help in specs:
        p = stage(name, help_text, (name,))
        p.add_argument("--preset", default=name, help=f"see --list-presets (default {name})")
        p.add_argument("--list-presets", action="store_true", help="print the presets and exit")
        p.add_argument("--sft", help="folder written by the sft stage")
        p.add_argument("--rm", help=rm_help)
        p.set_defaults(func=func)


__all__ = ["add_beyond_stages", "cmd_bon", "cmd_dpo", "cmd_grpo", "stage_config"]
