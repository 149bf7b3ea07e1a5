"""HH-RLHF on a real model: the RM and PPO stages of the ``gpu`` profile (notebook 05's support module).

The tiny profile's stages (``rm.train_rm``, ``ppo.trainer.run_ppo``) lean on the synthetic world: a gold
judge, reference answers, an SFT folder. Real HH-RLHF has none of these, so this module runs the same
math on HH pairs:

1. **data**: :func:`load_hh_pairs` reads HH-RLHF (hub or local JSONL) and skips the few rows the strict
   loader rejects; :func:`write_hh_layout` writes the pairs in our file layout (``prefs_*.jsonl``,
   ``prompts_*.jsonl``), which ``data.load_preference_pairs`` and ``data.load_prompts`` read back;
2. **formatting**: an instruct model expects its chat template, so HH turns become chat messages
   (:func:`model_prompt`); prompts are cut to the token budget from the left (RM pairs) or by whole
   earlier turns (PPO prompts);
3. **reward model**: :func:`train_rm_hh` trains the ``reward`` adapter with ``rm.rm_loss`` (paper Eq. 1-2);
4. **PPO-max**: :func:`build_hh_setup` and :func:`run_ppo_hh` drive ``ppo.trainer.PPOTrainer`` with no
   gold judge (``PPOSetup(gold_fn=None)``): the run reports the RM reward and the paper's monitors only.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from . import data as data_mod
from .data import ASSISTANT, HUMAN, DataError, PreferencePair
from .models import AdapterStack
from .ppo.config import PPOConfig
from .ppo.trainer import PPOSetup, PPOTrainer
from .profiles import GPUProfile, make_optimizer, resolve_optimizer
from .rm import collate_pairs, pair_accuracy, rm_loss
from .utils import MetricsLog, Stopwatch, progress, seed_everything, write_json

_TURN = re.compile(f"({re.escape(HUMAN)}|{re.escape(ASSISTANT)})")


# ----- 1. data ----------------------------------------------------------------------------------------
def _hh_rows(source: str | Path, split: str) -> Iterable[tuple[str, int, dict]]:
    """(label, 1-based row number, row) of a local HH file or folder (``{split}.jsonl[.gz]``) or a hub dataset."""
    local = Path(source).expanduser()
    if local.is_dir():
        found = [local / n for n in (f"{split}.jsonl", f"{split}.jsonl.gz") if (local / n).is_file()]
        if not found:
            raise FileNotFoundError(f"no {split}.jsonl or {split}.jsonl.gz in HH-RLHF directory {local}")
        local = found[0]
    if local.is_file():
        for lineno, row in data_mod._iter_jsonl(local):  # the strict loader's JSON checks
            yield str(local), lineno, row
        return
    if isinstance(source, Path) or str(source).startswith(("/", ".", "~")) or str(source).endswith(".jsonl"):
        raise FileNotFoundError(f"no such HH-RLHF file or directory: {source}")
    import datasets  # optional: pip install datasets (Colab has it)

    for index, item in enumerate(datasets.load_dataset(str(source), split=split)):
        yield f"{source}[{split}]", index + 1, dict(item)


def load_hh_pairs(source: str | Path, split: str = "train", limit: int | None = None
                  ) -> tuple[list[PreferencePair], Counter]:
    """HH-RLHF preference pairs from a hub id (``"Anthropic/hh-rlhf"``) or a local file/folder, skipping bad rows.

    Real HH-RLHF holds a few rows that :func:`rlhf_lite.data.load_hh_rlhf` rightly rejects (an empty final
    response, identical chosen and rejected, different prompts). A long run should skip them, not stop:
    this loader validates each row the same way, keeps up to ``limit`` good pairs, and returns a Counter
    of the reasons it skipped rows for. Raises DataError if no row is usable.
    """
    pairs: list[PreferencePair] = []
    skipped: Counter = Counter()
    label = str(source)
    for label, lineno, row in _hh_rows(source, split):
        try:
            data_mod._check_required(row, data_mod._PAIR_KEYS, label, lineno)
            pairs.append(data_mod._row_to_pair(row, label, lineno))
        except DataError as e:
            skipped[_reason_kind(e.reason)] += 1
            continue
        if limit is not None and len(pairs) >= limit:
            break
    if not pairs:
        raise DataError(f"no usable HH-RLHF rows (skipped: {dict(skipped)})", label)
    return pairs, skipped


def _reason_kind(reason: str) -> str:
    """A short category of a DataError reason, for counting skipped rows."""
    for key, kind in (("is empty", "empty response"), ("identical", "identical responses"),
                      ("different prompts", "different prompts"), ("Human turn", "ends with a Human turn"),
                      ("no '", "no Assistant turn"), ("does not start", "bad start"), ("key", "missing field")):
        if key in reason:
            return kind
    return "other"


def write_hh_layout(train: Sequence[PreferencePair], test: Sequence[PreferencePair], out_dir: str | Path
                    ) -> dict[str, Path]:
    """Write HH pairs in our data layout; returns the paths by name.

    ``prefs_{train,test}.jsonl``: ``{"prompt", "chosen", "rejected"}`` with full transcripts, as HH-RLHF
    and the world's files have them; ``prompts_{train,test}.jsonl``: the unique prompts
    (:func:`rlhf_lite.data.hh_rows_to_prompts`), PPO's prompt source.
    """
    import json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, pairs in (("train", train), ("test", test)):
        rows = [{"prompt": p.prompt, "chosen": p.prompt + p.chosen, "rejected": p.prompt + p.rejected}
                for p in pairs]
        for name, items in ((f"prefs_{split}", rows), (f"prompts_{split}", data_mod.hh_rows_to_prompts(pairs))):
            paths[name] = out / f"{name}.jsonl"
            paths[name].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in items))
    return paths


# ----- 2. formatting ----------------------------------------------------------------------------------
def hh_messages(prompt: str) -> list[dict[str, str]]:
    """An HH prompt (``"\\n\\nHuman: ...\\n\\nAssistant:"``) as chat messages, without the open last turn."""
    parts = _TURN.split(prompt)[1:]  # [marker, text, marker, text, ...]
    roles = {HUMAN: "user", ASSISTANT: "assistant"}
    msgs = [{"role": roles[m], "content": t.strip()} for m, t in zip(parts[::2], parts[1::2])]
    if not msgs or msgs[-1] != {"role": "assistant", "content": ""}:
        raise ValueError(f"not an HH prompt ending with {ASSISTANT!r}: {prompt[-60:]!r}")
    return msgs[:-1]


def model_prompt(tok: PreTrainedTokenizerBase, prompt: str) -> str:
    """The text the model sees: the chat template applied to the HH turns when the tokenizer has one
    (instruct models end their answers with the template's end-of-turn token, which is their EOS);
    the HH text itself otherwise (the tiny world model was trained on it)."""
    if not getattr(tok, "chat_template", None):
        return prompt
    return tok.apply_chat_template(hh_messages(prompt), tokenize=False, add_generation_prompt=True)


def model_response(tok: PreTrainedTokenizerBase, response: str) -> str:
    """HH responses start with a space (after ``"Assistant:"``); a chat template wants none."""
    return response.strip() if getattr(tok, "chat_template", None) else response


def encode_hh_example(tok: PreTrainedTokenizerBase, prompt: str, response: str, max_len: int
                      ) -> tuple[list[int], list[int]]:
    """Token ids of ``prompt + response + EOS`` in at most ``max_len`` tokens, and the response mask.

    The response keeps at most ``max_len // 2`` tokens (then EOS, which the RM reads); the prompt keeps its
    LAST tokens, as many as still fit: the turn being answered matters most.
    """
    p = tok(model_prompt(tok, prompt), add_special_tokens=False)["input_ids"]
    r = tok(model_response(tok, response), add_special_tokens=False)["input_ids"][: max_len // 2 - 1]
    r = r + [tok.eos_token_id]
    p = p[max(0, len(p) - (max_len - len(r))):]
    return p + r, [0] * len(p) + [1] * len(r)


def fit_prompt(tok: PreTrainedTokenizerBase, prompt: str, max_tokens: int) -> str | None:
    """The model prompt of ``prompt`` after dropping its earliest exchanges until it fits ``max_tokens``.

    Whole turns are dropped (not tokens) so the policy always sees a well-formed conversation; None when
    even the last Human turn alone is too long.
    """
    starts = [m.start() for m in re.finditer(re.escape(HUMAN), prompt)]
    for s in starts:
        text = model_prompt(tok, prompt[s:])
        if len(tok(text, add_special_tokens=False)["input_ids"]) <= max_tokens:
            return text
    return None


def last_user_turn(text: str) -> str:
    """The last user message of an HH prompt or a ChatML-templated one (Qwen), for tables of samples."""
    if HUMAN in text:
        return text.rsplit(HUMAN, 1)[1].replace(ASSISTANT, "").strip()
    if "<|im_start|>user" in text:
        return text.rsplit("<|im_start|>user", 1)[1].split("<|im_end|>", 1)[0].strip()
    return text.strip()


def prepare_prompts(tok: PreTrainedTokenizerBase, prompts: Iterable[str], max_tokens: int) -> list[str]:
    """Model prompts of HH ``prompts`` that fit ``max_tokens`` (see :func:`fit_prompt`); unfit ones dropped."""
    return [t for t in (fit_prompt(tok, p, max_tokens) for p in prompts) if t is not None]


# ----- 3. the reward model ----------------------------------------------------------------------------
@dataclass(frozen=True)
class HHRMConfig:
    """Settings of reward-model training on HH pairs (a real model's ``reward`` adapter)."""

    steps: int = 100
    """Optimizer steps (each a batch of preference pairs)."""
    batch_size: int = 4
    """Preference pairs per step."""
    lr: float = 1e-4
    """Learning rate of the reward adapter and head (no weight decay; linear warm-up then constant)."""
    warmup_steps: int = 10
    """Linear warm-up steps."""
    max_len: int = 384
    """Tokens per side of a pair; longer ones lose prompt tokens from the left."""
    lm_coef: float | None = None
    """beta_rm of paper Eq. 2 (LM loss on chosen responses); None, as in the paper's released script."""
    eval_every: int = 25
    """Steps between train/test accuracy measurements."""
    n_eval_pairs: int = 128
    """Pairs of each split in those measurements (the final test accuracy uses every test pair)."""
    eval_batch_size: int = 16
    """Pairs per no-grad scoring pass."""
    optimizer: str = "auto"
    """See :func:`rlhf_lite.profiles.make_optimizer`."""
    seed: int = 0
    """Seed of batch order."""

    @classmethod
    def from_profile(cls, profile: GPUProfile, **changes) -> HHRMConfig:
        """The RM settings of ``profile``; ``changes`` override fields."""
        base = {"steps": profile.rm_steps, "batch_size": profile.rm_batch_size, "lr": profile.rm_lr,
                "max_len": profile.max_len, "optimizer": profile.optimizer}
        return cls(**{**base, **changes})

    def validate(self) -> None:
        """Fail before training on impossible values, naming the field."""
        for name in ("steps", "batch_size", "lr", "max_len", "eval_every", "n_eval_pairs", "eval_batch_size"):
            if not getattr(self, name) > 0:
                raise ValueError(f"HHRMConfig.{name} must be positive, got {getattr(self, name)}")


def encode_hh_pairs(tok: PreTrainedTokenizerBase, pairs: Sequence[PreferencePair], max_len: int
                    ) -> list[tuple[list[int], list[int], list[int], list[int]]]:
    """(chosen ids, mask, rejected ids, mask) per pair; pairs that truncation made identical are dropped."""
    out = []
    for p in pairs:
        c, cm = encode_hh_example(tok, p.prompt, p.chosen, max_len)
        r, rm = encode_hh_example(tok, p.prompt, p.rejected, max_len)
        if c != r:
            out.append((c, cm, r, rm))
    return out


def train_rm_hh(stack: AdapterStack, tok: PreTrainedTokenizerBase, train: Sequence[PreferencePair],
                test: Sequence[PreferencePair], cfg: HHRMConfig, out_dir: str | Path) -> dict:
    """Train the ``reward`` adapter and head on HH pairs with the pairwise loss (paper Eq. 1-2).

    Writes ``metrics.jsonl`` (loss, batch accuracy and margin per step; train/test accuracy every
    ``eval_every`` steps), ``test_margins.npy`` (r_chosen - r_rejected of every test pair, paper Fig. 2),
    ``adapter/`` and ``summary.json``; returns the summary.
    """
    cfg.validate()
    timer = Stopwatch()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    rng = random.Random(cfg.seed)
    train_enc, test_enc = encode_hh_pairs(tok, train, cfg.max_len), encode_hh_pairs(tok, test, cfg.max_len)
    if not train_enc or not test_enc:
        raise ValueError("no usable pairs after truncation to max_len")
    eval_train = rng.sample(train_enc, min(cfg.n_eval_pairs, len(train_enc)))
    eval_test = test_enc[: cfg.n_eval_pairs]
    device = stack.device
    opt = make_optimizer(stack.adapter_parameters("reward"), cfg.lr, cfg.optimizer, device)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup_steps))

    def accuracy(enc) -> float:
        stack.eval()
        with stack.activate("reward"):
            acc, _ = pair_accuracy(stack, enc, tok.pad_token_id, batch_size=cfg.eval_batch_size)
        stack.train()
        return acc

    log = MetricsLog(out / "metrics.jsonl")
    order: list[int] = []
    stack.train()
    for step in progress(range(1, cfg.steps + 1), "reward model (HH)"):
        if len(order) < cfg.batch_size:  # epochs of shuffled pairs
            order += rng.sample(range(len(train_enc)), len(train_enc))
        batch = [train_enc[i] for i in order[: cfg.batch_size]]
        del order[: cfg.batch_size]
        ids, att, lm = (t.to(device) for t in collate_pairs(batch, tok.pad_token_id))
        loss, stats = rm_loss(stack, ids, att, lm, cfg.lm_coef)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        row = {"step": step, **stats}
        if step % cfg.eval_every == 0 or step == cfg.steps:
            row["train_accuracy"], row["test_accuracy"] = accuracy(eval_train), accuracy(eval_test)
        log.log(row)
    log.close()
    stack.eval()
    with stack.activate("reward"):
        test_acc, margins = pair_accuracy(stack, test_enc, tok.pad_token_id, batch_size=cfg.eval_batch_size)
    np.save(out / "test_margins.npy", margins)
    stack.save_adapter("reward", out / "adapter")
    summary = {
        "stage": "rm_hh", "config": asdict(cfg), "train_pairs": len(train_enc), "test_pairs": len(test_enc),
        "test_accuracy": test_acc, "final_train_accuracy": log.rows[-1]["train_accuracy"],
        "mean_test_margin": float(np.mean(margins)), "wall_seconds": timer(),
    }
    write_json(out / "summary.json", summary)
    return summary


# ----- 4. PPO-max -------------------------------------------------------------------------------------
def build_hh_setup(stack: AdapterStack, tok: PreTrainedTokenizerBase, profile: GPUProfile, cfg: PPOConfig,
                   train_prompts: Iterable[str], test_prompts: Iterable[str],
                   demonstrations: Sequence[PreferencePair] = ()) -> PPOSetup:
    """A :class:`PPOSetup` for HH prompts on ``stack``, whose ``reward`` adapter is already trained.

    Prompts become model prompts of at most ``profile.max_prompt_tokens`` tokens; the ptx term (PPO-max #8)
    uses the chosen responses of ``demonstrations`` as SFT data; the critic starts as the RM when
    ``cfg.critic_init == "rm"`` (PPO-max #4). There is no gold judge for HH: ``gold_fn`` is None.
    """
    train = prepare_prompts(tok, train_prompts, profile.max_prompt_tokens)
    test = prepare_prompts(tok, test_prompts, profile.max_prompt_tokens)
    if len(train) < cfg.rollout_batch:
        raise ValueError(f"only {len(train)} training prompts fit {profile.max_prompt_tokens} tokens; "
                         f"a rollout needs {cfg.rollout_batch}")
    demos = [encode_hh_example(tok, d.prompt, d.chosen, profile.max_len) for d in demonstrations] \
        if cfg.ptx_coef else []
    if cfg.critic_init == "rm":
        stack.copy_adapter("reward", "critic")
    return PPOSetup(stack, tok, train, test, demos, gold_fn=None)  # no gold judge: no gold metrics


def run_ppo_hh(cfg: PPOConfig, setup: PPOSetup, out_dir: str | Path, preset: str = "ppo_max",
               optimizer: str = "auto") -> dict:
    """Run PPO on an HH setup; writes what ``run_ppo`` writes (metrics.jsonl, summary.json, samples, plot).

    ``optimizer`` (see :func:`rlhf_lite.profiles.make_optimizer`) replaces the trainer's torch Adam on CUDA.
    """
    cfg.validate()
    trainer = PPOTrainer(cfg, setup, out_dir, preset)
    if resolve_optimizer(optimizer, trainer.device) != "adam":
        trainer.policy_opt = make_optimizer(trainer.policy_params, cfg.policy_lr, optimizer, trainer.device,
                                            cfg.adam_betas)
        trainer.critic_opt = make_optimizer(trainer.critic_params, cfg.critic_lr, optimizer, trainer.device,
                                            cfg.adam_betas)
    return trainer.train()
