"""What a stage was made from, recorded in its summary (and a PPO checkpoint), and compared by name.

Every stage's ``summary.json["provenance"]`` holds the fingerprints of its inputs (the SFT model, the reward
model, the data: sha256 of their files), its seed, its config and the model and LoRA settings. ``ppo
--resume`` and ``pipeline --reuse`` compare it with what they are about to do and name each difference,
so that two runs are never spliced into one and reported as one. A fingerprint compares by content: a
folder that moved (same sha256, another path) is the same input.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .settings import to_dict
from .stage import data_fingerprint, model_fingerprint

LOCATIONS = frozenset({"path", "policy_base"})
"""Keys that say where an input lives rather than what it is: not compared."""
_MISSING = object()


def _show(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


def _fingerprint(value: Any) -> bool:
    return isinstance(value, dict) and "sha256" in value


def differences(recorded: dict, current: dict, then: str = "then", now: str = "now", prefix: str = "") -> list[str]:
    """One ``"name: X then, Y now"`` line per difference between two provenance records (nested dicts are
    compared field by field, fingerprints by their sha256, locations not at all)."""
    recorded, current = json.loads(json.dumps(recorded)), json.loads(json.dumps(current))
    out: list[str] = []
    for key in sorted(set(recorded) | set(current)):
        if key in LOCATIONS:
            continue
        a, b, name = recorded.get(key, _MISSING), current.get(key, _MISSING), f"{prefix}{key}"
        if a is _MISSING:
            out.append(f"{name}: not recorded {then} (a run of an older version), {_show(b)} {now}")
        elif b is _MISSING:
            out.append(f"{name}: {_show(a)} {then}, not given {now}")
        elif _fingerprint(a) and _fingerprint(b):
            if a["sha256"] != b["sha256"]:
                out.append(f"{name}: {a.get('path')} (sha256 {a['sha256']}) {then}, {b.get('path')} (sha256 "
                           f"{b['sha256']}) {now}")
        elif isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, then, now, f"{name}.")
        elif a != b:
            out.append(f"{name}: {_show(a)} {then}, {_show(b)} {now}")
    return out


def sft_provenance(cfg, profile, data_dir: str | Path) -> dict:
    """What an SFT stage is made from: the data, its seed and config, the model settings."""
    return {"data": data_fingerprint(data_dir), "seed": cfg.seed, "config": to_dict(cfg),
            "model": to_dict(profile.model)}


def rm_provenance(cfg, profile, sft_model: str | Path, data_dir: str | Path) -> dict:
    """What an RM stage is made from: the SFT model, the data, its seed and config, model and LoRA settings."""
    return {"sft_model": model_fingerprint(sft_model), "data": data_fingerprint(data_dir), "seed": cfg.seed,
            "config": to_dict(cfg), "model": to_dict(profile.model), "lora": to_dict(profile.lora)}


def recorded(summary_path: Path) -> dict:
    """The provenance a stage folder's summary.json records (ValueError naming the file when it is unusable)."""
    from .utils import read_json

    prov = read_json(summary_path).get("provenance")
    if isinstance(prov, dict):
        return prov
    raise ValueError(f"{summary_path} records no provenance (not a run of this version of rlhf_lite)")


__all__ = ["LOCATIONS", "differences", "recorded", "rm_provenance", "sft_provenance"]
