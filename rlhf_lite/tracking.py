"""Watching runs: every stage's metrics also go to TensorBoard (and, when asked for, to Weights & Biases).

:class:`~rlhf_lite.utils.MetricsLog` writes ``metrics.jsonl`` and hands each row to a :class:`RowTracker`,
which writes TensorBoard event files into the same folder, so ``tensorboard --logdir runs/`` shows every
stage of every run (named by its folder: ``tiny/sft``, ``tiny/ppo_max``...). Each number of a row becomes
one scalar whose tag ends in the row's own key (:func:`tag_for`, the mapping documented in the README):

* ``gold/``: the gold measurement (``gold_score``, ``train_gold_score``, ``eval_response_length``, and the
  per-category keys, which already read ``gold/<category>``; in SFT rows also ``response_length``);
* ``monitors/``: the paper's monitors of a PPO (or GRPO) run (docs/paper.md Sec. 4): length, KL,
  perplexities, finished and repetition fractions;
* ``ppo/``, ``rm/``, ``dpo/``, ``grpo/``, ``bon/``: everything else of a row of that stage (reward, losses,
  clip fractions, accuracies...);
* an SFT row's phase (``pretrain/``, ``sft/``): its loss and learning rate;
* ``events/<event>`` (text): event rows (a skipped non-finite step or rolled-back update, a detected
  collapse, the settings a resume changed, as JSON); strings of a row go in as text too, and so do sample
  tables (``samples/...``).

The step is the row's ``iteration`` (PPO, GRPO) or ``step`` (SFT, RM, DPO); rows without either are counted. Scalars are written in double precision,
so the event files hold exactly the values of metrics.jsonl. Which trackers run is the environment
variable ``RLHF_LITE_TRACKERS``: a comma-separated list of ``tensorboard`` (the default), ``wandb`` and
``none``. TensorBoard needs the ``tensorboard`` package (in requirements-dev.txt); W&B needs ``wandb`` and
an account (project from ``WANDB_PROJECT``, default ``rlhf_lite``). Neither is required: without the
package the default prints one line and metrics.jsonl is written as always.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

TRACKERS_ENV = "RLHF_LITE_TRACKERS"
KNOWN = ("tensorboard", "wandb", "none")
EVENT_GLOB = "events.out.tfevents.*"

GOLD = frozenset({"gold_score", "train_gold_score", "eval_response_length"})
MONITORS = frozenset({"response_length", "kl_per_token", "kl_per_sequence", "kl_k3_per_token", "policy_perplexity",
                      "ref_perplexity", "finished_fraction", "repetition_fraction"})
MONITORED = ("ppo", "grpo")  # stages that sample rollouts: their monitors share one group
STEP_KEYS = ("iteration", "step")
GROUP_KEY = "phase"  # an SFT row's phase names its group


def tag_for(key: str, stage: str, group: str | None = None) -> str:
    """The TensorBoard tag of metrics key ``key`` in a row of ``stage`` ("ppo", "rm", "sft"...) whose group is
    ``group`` (an SFT row's phase; default: the stage). The tag always ends in the key itself."""
    if "/" in key:  # already grouped (gold/<category>)
        return key
    if key in GOLD or (stage == "sft" and key == "response_length"):  # SFT rows: the evaluation's length
        return f"gold/{key}"
    if stage in MONITORED and key in MONITORS:
        return f"monitors/{key}"
    return f"{group or stage}/{key}"


def split_row(row: dict, stage: str) -> tuple[int | None, dict[str, float], dict[str, str]]:
    """A metrics row as (step, {tag: number}, {tag: text}); booleans count as 0/1, None (NaN) is left out."""
    step = next((row[k] for k in STEP_KEYS if isinstance(row.get(k), int)), None)
    if "event" in row:
        text = "; ".join(f"{k}: {v if isinstance(v, str) else json.dumps(v, sort_keys=True)}"
                         for k, v in row.items() if k not in ("event", *STEP_KEYS))
        return step, {}, {f"events/{row['event']}": text or str(row["event"])}
    group = row.get(GROUP_KEY) if isinstance(row.get(GROUP_KEY), str) else None
    scalars, texts = {}, {}
    for key, value in row.items():
        if key in STEP_KEYS or key == GROUP_KEY or value is None:
            continue
        if isinstance(value, (bool, int, float)):
            scalars[tag_for(key, stage, group)] = float(value)
        elif isinstance(value, str):
            texts[tag_for(key, stage, group)] = value
    return step, scalars, texts


def samples_markdown(rows: Sequence[dict]) -> str:
    """A markdown table of sample rows (their keys as columns, "|" and newlines escaped) for a text summary."""
    if not rows:
        return ""
    keys = [k for k in rows[0] if k != "iteration"]

    def cell(v: object) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


class Tracker(Protocol):
    """Where a stage's metrics go besides metrics.jsonl."""

    def scalars(self, step: int, values: dict[str, float]) -> None: ...

    def text(self, step: int, tag: str, text: str) -> None: ...

    def close(self) -> None: ...


class TensorBoardTracker:
    """Event files in ``folder``. A fresh log (``fresh``) deletes the folder's old event files, as metrics.jsonl
    is overwritten; a resumed one passes ``purge_step`` (the first step it logs again), so TensorBoard hides
    what an earlier process logged from that step on (the rows :func:`~rlhf_lite.ppo.checkpoint.trim_metrics`
    drops from metrics.jsonl). Every log opens with a session start (a fresh one at step 0): TensorBoard takes
    the first start it reads for the beginning and each later one for a restart."""

    def __init__(self, folder: Path, fresh: bool, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        if fresh:
            for old in folder.glob(EVENT_GLOB):
                old.unlink()
        self.writer = SummaryWriter(log_dir=str(folder), purge_step=purge_step or 0, flush_secs=10)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step, new_style=True, double_precision=True)

    def text(self, step: int, tag: str, text: str) -> None:
        self.writer.add_text(tag, text, step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run per stage folder, resumed with the folder (its id is kept in ``folder/wandb_run_id``)."""

    def __init__(self, folder: Path, fresh: bool, stage: str) -> None:
        import wandb

        id_file = folder / "wandb_run_id"
        run_id = id_file.read_text().strip() if not fresh and id_file.is_file() else wandb.util.generate_id()
        id_file.write_text(run_id + "\n")
        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "rlhf_lite"), name=str(folder), id=run_id,
                              resume="allow", dir=str(folder), job_type=stage)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def text(self, step: int, tag: str, text: str) -> None:
        self.run.log({tag: self.wandb.Html(f"<pre>{text}</pre>")}, step=step)

    def close(self) -> None:
        self.run.finish()


_warned_missing = False


def requested() -> tuple[list[str], bool]:
    """The trackers ``RLHF_LITE_TRACKERS`` names (default: tensorboard) and whether it was set; ValueError
    naming the variable on an unknown name."""
    raw = os.environ.get(TRACKERS_ENV)
    names = [n.strip().lower() for n in (raw if raw is not None else "tensorboard").split(",") if n.strip()]
    unknown = [n for n in names if n not in KNOWN]
    if unknown:
        raise ValueError(f"{TRACKERS_ENV}={raw!r}: unknown tracker {unknown[0]!r}; choose from {', '.join(KNOWN)}")
    return [n for n in names if n != "none"], raw is not None


def _available(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def check_trackers() -> list[str]:
    """The trackers a stage will open: fail (ValueError, before any model loads) on an unknown name or an
    explicitly requested tracker whose package is missing; the default TensorBoard, when missing, is left
    out with one line on stderr."""
    global _warned_missing
    names, explicit = requested()
    missing = [n for n in names if not _available(n)]
    if missing and explicit:
        raise ValueError(f"{TRACKERS_ENV} asks for {missing[0]}, but the {missing[0]!r} package is not installed "
                         f"(pip install {missing[0]})")
    if missing and not _warned_missing:
        _warned_missing = True
        print("rlhf_lite: no TensorBoard event files (pip install tensorboard to get them); metrics.jsonl is "
              f"written as always ({TRACKERS_ENV}=none silences this)", file=sys.stderr)
    return [n for n in names if n not in missing]


class RowTracker:
    """Feeds metrics rows to the trackers of :func:`check_trackers`, tagged by :func:`split_row`."""

    def __init__(self, folder: str | Path, stage: str, fresh: bool = True, purge_step: int | None = None) -> None:
        self.stage, folder = stage, Path(folder)
        self.trackers: list[Tracker] = []
        self._auto_step = 0
        for name in check_trackers():
            if name == "tensorboard":
                self.trackers.append(TensorBoardTracker(folder, fresh, purge_step))
            else:
                self.trackers.append(WandbTracker(folder, fresh, stage))

    def row(self, row: dict) -> None:
        step, scalars, texts = split_row(row, self.stage)
        if step is None:  # a row without an iteration or step: count rows
            step = self._auto_step
        self._auto_step = step + 1
        for t in self.trackers:
            if scalars:
                t.scalars(step, scalars)
            for tag, text in texts.items():
                t.text(step, tag, text)

    def text(self, step: int, tag: str, text: str) -> None:
        for t in self.trackers:
            t.text(step, tag, text)

    def close(self) -> None:
        for t in self.trackers:
            t.close()
        self.trackers = []


__all__ = ["GOLD", "MONITORS", "TRACKERS_ENV", "RowTracker", "TensorBoardTracker", "WandbTracker", "check_trackers",
           "requested", "samples_markdown", "split_row", "tag_for"]
