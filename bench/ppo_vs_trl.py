"""PPO throughput and peak memory: rlhf_lite's ``PPOTrainer`` against TRL's PPO trainer, same config.

    .venv/bin/pip install -r requirements-bench.txt -c requirements.txt   # once: trl==1.12.0, datasets
    .venv/bin/python bench/ppo_vs_trl.py --reps 5                # tiny model; ~4 minutes, idle 2-core CPU
    .venv/bin/python bench/ppo_vs_trl.py --trl-peft              # TRL's policy as a LoRA adapter instead
    .venv/bin/python bench/ppo_vs_trl.py --model smol --reps 3   # SmolLM2-135M-Instruct, fp32, LoRA policy
    .venv/bin/python bench/ppo_vs_trl.py --overlap --reps 5      # rlhf_lite workers=2 vs workers=1

TRL is a benchmark-only dependency (requirements-bench.txt); trl 1.12.0 is the last release with a PPO
trainer (``trl.experimental.ppo``). The install above leaves every pin of requirements.txt as it is.

What runs. Each repetition runs one worker process per framework, alternating (rlhf_lite, TRL, rlhf_lite,
TRL, ...; ``--reps`` of each, default 3): ``python bench/ppo_vs_trl.py --worker rlhf_lite|trl ...``. A
worker builds its models, runs ``--warmup`` PPO iterations (default 1, untimed: first-call costs), then
``--iters`` timed iterations (default 4), and prints one JSON line back. An iteration is a full PPO
iteration: rollout of ``rollout_batch`` prompts, scoring (reference log-probs, values, reward-model
score), reward shaping and GAE, then ``ppo_epochs`` epochs of minibatch updates of policy and critic.
Throughput is prompts processed per second of timed iterations (``rollout_batch * iters / seconds``);
the reported figure is the median over repetitions.

* rlhf_lite: ``PPOTrainer(cfg, PPOSetup(...), out_dir).step()`` as the training loop calls it; timed
  from before the first timed ``step()`` to after the last. Its design: one base model with LoRA
  adapters policy, critic and reward (and value/score heads), the reference = adapters disabled.
  ``PPOSetup.judge=None`` (no gold judge in the timed work), ``gold_every``/``sample_every`` huge
  and no checkpoints, so no evaluation runs inside the timed iterations.
* TRL: ``trl.experimental.ppo.PPOTrainer(...).train()`` for ``warmup + iters`` iterations
  (``total_episodes = rollout_batch * (warmup + iters)``), timed by a ``TrainerCallback`` between the
  ends of the last warm-up and the last timed iteration (``on_step_end``). Its idiomatic arrangement
  of the same base config: policy and reference model (``LlamaForCausalLM``), value and reward model
  (``AutoModelForSequenceClassification``, ``num_labels=1``), all built from the same ``LlamaConfig``;
  policy and value model fully fine-tuned. With ``--trl-peft`` the policy is instead a LoRA adapter
  (``peft_config``, the same LoRA settings) and ``ref_model=None`` (TRL disables the adapter for the
  reference); TRL keeps the value model fully fine-tuned and the reward model a separate model either way.

``--model smol``: the same comparison at real scale, on SmolLM2-135M-Instruct (fetched into the cache as
the smol profile does, :func:`rlhf_lite.fetch.fetch_model`): fp32 on both sides, the prompts in its chat
template with an empty system message (as the smol profile sends them), and a LoRA policy on both sides
(``--trl-peft`` is implied: TRL's value model is then a fully trained ``AutoModelForSequenceClassification``
of the same checkpoint with a fresh score head, its reward model another). Defaults: rollout_batch 16,
minibatch 8, 2 timed iterations, 3 sampling repetitions (``MODEL_DEFAULTS``). The never-EOS trick works
the same way: the added token gets id 49152, outside SmolLM2's 49,152-token vocabulary.

``--overlap`` measures one design choice of rlhf_lite instead: ``PPOTrainer(workers=2)`` (policy and critic
minibatch steps in two threads) against ``workers=1``, alternating, median and range of ``--reps`` each.

Matched on both sides:

* model: rlhf_lite's tiny-profile Llama, ``build_tiny_model`` with ``TinyModelConfig()`` (128 wide,
  3 layers, 4 heads, 384 MLP, tied embeddings; ``--hidden-size`` etc. to change it), random init, fp32,
  no gradient checkpointing (TRL's default of True is switched off: the tiny profile does not use it);
  the world tokenizer (data/tokenizer.json, 244 tokens); LoRA ``LoraSettings()`` (r 16, alpha 32, all
  seven linear layers) wherever LoRA is used;
* prompts: the same ``rollout_batch`` prompts of data/prompts_train.jsonl (a seeded sample), which
  every iteration uses in full (in its own shuffled order): both sides see the same left-padded prompt
  length P in every iteration;
* batch: ``rollout_batch`` (default 64) = TRL's batch per step (``per_device_train_batch_size``, one
  process, ``gradient_accumulation_steps=1``); minibatch ``minibatch_size`` (default 32), i.e. TRL's
  ``num_mini_batches = rollout_batch / minibatch_size`` (2), one optimizer step per minibatch;
  ``ppo_epochs`` (default 2) = TRL's ``num_ppo_epochs``; rollouts in one generation batch (TRL's
  ``local_rollout_forward_batch_size = rollout_batch``);
* response length: exactly ``max_new_tokens`` (default 24) new tokens for every prompt. TRL:
  ``response_length=N`` with no stop token (``stop_token=None``), so ``generate`` never stops early.
  rlhf_lite: the tokenizer handed to the trainer has its EOS set to an added token whose id (244) lies
  outside the model's 244-token vocabulary, so the sampler can never emit EOS and every response runs
  to ``max_new_tokens`` (``PPOTrainer`` passes ``tokenizer.eos_token_id`` to the sampler; nothing in
  rlhf_lite is patched). Both are checked in every worker: rlhf_lite's mean response length must equal
  N with no finished response; every sequence TRL's value model sees must be P + N tokens long. (A
  sampled pad token still ends a response for TRL's masks, by its convention; tensor shapes, and so
  the computation, stay the same);
* sampling: temperature 1.0, no top-k, no top-p;
* PPO math: KL penalty coefficient 0.05 (``--kl-coef``) and value clip 0.2, TRL's defaults, set in
  rlhf_lite's ``PPOConfig`` (otherwise its vanilla preset: no reward/advantage normalization, no
  gradient clipping, no ptx loss, no critic pre-training); clip range 0.2, gamma 1, lambda 0.95
  (the defaults of both);
* threads: ``torch.set_num_threads(--threads)`` (default 2) and OMP/MKL_NUM_THREADS in every worker;
  no GPU.

Not matched (each framework's own choices, cheap at this size): optimizers (rlhf_lite: two torch Adam,
lr 1e-3; TRL: one AdamW, TRL's ``adamw_torch_fused`` default, lr 3e-6, linear decay), advantage
whitening (TRL always), the per-iteration statistics each logs, and TRL's ``gc.collect()`` calls.
Learning rates do not change the amount of computation.

Fairness caveats. The arrangements differ by design, and that difference is what is measured: TRL's
default trains all weights of policy and value model (a full backward through every matrix, AdamW over
2x the base's parameters) and holds four models; rlhf_lite trains LoRA adapters on one base. With
``--trl-peft`` TRL's policy is LoRA too, but its value model is still fully trained. At this model size
per-call Python overhead (TRL's accelerate wrappers, logging and ``gc.collect()``) weighs more than it
would on a real model. Both use the same cores: rlhf_lite's trainer runs its policy and critic minibatch
steps in two threads with ``threads / 2`` intra-op threads each (``rlhf_lite.parallel``), so it never
has more busy threads than ``--threads``. The machine must be otherwise idle: with
``--threads 2`` on a 2-core CPU that another process uses, timings can be tens of times slower and
meaningless. The driver measures how busy the CPU is (/proc/stat, over one second) before the first and
after the last worker, reports both, and warns when other processes used more than a fifth of it.

Peak memory: the kernel's peak resident set of each worker process (``VmHWM`` in /proc/self/status,
which counts from the worker's exec). Not ``getrusage(RUSAGE_SELF).ru_maxrss``: on Linux a child
process inherits the RSS high-water mark of the process it was forked from, so every worker's ru_maxrss
would be at least its parent's RSS (measured here; it is used only where /proc is missing). Each
repetition is its own process, so one framework's peak never includes the other's. Also reported: the
RSS right after the worker's imports (TRL's worker imports trl, datasets, pandas and pyarrow too) and
the peak above it. At the default model size (0.7M parameters, under 3 MB per model copy) the peak is
library code, allocator and activation buffers, not weights: the memory ratio says little about how the
two arrangements scale with model size (bench/memory.py measures that).

Sampling: one more worker times rlhf_lite's rollout sampler ``rlhf_lite.generation.sample`` (what
``PPOTrainer.rollout`` calls) against a bare ``model.generate(do_sample=True, max_new_tokens=N,
min_new_tokens=N, temperature=1.0, top_k=0, top_p=1.0)`` on the same model (the policy adapter's
merged-weight view that ``PPOTrainer.rollout`` samples from, ``AdapterStack.causal_lm("policy")``),
batch (the same prompts) and N; also ``generate`` with ``output_scores=True``, as TRL calls it to get
the log-probs ``sample`` returns. Median of ``--gen-reps`` alternating calls after one warm-up call
each; the ratio ``sample_s / generate_s`` has a goal of at most 1.3.

Output: human-readable lines, then as the last line one JSON object: ``rlhf_lite_samples_per_s``,
``trl_samples_per_s``, ``speedup`` (rlhf_lite / TRL), ``rlhf_lite_peak_mib``, ``trl_peak_mib``,
``memory_ratio`` (rlhf_lite / TRL), the same above imports, ``sample_s``, ``generate_s``,
``sampling_ratio``, per-repetition numbers, ``config`` (the matched settings) and ``machine``.
Write outputs (``--json-out``) under /tmp or runs/, not into the repository.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Before any Hugging Face import (they all happen lazily, inside the workers): offline, no telemetry,
# and no warning banner for TRL's experimental PPO module.
for _key in ("HF_HUB_DISABLE_TELEMETRY", "TRL_EXPERIMENTAL_SILENCE", "HF_HUB_OFFLINE"):
    os.environ.setdefault(_key, "1")

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    from rlhf_lite.models import LoraSettings, TinyModelConfig

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data"
RESULT_TAG = "BENCH_RESULT "  # a worker's result line on stdout: this tag, then JSON
NO_EOS_TOKEN = "<bench-no-eos>"  # the tokenizer's EOS in the bench: an id outside the model's vocabulary
NEVER = 10**9  # an interval (in iterations) that is never reached
WORKERS = ("rlhf_lite", "trl", "sampling")
FRAMEWORKS = ("rlhf_lite", "trl")

# (flag, type, default, help): the settings the driver hands to every worker.
CONFIG_OPTIONS: list[tuple[str, type, Any, str]] = [
    ("--model", str, "tiny", ("tiny (rlhf_lite's tiny Llama, random init) or smol (SmolLM2-135M-Instruct, "
                              "fetched into the cache like the smol profile's)")),
    ("--rollout-batch", int, None, "prompts per PPO iteration (TRL: per_device_train_batch_size)"),
    ("--minibatch-size", int, None, "rollouts per optimizer step (TRL: num_mini_batches = batch / this)"),
    ("--ppo-epochs", int, 2, "passes over each buffer (TRL: num_ppo_epochs)"),
    ("--max-new-tokens", int, 24, "new tokens of every response (TRL: response_length)"),
    ("--warmup", int, 1, "untimed PPO iterations at the start of each worker (at least 1)"),
    ("--iters", int, None, "timed PPO iterations per worker"),
    ("--threads", int, 2, "torch.set_num_threads and OMP/MKL_NUM_THREADS of every worker"),
    ("--workers", int, None, ("threads of rlhf_lite's policy/critic minibatch steps (PPOTrainer(workers=); "
                              "default: the trainer's own choice)")),
    ("--kl-coef", float, 0.05, "KL penalty coefficient (TRL's default; rlhf_lite's kl_coef)"),
    ("--seed", int, 0, "seed of the prompt sample, model init and sampling"),
    ("--gen-reps", int, None, "timed calls of each sampler in the sampling comparison"),
    ("--hidden-size", int, None, "model width (default: rlhf_lite's TinyModelConfig)"),
    ("--layers", int, None, "decoder blocks (default: TinyModelConfig)"),
    ("--heads", int, None, "attention heads (default: TinyModelConfig)"),
    ("--intermediate-size", int, None, "MLP width (default: TinyModelConfig)"),
    ("--lora-r", int, None, "LoRA rank (default: rlhf_lite's LoraSettings)"),
    ("--lora-alpha", int, None, "LoRA alpha (default: LoraSettings)"),
]


MODEL_DEFAULTS: dict[str, dict[str, int]] = {
    # tiny: the tiny profile's PPO batch; smol: the smol profile's (one iteration takes tens of seconds)
    "tiny": {"rollout_batch": 64, "minibatch_size": 32, "iters": 4, "gen_reps": 10},
    "smol": {"rollout_batch": 16, "minibatch_size": 8, "iters": 2, "gen_reps": 3},
}
"""Defaults of the options left unset, per ``--model``."""


# ----- memory readings (worker side) ----------------------------------------------------------------
def _status_mib(field: str) -> float | None:
    """A ``kB`` field of /proc/self/status in MiB; None where there is no /proc."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) / 1024 if match else None


def rss_mib() -> float:
    """Current resident set size of this process (NaN where there is no /proc)."""
    now = _status_mib("VmRSS")
    return now if now is not None else float("nan")


def peak_rss_mib() -> float:
    """Peak resident set size of this process since its exec (the module docstring says why not ru_maxrss)."""
    peak = _status_mib("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----- what both frameworks share ---------------------------------------------------------------------
@dataclass
class World:
    """The matched inputs of a worker: tokenizer, prompts, model and LoRA settings."""

    tokenizer: PreTrainedTokenizerFast
    vocab_size: int  # the model's vocabulary: the tokenizer's before NO_EOS_TOKEN was added
    model_eos_id: int  # the model's own EOS (the world's <eos>, SmolLM2's <|im_end|>), kept in its config
    prompts: list[str]  # raw HH prompts
    texts: list[str]  # what the model is given: the HH text (tiny) or its chat template (smol)
    prompt_len: int  # P: the longest prompt in tokens = the left-padded prompt length of every batch
    model_cfg: TinyModelConfig
    lora: LoraSettings
    folder: Path | None = None  # the pretrained model's folder (smol); None: the tiny model from a config

    @property
    def context(self) -> int:
        return 8192 if self.folder is not None else self.model_cfg.max_positions

    def describe(self) -> dict[str, Any]:
        """The matched settings, for the summary's ``config``."""
        lengths = [len(ids) for ids in self.tokenizer(self.texts, add_special_tokens=False)["input_ids"]]
        model = asdict(self.model_cfg) if self.folder is None else {"folder": str(self.folder)}
        return {"vocab_size": self.vocab_size, "prompt_tokens_padded": self.prompt_len,
                "prompt_tokens_min": min(lengths), "prompt_tokens_mean": statistics.mean(lengths),
                "model": model, "lora": {**asdict(self.lora), "target_modules": list(self.lora.target_modules)}}


def build_world(args: argparse.Namespace) -> World:
    """Tokenizer whose EOS can never be sampled, the prompt sample, and the model and LoRA settings."""
    from rlhf_lite.data import load_prompts
    from rlhf_lite.models import LoraSettings, TinyModelConfig
    from rlhf_lite.text import model_prompt

    folder = None
    if args.model == "smol":
        from rlhf_lite.fetch import fetch_model
        from rlhf_lite.loading import load_tokenizer_for

        folder = fetch_model("smollm2")
        tok = load_tokenizer_for(folder)
    else:
        from rlhf_lite.tokenizer import load_tokenizer

        tok = load_tokenizer(DATA / "tokenizer.json")
    rows = load_prompts(DATA / "prompts_train.jsonl")
    prompts = random.Random(args.seed).sample([r["prompt"] for r in rows], args.rollout_batch)
    texts = [model_prompt(tok, p, system_prompt=False) for p in prompts]  # the smol profile's prompt format
    vocab, eos = len(tok), tok.eos_token_id
    tok.add_special_tokens({"eos_token": NO_EOS_TOKEN})
    if tok.eos_token_id < vocab:
        raise RuntimeError(f"{NO_EOS_TOKEN} got id {tok.eos_token_id}, inside the model's vocabulary")
    prompt_len = max(len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"])
    model_changes = {"hidden_size": args.hidden_size, "num_layers": args.layers, "num_heads": args.heads,
                     "intermediate_size": args.intermediate_size}
    model_cfg = replace(TinyModelConfig(), **{k: v for k, v in model_changes.items() if v is not None})
    lora_changes = {"r": args.lora_r, "alpha": args.lora_alpha}
    lora = replace(LoraSettings(), **{k: v for k, v in lora_changes.items() if v is not None})
    world = World(tok, vocab, eos, prompts, texts, prompt_len, model_cfg, lora, folder)
    if prompt_len + args.max_new_tokens > world.context:
        raise ValueError(f"prompt ({prompt_len}) + response ({args.max_new_tokens}) tokens exceed the "
                         f"model's context ({world.context})")
    return world


def build_base(world: World, seed: int) -> LlamaForCausalLM:
    """The causal LM every model of both sides starts from: rlhf_lite's tiny Llama (random init, no download)
    or SmolLM2-135M-Instruct in fp32 (its pretrained weights; ``seed`` then plays no part)."""
    import torch
    from transformers import AutoModelForCausalLM

    from rlhf_lite.models import build_tiny_model

    if world.folder is not None:
        return AutoModelForCausalLM.from_pretrained(world.folder, dtype=torch.float32)
    return build_tiny_model(world.vocab_size, world.tokenizer.pad_token_id, world.model_eos_id,
                            world.model_cfg, seed)


def build_scalar_model(world: World, seed: int) -> Any:
    """A backbone with a fresh one-output score head (TRL's value and reward models), seeded."""
    import copy

    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    if world.folder is not None:
        return AutoModelForSequenceClassification.from_pretrained(world.folder, num_labels=1, dtype=torch.float32)
    head_cfg = copy.deepcopy(build_base(world, seed).config)
    head_cfg.num_labels = 1
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(head_cfg)


def count_params(modules: list[Any], optimizers: list[Any]) -> tuple[int, int]:
    """(held, trained) parameters: those of ``modules`` (None skipped) and those the optimizers update;
    a tensor shared by several modules counts once."""
    held = {id(p): p.numel() for m in modules if m is not None for p in m.parameters()}
    trained = {id(p): p.numel() for opt in optimizers for group in opt.param_groups for p in group["params"]}
    return sum(held.values()), sum(trained.values())


def describe_optimizer(opt: Any) -> str:
    """Class and settings of an optimizer (accelerate's wrapper unwrapped), for the record."""
    inner = getattr(opt, "optimizer", opt)
    group = inner.param_groups[0]
    flags = "".join(f", {k}" for k in ("fused", "foreach") if group.get(k))
    return f"{type(inner).__name__}(lr={group['lr']:g}, weight_decay={group.get('weight_decay', 0):g}{flags})"


def timing(ends: list[float], args: argparse.Namespace) -> dict[str, Any]:
    """Throughput of the timed iterations; ``ends[k]`` is the time iteration k + 1 ended."""
    timed = ends[args.warmup - 1:]
    seconds = timed[-1] - timed[0]
    return {"timed_s": seconds, "iteration_s": [b - a for a, b in itertools.pairwise(timed)],
            "samples_per_s": args.rollout_batch * args.iters / seconds}


# ----- the workers ----------------------------------------------------------------------------------
def run_rlhf_lite(args: argparse.Namespace, world: World) -> dict[str, Any]:
    """rlhf_lite's ``PPOTrainer.step()``: warm-up, then timed iterations."""
    from rlhf_lite.models import AdapterStack
    from rlhf_lite.ppo.config import PPOConfig
    from rlhf_lite.ppo.trainer import PPOSetup, PPOTrainer
    from rlhf_lite.text import Prompt

    stack = AdapterStack(build_base(world, args.seed), ["policy", "critic", "reward"], world.lora)
    prompts = [Prompt(raw, text) for raw, text in zip(world.prompts, world.texts)]
    setup = PPOSetup(stack, world.tokenizer, prompts, prompts, judge=None)  # no gold judge in the timed work
    cfg = replace(PPOConfig(), iterations=args.warmup + args.iters, rollout_batch=args.rollout_batch,
                  minibatch_size=args.minibatch_size, ppo_epochs=args.ppo_epochs,
                  max_new_tokens=args.max_new_tokens, temperature=1.0, top_p=1.0, kl_coef=args.kl_coef,
                  value_clip=0.2, clip_eps=0.2, gamma=1.0, lam=0.95, gold_every=NEVER, sample_every=NEVER,
                  checkpoint_every=0, seed=args.seed)
    cfg.validate(context_length=world.context)
    rows: list[dict[str, Any]] = []
    ends: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench_rlhf_lite_") as out:
        trainer = PPOTrainer(cfg, setup, out, preset="bench", workers=args.workers)
        for _ in range(cfg.iterations):
            rows.append(trainer.step())
            ends.append(time.perf_counter())
    for row in rows:
        if row["response_length"] != args.max_new_tokens or row["finished_fraction"] != 0:
            raise RuntimeError(f"rlhf_lite iteration {row['iteration']}: mean response length "
                               f"{row['response_length']} (finished {row['finished_fraction']}), expected "
                               f"{args.max_new_tokens} tokens in every response")
    total, trained = count_params([stack], [trainer.policy_opt, trainer.critic_opt])
    return {**timing(ends, args), "params_total": total, "params_trainable": trained,
            "optimizer": f"2 x {describe_optimizer(trainer.policy_opt)} (policy, critic)",
            "skipped_updates": int(sum(r["skipped_updates"] for r in rows)),
            "arrangement": "one base + LoRA adapters policy/critic/reward (+ heads), reference = "
                           "adapters off"}


def run_trl(args: argparse.Namespace, world: World) -> dict[str, Any]:
    """TRL's ``PPOTrainer.train()`` over warm-up + timed iterations, timed per iteration by a callback."""

    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    class IterationClock(TrainerCallback):
        """Records when each PPO iteration ends (TRL's loop calls on_step_end once per iteration)."""

        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_step_end(self, *_: Any, **__: Any) -> None:
            self.ends.append(time.perf_counter())

    policy = build_base(world, args.seed)
    ref = None if args.trl_peft else build_base(world, args.seed)
    value = build_scalar_model(world, args.seed + 1)
    reward = build_scalar_model(world, args.seed + 2)
    peft_config = None
    if args.trl_peft:
        lora = world.lora
        peft_config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none",
                                 target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
    token_ids = world.tokenizer(world.texts, add_special_tokens=False)["input_ids"]
    prompts = Dataset.from_dict({"input_ids": token_ids})
    widths: list[int] = []  # sequence lengths the value model's backbone sees: all must be P + N

    def record_width(_module: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        widths.append(int(kwargs["input_ids"].shape[1]))

    getattr(value, value.base_model_prefix).register_forward_pre_hook(record_width, with_kwargs=True)
    batch = args.rollout_batch
    with tempfile.TemporaryDirectory(prefix="bench_trl_") as out:
        cfg = PPOConfig(
            output_dir=out, seed=args.seed, use_cpu=True, bf16=False, fp16=False, report_to="none",
            save_strategy="no", eval_strategy="no", disable_tqdm=True, gradient_checkpointing=False,
            per_device_train_batch_size=batch, gradient_accumulation_steps=1,
            num_mini_batches=batch // args.minibatch_size, num_ppo_epochs=args.ppo_epochs,
            total_episodes=batch * (args.warmup + args.iters), local_rollout_forward_batch_size=batch,
            per_device_eval_batch_size=batch, num_sample_generations=0, dataloader_num_workers=0,
            response_length=args.max_new_tokens, stop_token=None, temperature=1.0, missing_eos_penalty=None,
            kl_coef=args.kl_coef, cliprange=0.2, cliprange_value=0.2, gamma=1.0, lam=0.95,
        )
        trainer = PPOTrainer(args=cfg, processing_class=world.tokenizer, model=policy, ref_model=ref,
                             reward_model=reward, train_dataset=prompts, value_model=value,
                             eval_dataset=prompts, peft_config=peft_config)
        optimizer = describe_optimizer(trainer.optimizer)  # before train(): the schedule decays lr to 0
        trainer.remove_callback(PrinterCallback)  # it would print every iteration's metrics
        clock = IterationClock()
        trainer.add_callback(clock)
        trainer.train()
    if len(clock.ends) != args.warmup + args.iters:
        raise RuntimeError(f"TRL ran {len(clock.ends)} iterations, expected {args.warmup + args.iters}")
    if set(widths) != {world.prompt_len + args.max_new_tokens}:
        raise RuntimeError(f"TRL sequences of {sorted(set(widths))} tokens, expected prompt "
                           f"{world.prompt_len} + response {args.max_new_tokens}")
    models = [trainer.policy_model, trainer.ref_model, trainer.value_model, trainer.reward_model]
    total, trained = count_params(models, [trainer.optimizer])
    arrangement = ("policy LoRA adapter (reference = adapter off) + full value model + reward model"
                   if args.trl_peft else "four models: policy, reference, value, reward")
    return {**timing(clock.ends, args), "params_total": total, "params_trainable": trained,
            "optimizer": optimizer, "mode": "peft" if args.trl_peft else "full", "arrangement": arrangement}


def randomize_lora(stack: Any, seed: int) -> None:
    """Small random LoRA matrices (peft starts B at 0, where an adapter changes nothing)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in stack.peft.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def run_sampling(args: argparse.Namespace, world: World) -> dict[str, Any]:
    """``rlhf_lite.generation.sample`` against ``model.generate``: same model, batch and response length."""
    import torch

    from rlhf_lite.models import AdapterStack

    stack = AdapterStack(build_base(world, args.seed), ["policy", "critic", "reward"], world.lora).eval()
    randomize_lora(stack, args.seed)  # fresh LoRA B matrices are 0: make the adapter change the model
    # The model PPOTrainer.rollout samples from: the policy's merged-weight view, under no_grad.
    with torch.no_grad(), stack.causal_lm("policy") as model:
        return time_samplers(args, world, model)


def time_samplers(args: argparse.Namespace, world: World, model: Any) -> dict[str, Any]:
    """Median times of ``sample`` and ``model.generate`` (with and without scores), calls alternating."""
    import torch

    from rlhf_lite.generation import encode_prompts, sample

    tok, n = world.tokenizer, args.max_new_tokens
    ids, att = encode_prompts(tok, world.texts)
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    plain = {"do_sample": True, "max_new_tokens": n, "min_new_tokens": n, "temperature": 1.0, "top_k": 0,
             "top_p": 1.0, "pad_token_id": tok.pad_token_id}

    def ours() -> int:  # what PPOTrainer.rollout runs
        ro = sample(model, ids, att, n, tok.eos_token_id, tok.pad_token_id, 1.0, 1.0, gen)
        return ro.input_ids.shape[1]

    def bare() -> int:
        return model.generate(input_ids=ids, attention_mask=att, **plain).shape[1]

    def with_scores() -> int:  # as TRL calls it, to get the per-token log-probs that sample() returns
        out = model.generate(input_ids=ids, attention_mask=att, output_scores=True,
                             return_dict_in_generate=True, **plain)
        return out.sequences.shape[1]

    samplers: dict[str, Callable[[], int]] = {"sample": ours, "generate": bare,
                                              "generate_scores": with_scores}
    for name, fn in samplers.items():  # warm-up, and the length check
        if fn() != ids.shape[1] + n:
            raise RuntimeError(f"{name} did not produce exactly {n} new tokens")
    names = list(samplers)
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(args.gen_reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:  # rotate the order
            t0 = time.perf_counter()
            samplers[name]()
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    return {"sample_s": med["sample"], "generate_s": med["generate"],
            "generate_scores_s": med["generate_scores"], "sampling_ratio": med["sample"] / med["generate"],
            "times": times, "batch": int(ids.shape[0]), "prompt_tokens_padded": int(ids.shape[1]),
            "new_tokens": n}


RUNNERS: dict[str, Callable[[argparse.Namespace, World], dict[str, Any]]] = {
    "rlhf_lite": run_rlhf_lite, "trl": run_trl, "sampling": run_sampling}


def worker_main(args: argparse.Namespace) -> None:
    """Run one worker in this process and print its result line."""
    import torch

    torch.set_num_threads(args.threads)
    import peft
    import transformers

    import rlhf_lite.ppo.trainer  # noqa: F401  (a worker's libraries all load before the baseline reading)

    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "peft": peft.__version__}
    if args.worker == "trl":
        import datasets
        import trl
        import trl.experimental.ppo

        versions.update(trl=trl.__version__, datasets=datasets.__version__)
    baseline = rss_mib()
    world = build_world(args)
    t0 = time.perf_counter()
    result = RUNNERS[args.worker](args, world)
    peak = peak_rss_mib()
    result.update(worker=args.worker, wall_s=time.perf_counter() - t0, baseline_rss_mib=baseline,
                  peak_rss_mib=peak, peak_above_imports_mib=peak - baseline, threads=torch.get_num_threads(),
                  versions=versions, world=world.describe())
    print(RESULT_TAG + json.dumps(result), flush=True)


# ----- the driver -----------------------------------------------------------------------------------
def worker_argv(args: argparse.Namespace) -> list[str]:
    """The driver's settings as command-line options for a worker."""
    argv = []
    for flag, *_ in CONFIG_OPTIONS:
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            argv += [flag, str(value)]
    return argv + (["--trl-peft"] if args.trl_peft else [])


def run_worker(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run ``--worker kind`` in a fresh process (so that its peak RSS is its own) and return its result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, *worker_argv(args)]
    threads = str(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
           "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=args.timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(f"--- worker {kind} stdout (tail) ---\n{proc.stdout[-3000:]}\n"
                         f"--- worker {kind} stderr (tail) ---\n{proc.stderr[-6000:]}\n")
        raise SystemExit(f"worker {kind} failed with exit code {proc.returncode}: {' '.join(cmd)}")
    return json.loads(lines[-1][len(RESULT_TAG):])


def cpu_busy_fraction(seconds: float = 1.0) -> float | None:
    """Fraction of all cores' time spent busy over the next ``seconds`` (this process sleeps meanwhile, so
    it is other processes' use); None where there is no /proc/stat."""
    def read() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields) - idle, sum(fields)

    try:
        busy0, total0 = read()
        time.sleep(seconds)
        busy1, total1 = read()
    except (OSError, ValueError, IndexError):
        return None
    return (busy1 - busy0) / max(1, total1 - total0)


def check_idle(when: str) -> float | None:
    """Measure other processes' CPU use; warn when the machine is not idle enough for timings."""
    busy = cpu_busy_fraction()
    if busy is not None and busy > 0.2:
        print(f"warning: {when}, other processes used {busy:.0%} of the CPU: timings are unreliable",
              flush=True)
    return busy


def summarize(args: argparse.Namespace, runs: dict[str, list[dict[str, Any]]], samp: dict[str, Any],
              busy: dict[str, float | None]) -> dict[str, Any]:
    """The summary JSON: medians over repetitions, ratios, per-repetition numbers, config and machine."""
    def median(kind: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[kind])

    sps = {k: median(k, "samples_per_s") for k in FRAMEWORKS}
    peak = {k: median(k, "peak_rss_mib") for k in FRAMEWORKS}
    above = {k: median(k, "peak_above_imports_mib") for k in FRAMEWORKS}
    first = {k: runs[k][0] for k in FRAMEWORKS}
    rep_keys = ("samples_per_s", "timed_s", "iteration_s", "peak_rss_mib", "peak_above_imports_mib",
                "baseline_rss_mib")
    return {
        "rlhf_lite_samples_per_s": sps["rlhf_lite"],
        "trl_samples_per_s": sps["trl"],
        "speedup": sps["rlhf_lite"] / sps["trl"],
        "rlhf_lite_peak_mib": peak["rlhf_lite"],
        "trl_peak_mib": peak["trl"],
        "memory_ratio": peak["rlhf_lite"] / peak["trl"],
        "rlhf_lite_peak_above_imports_mib": above["rlhf_lite"],
        "trl_peak_above_imports_mib": above["trl"],
        "memory_ratio_above_imports": above["rlhf_lite"] / above["trl"],
        "sample_s": samp["sample_s"],
        "generate_s": samp["generate_s"],
        "generate_scores_s": samp["generate_scores_s"],
        "sampling_ratio": samp["sampling_ratio"],
        "trl_mode": "peft" if args.trl_peft else "full",
        "rlhf_lite_skipped_updates": sum(r["skipped_updates"] for r in runs["rlhf_lite"]),
        "reps": {k: [{key: r[key] for key in rep_keys} for r in runs[k]] for k in FRAMEWORKS},
        "params": {k: {"total": first[k]["params_total"], "trained": first[k]["params_trainable"],
                       "optimizer": first[k]["optimizer"], "arrangement": first[k]["arrangement"]}
                   for k in FRAMEWORKS},
        "config": {
            "rollout_batch": args.rollout_batch, "minibatch_size": args.minibatch_size,
            "num_minibatches": args.rollout_batch // args.minibatch_size, "ppo_epochs": args.ppo_epochs,
            "max_new_tokens": args.max_new_tokens, "every_response_full_length": True, "temperature": 1.0,
            "top_k": None, "top_p": 1.0, "kl_coef": args.kl_coef, "clip_range": 0.2, "value_clip": 0.2,
            "gamma": 1.0, "lam": 0.95, "warmup_iterations": args.warmup, "timed_iterations": args.iters,
            "reps": args.reps, "gen_reps": args.gen_reps, "seed": args.seed, "threads": args.threads,
            "dtype": "float32", "gradient_checkpointing": False, "prompts": "data/prompts_train.jsonl",
            "model_kind": args.model, "rlhf_lite_workers": args.workers,
            **first["rlhf_lite"]["world"],
        },
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": first["rlhf_lite"]["threads"],
                    "platform": platform.platform(), "python": platform.python_version(),
                    "cpu_busy_before": busy["before"], "cpu_busy_after": busy["after"],
                    **first["trl"]["versions"]},
    }


def driver_main(args: argparse.Namespace) -> dict[str, Any]:
    """Alternate the two frameworks' workers, then the sampling worker; print lines, then the JSON summary."""
    trl_label = f"TRL ({'peft' if args.trl_peft else 'full'})"
    labels = {"rlhf_lite": "rlhf_lite", "trl": trl_label}
    print(f"PPO throughput, rlhf_lite vs {trl_label}: {args.reps} repetition(s) of each, alternating; per "
          f"worker {args.warmup} warm-up + {args.iters} timed iterations of rollout_batch "
          f"{args.rollout_batch}, "
          f"minibatch {args.minibatch_size}, {args.ppo_epochs} epochs, {args.max_new_tokens} new tokens; "
          f"{args.threads} thread(s)", flush=True)
    busy = {"before": check_idle("before the start")}
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in FRAMEWORKS}
    for rep in range(1, args.reps + 1):
        for kind in FRAMEWORKS:
            r = run_worker(kind, args)
            runs[kind].append(r)
            per_iter = ", ".join(f"{s:.2f}" for s in r["iteration_s"])
            print(f"  rep {rep}/{args.reps} {labels[kind]:<11} {r['samples_per_s']:7.2f} samples/s "
                  f"(iterations {per_iter} s), peak RSS {r['peak_rss_mib']:.0f} MiB "
                  f"({r['peak_above_imports_mib']:.0f} above imports)", flush=True)
    print("rollout sampling: rlhf_lite.generation.sample vs model.generate ...", flush=True)
    samp = run_worker("sampling", args)
    busy["after"] = check_idle("after the last worker")
    s = summarize(args, runs, samp, busy)
    for kind in FRAMEWORKS:
        p = s["params"][kind]
        print(f"{labels[kind]:<11} {p['arrangement']}: {p['total']:,} parameters held, {p['trained']:,} "
              f"trained with {p['optimizer']}")
        print(f"{labels[kind]:<11} median {s[f'{kind}_samples_per_s']:7.2f} samples/s, peak RSS "
              f"{s[f'{kind}_peak_mib']:.0f} MiB ({s[f'{kind}_peak_above_imports_mib']:.0f} above imports)")
    print(f"speedup (rlhf_lite / TRL samples per second) {s['speedup']:.2f}; memory ratio (rlhf_lite / TRL "
          f"peak RSS) {s['memory_ratio']:.2f}, above imports {s['memory_ratio_above_imports']:.2f}")
    print(f"rollout sampling of {samp['batch']} x {samp['new_tokens']} new tokens, median of "
          f"{args.gen_reps}: "
          f"sample {s['sample_s']:.3f} s, generate {s['generate_s']:.3f} s (with scores "
          f"{s['generate_scores_s']:.3f} s); sample / generate {s['sampling_ratio']:.2f} (goal <= 1.3)")
    if s["rlhf_lite_skipped_updates"]:
        print(f"warning: rlhf_lite skipped {s['rlhf_lite_skipped_updates']} non-finite updates: its "
              "throughput is overstated")
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(s, indent=2) + "\n")
    print(json.dumps(s))
    return s


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="PPO throughput and peak memory: rlhf_lite vs TRL (see the "
                                "module docstring)", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for flag, kind, default, help_text in CONFIG_OPTIONS:
        p.add_argument(flag, type=kind, default=default, help=help_text)
    p.add_argument("--reps", type=int, default=3, help="repetitions of each framework (alternating)")
    p.add_argument("--trl-peft", action="store_true", help="TRL's policy as a LoRA adapter (ref_model=None); "
                   "always on with --model smol")
    p.add_argument("--overlap", action="store_true", help="instead of TRL: rlhf_lite with workers=2 against "
                   "workers=1 (the policy/critic thread overlap), alternating, --reps of each")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds one worker may take")
    p.add_argument("--json-out", default=None, help="also write the summary JSON here (under /tmp or runs/)")
    p.add_argument("--worker", choices=WORKERS, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.model not in MODEL_DEFAULTS:
        p.error(f"--model must be one of {', '.join(MODEL_DEFAULTS)}, not {args.model!r}")
    for key, value in MODEL_DEFAULTS[args.model].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.trl_peft = args.trl_peft or args.model == "smol"  # a LoRA policy on both sides at real scale
    if min(args.warmup, args.iters, args.reps, args.gen_reps) < 1:
        p.error("--warmup, --iters, --reps and --gen-reps must be at least 1")
    if args.rollout_batch % args.minibatch_size:
        p.error(f"--rollout-batch ({args.rollout_batch}) must be a multiple of --minibatch-size "
                f"({args.minibatch_size})")
    if args.overlap and args.workers is not None:
        p.error("--overlap sets rlhf_lite's workers itself (2 and 1); drop --workers")
    return args


def overlap_main(args: argparse.Namespace) -> dict[str, Any]:
    """rlhf_lite alone, ``workers=2`` against ``workers=1`` (alternating): what the thread overlap buys."""
    print(f"rlhf_lite policy/critic thread overlap: workers 2 vs 1, {args.reps} repetition(s) of each, "
          f"alternating; {args.model} model, rollout_batch {args.rollout_batch}, minibatch {args.minibatch_size}, "
          f"{args.ppo_epochs} epochs, {args.max_new_tokens} new tokens; {args.threads} thread(s)", flush=True)
    busy = {"before": check_idle("before the start")}
    sps: dict[int, list[float]] = {2: [], 1: []}
    for rep in range(1, args.reps + 1):
        for workers in (2, 1) if rep % 2 else (1, 2):  # alternate which goes first
            r = run_worker("rlhf_lite", replace_ns(args, workers=workers))
            sps[workers].append(r["samples_per_s"])
            print(f"  rep {rep}/{args.reps} workers={workers} {r['samples_per_s']:7.2f} samples/s", flush=True)
    busy["after"] = check_idle("after the last worker")
    med = {w: statistics.median(v) for w, v in sps.items()}
    out = {"workers2_samples_per_s": med[2], "workers1_samples_per_s": med[1], "overlap_gain": med[2] / med[1],
           "workers2_range": [min(sps[2]), max(sps[2])], "workers1_range": [min(sps[1]), max(sps[1])],
           "reps": sps, "model": args.model, "cpu_busy": busy}
    print(f"workers=2 median {med[2]:.2f} samples/s (range {min(sps[2]):.2f}-{max(sps[2]):.2f}); workers=1 "
          f"median {med[1]:.2f} (range {min(sps[1]):.2f}-{max(sps[1]):.2f}); gain {out['overlap_gain']:.2f}x")
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out))
    return out


def replace_ns(args: argparse.Namespace, **changes: Any) -> argparse.Namespace:
    """A copy of ``args`` with ``changes``."""
    return argparse.Namespace(**{**vars(args), **changes})


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker_main(args)
    elif args.overlap:
        overlap_main(args)
    else:
        driver_main(args)


if __name__ == "__main__":
    main()
