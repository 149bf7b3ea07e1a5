"""Command line: ``python -m rlhf_lite {data,sft,rm,ppo,pipeline} ...``.

Every stage writes into its ``--out`` folder: ``metrics.jsonl`` (one JSON object per logged step),
``summary.json``, PNG plots, and its model or adapters. Settings come from the stage's config dataclass
of the chosen ``--profile``; ``--set field=value`` overrides single fields. ``ppo --resume DIR`` continues
an interrupted run from ``DIR/checkpoint``.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import sys
import types
import typing
from dataclasses import replace
from pathlib import Path

from .utils import DATA_DIR, set_cpu_threads


def _coerce(value, hint, where: str):
    """``value`` (a Python literal) as type ``hint``: ints widen to float, lists become tuples; a value of
    another type is a SystemExit naming ``where``, the expected and the given type."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arm in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arm, where)
            except SystemExit:
                pass
    elif origin is tuple and isinstance(value, (list, tuple)):
        arms = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(arms) == len(value):
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, arms)))
    elif hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif isinstance(hint, type) and isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    name = hint.__name__ if isinstance(hint, type) and not typing.get_args(hint) else str(hint)
    raise SystemExit(f"--set {where}={value!r}: expected {name}, got {type(value).__name__}")


def _replace_fields(cfg, changes: dict, where: str):
    """``replace(cfg, **changes)`` with every value checked against its field's type annotation."""
    hints = typing.get_type_hints(type(cfg))
    unknown = sorted(set(changes) - set(hints))
    if unknown:
        raise SystemExit(f"--set: {where or type(cfg).__name__} has no field {unknown[0]!r}; fields: "
                         f"{', '.join(sorted(hints))}")

    def convert(name: str, value):
        at = f"{where}.{name}" if where else name
        current = getattr(cfg, name)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):  # --set collapse={'patience': 3}
            return _replace_fields(current, value, at)
        return _coerce(value, hints[name], at)

    return replace(cfg, **{k: convert(k, v) for k, v in changes.items()})


def _parse_overrides(cfg, items: list[str] | None):
    """Apply ``--set name=value`` pairs to a frozen dataclass, with a clear error on unknown names and on values
    of the wrong type (``--set policy_lr=abc``)."""
    if not items:
        return cfg
    changes = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--set expects name=value, got {item!r}")
        name, raw = item.split("=", 1)
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw  # a bare word such as rm or reference
        changes[name] = value
    return _replace_fields(cfg, changes, "")


def _profile_check(profile: str) -> None:
    if profile != "tiny":
        raise SystemExit(
            f"profile {profile!r}: the gpu profile's stages run through notebooks/05_real_model_qlora.ipynb "
            "(4-bit base with LoRA adapters); the CLI runs the tiny profile"
        )


def cmd_data(args: argparse.Namespace) -> None:
    from .world import generate_world

    stats = generate_world(args.out, seed=args.seed)
    print(json.dumps({k: v for k, v in stats.items() if not isinstance(v, dict)}, indent=2))


def cmd_sft(args: argparse.Namespace) -> None:
    from .sft import SFTConfig, train_sft

    _profile_check(args.profile)
    cfg = _parse_overrides(replace(SFTConfig(), seed=args.seed), args.set)
    s = train_sft(args.out, cfg, data_dir=args.data)
    print(f"SFT done in {s['wall_seconds']:.0f}s: gold before {s['gold_score_before']:.3f}, "
          f"after {s['gold_score_after']:.3f}, demonstrations {s['gold_score_demos']:.3f} -> {args.out}")


def cmd_rm(args: argparse.Namespace) -> None:
    from .rm import RMConfig, train_rm

    _profile_check(args.profile)
    cfg = _parse_overrides(replace(RMConfig(), seed=args.seed), args.set)
    s = train_rm(args.out, args.sft, cfg, data_dir=args.data)
    print(f"RM done in {s['wall_seconds']:.0f}s: test accuracy {s['test_accuracy']:.3f}, gold agreement "
          f"{s['gold_agreement']:.3f} (annotators {s['annotator_gold_agreement']:.3f}), padding gain RM "
          f"{s['padding_rm_gain']:+.3f} / gold {s['padding_gold_change']:+.3f} -> {args.out}")


def cmd_ppo(args: argparse.Namespace) -> None:
    from .ppo.config import PRESETS, get_preset

    if args.list_presets:
        width = max(len(n) for n in PRESETS)
        for name, p in PRESETS.items():
            print(f"{name:<{width}}  {p.description}")
        return
    if args.resume:  # the run's own folder: its checkpoint, metrics and final files
        if args.out is not None and Path(args.out).resolve() != Path(args.resume).resolve():
            raise SystemExit(f"--resume {args.resume} continues the run in that folder; drop --out {args.out}")
        args.out = args.resume
    missing = [n for n in ("sft", "rm", "out") if getattr(args, n) is None]
    if missing:
        raise SystemExit(f"ppo needs --{' --'.join(missing)}")
    _profile_check(args.profile)
    cfg = get_preset(args.preset)
    cfg = replace(cfg, seed=args.seed, **({"iterations": args.iterations} if args.iterations else {}))
    cfg = _parse_overrides(cfg, args.set)
    from .ppo.trainer import run_ppo

    s = run_ppo(args.out, args.sft, args.rm, cfg, preset=args.preset, data_dir=args.data,
                resume=bool(args.resume))
    if s["interrupted"]:
        print(f"PPO {args.preset} stopped at iteration {s['iterations']}; continue with "
              f"`python -m rlhf_lite ppo --resume {args.out}` and the same --sft, --rm, --preset, --seed and --set")
        return
    flag = f"collapse at iteration {s['collapse_iteration']}" if s["collapse_detected"] else "no collapse"
    print(f"PPO {args.preset} done in {s['wall_seconds']:.0f}s: reward {s['initial_reward']:.2f} -> "
          f"{s['final_reward']:.2f}, gold {s['initial_gold_score']:.3f} -> {s['final_gold_score']:.3f} "
          f"(peak {s['peak_gold_score']:.3f}), KL {s['final_kl']:.3f}, {flag} -> {args.out}")


def cmd_pipeline(args: argparse.Namespace) -> None:
    from .pipeline import run_pipeline

    _profile_check(args.profile)
    run_pipeline(args.out, seed=args.seed, data_dir=args.data, iterations=args.iterations, reuse=args.reuse)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rlhf_lite", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, out_required: bool = True) -> None:
        p.add_argument("--out", required=out_required, help="output folder")
        p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
        p.add_argument("--profile", choices=("tiny", "gpu"), default="tiny", help="model/data profile")
        p.add_argument("--data", default=str(DATA_DIR), help="world data folder (default: the shipped data/)")
        p.add_argument("--set", action="append", metavar="FIELD=VALUE", help="override one config field")

    p = sub.add_parser("data", help="regenerate the synthetic world's data files")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("sft", help="LM pretraining and SFT of the tiny model")
    common(p)
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("rm", help="train and evaluate the reward model")
    common(p)
    p.add_argument("--sft", required=True, help="folder written by the sft stage")
    p.set_defaults(func=cmd_rm)

    p = sub.add_parser("ppo", help="run PPO with a preset")
    common(p, out_required=False)
    p.add_argument("--preset", default="vanilla", help="see --list-presets")
    p.add_argument("--list-presets", action="store_true", help="print the presets and exit")
    p.add_argument("--sft", help="folder written by the sft stage")
    p.add_argument("--rm", help="folder written by the rm stage")
    p.add_argument("--iterations", type=int, help="override the preset's iteration count")
    p.add_argument("--resume", metavar="DIR",
                   help="continue the run in DIR (an earlier --out) from DIR/checkpoint, appending to "
                        "DIR/metrics.jsonl; give the same --sft, --rm, --preset, --seed and --set as that run "
                        "(--iterations may be raised to extend it)")
    p.set_defaults(func=cmd_ppo)

    p = sub.add_parser("pipeline", help="data check, SFT, RM, vanilla PPO and PPO-max, with a report")
    common(p)
    p.add_argument("--iterations", type=int, help="PPO iterations of both runs")
    p.add_argument("--reuse", action="store_true", help="skip stages whose summary.json exists in --out")
    p.set_defaults(func=cmd_pipeline)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    set_cpu_threads()
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as e:  # bad input (data.DataError is a ValueError): one line
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from e
    except RuntimeError as e:
        from .ppo.trainer import NonFiniteError  # imported only here: it pulls in torch and transformers

        if not isinstance(e, NonFiniteError):
            raise
        print(f"error: {e}", file=sys.stderr)  # the message names the checkpoint to resume from
        raise SystemExit(1) from e


if __name__ == "__main__":
    main()
