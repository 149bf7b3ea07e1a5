"""Measured on a GPU: the tiny pipeline on CUDA, and the colab_t4 and consumer_24gb shapes, in one script.

Four parts, each through the project's own code path (docs/what_fits_where.md, "Measuring on a GPU"):

* ``colab_t4`` and ``consumer_24gb`` (the presets' shapes): a random-initialised ``Qwen2ForCausalLM`` with
  the exact architecture of Qwen2.5-1.5B / Qwen2.5-7B (``rlhf_lite.memory.QWEN25_1_5B`` / ``QWEN25_7B`` plus
  the other values of their config.json; nothing is downloaded), built in bf16 on the device, saved as a model
  folder with a byte-level ChatML tokenizer, then loaded as the profile loads it (``load_base``: NF4 base,
  gradient checkpointing) under three LoRA adapters and heads (``AdapterStack``), and 2 PPO-max iterations of
  ``PPOTrainer`` at the preset's budgets (``profile.ppo_config("ppo_max")``, critic pretraining off so that
  both iterations run the policy step, the largest phase). Per phase (rollout, scoring, update) and
  iteration: seconds and the peak CUDA memory (``torch.cuda.max_memory_allocated`` / ``_reserved``, reset
  at each phase), against ``rlhf_lite.memory.estimate_memory(profile)``. For a fair peak, every response
  runs to ``max_new_tokens`` (the EOS logit is masked during rollouts), the prompts are the world's test
  prompts after earlier exchanges, cut by ``format_prompts`` to the budget (the longest are kept), and the
  ptx demonstrations fill ``max_prompt_tokens + max_new_tokens``. The reward adapter and head are
  randomised (a stand-in for a trained RM: a zero head would score everything 0).
* ``fp16_t4``: the colab_t4 shape in fp16 compute, as a T4 runs it, with dynamic loss scaling
  (``torch.amp.GradScaler``, through the trainer's loss and backward methods): fp32 LoRA weights keep the
  update exact, but the gradients that reach them flow back through the fp16 base, where small values
  underflow. It checks 2 iterations for finite losses and measures what scaling changes: the LoRA
  gradients of one minibatch computed with loss scales 1, S^(1/2) and S, S being the scale the scaler
  settled on (a power-of-two scale changes no rounding, so a difference between 1 and S is underflow; the
  one between S^(1/2) and S is the floor that non-deterministic kernels set).
* ``tiny_pipeline``: ``run_pipeline`` with the tiny profile on the device (SFT, RM, vanilla, PPO-max) at a
  short budget, timed per stage.

Results go to ``OUT/gpu_check.json`` and ``OUT/gpu_check.md``, rewritten after every part (a time-out keeps
what is done). ``--dry-run`` runs the same code with tiny shapes and budgets on the CPU (memory figures are
null there); tests/test_gpu_check.py runs it, so the script cannot rot between GPU loans.

    python bench/gpu_check.py --out runs/gpu_check        # a CUDA machine with bitsandbytes
    python bench/gpu_check.py --dry-run --out /tmp/gc     # the CPU, under a minute

The prepared command for a lent GPU machine (one H200, Python 3.12, torch 2.11, transformers 5.17, no
bitsandbytes, no network). Fetch the bitsandbytes wheel once into ``.whl/`` (git-ignored; 41 MiB, tagged
manylinux_2_24, with the CUDA 13.0 library):

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \\
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl bitsandbytes==0.50.2

then run this with ``.whl`` carried along and a limit of 360 s; ``--out`` defaults to ``$OUT``, the folder
that comes back from the machine:

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
    export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false RLHF_LITE_PROGRESS=0 \\
        PYTHONUNBUFFERED=1 && set -o pipefail && timeout 330 python3 bench/gpu_check.py 2>&1 | tee $OUT/log.txt

The script starts no part that its guess of the part's duration (``EXPECTED_S``) would carry past
``--budget-s`` (300 s), so it ends within about 5 minutes and leaves room for a rerun in 15 minutes of
device time; a rerun can take only what failed or was skipped (``--parts fp16_t4,tiny_pipeline``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import platform
import random
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a plain checkout: no installed package

from rlhf_lite import data as data_mod
from rlhf_lite.loading import load_base, load_tokenizer_for, optimizer_factory, resolve_dtype
from rlhf_lite.memory import GIB, ModelArch, estimate_memory
from rlhf_lite.models import AdapterStack
from rlhf_lite.ppo.trainer import PPOSetup, PPOTrainer
from rlhf_lite.profiles import COLAB_T4, CONSUMER_24GB, TINY, Profile
from rlhf_lite.sft import encode_demos
from rlhf_lite.stage import raw_prompts
from rlhf_lite.text import Prompt, format_prompts
from rlhf_lite.utils import DATA_DIR, seed_everything, write_json

PARTS = ("colab_t4", "fp16_t4", "consumer_24gb", "tiny_pipeline")
SHAPES = {"colab_t4": COLAB_T4, "consumer_24gb": CONSUMER_24GB}
"""The presets whose shapes are measured; the part fp16_t4 runs colab_t4's shape in fp16."""
EXPECTED_S = {"colab_t4": 60, "fp16_t4": 45, "consumer_24gb": 150, "tiny_pipeline": 50}
"""Guessed seconds of each part on an H200 (build, save and load included), for the time guard."""
ITERATIONS = 2
PHASE_TERMS = {"rollout": ("kv_cache",), "scoring": ("logits_reference_pass", "activations_scoring"),
               "update": ("activations_update", "logits_update")}
"""The components of ``estimate_memory`` that each phase adds to the persistent memory."""

# The values of Qwen2.5's config.json (1.5B and 7B alike) that rlhf_lite.memory.ModelArch does not store.
QWEN25_CONFIG = {"max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "hidden_act": "silu",
                 "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}, "use_sliding_window": False}
CHATML = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
          "{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# --dry-run: the same parts with tiny shapes and budgets on the CPU.
DRY_ARCHS = {"colab_t4": ModelArch(hidden_size=64, num_layers=2, intermediate_size=128, num_heads=4, num_kv_heads=2,
                                   vocab_size=320, tie_embeddings=True),
             "consumer_24gb": ModelArch(hidden_size=64, num_layers=2, intermediate_size=160, num_heads=4,
                                        num_kv_heads=1, vocab_size=352, tie_embeddings=False)}
DRY_PPO = {"rollout_batch": 4, "minibatch_size": 2, "max_new_tokens": 4, "max_prompt_tokens": 100}
DRY_ROWS = {"sft.jsonl": 200, "prefs_train.jsonl": 200, "prefs_test.jsonl": 48, "prompts_train.jsonl": 48,
            "prompts_test.jsonl": 16}
"""The dry run's tiny pipeline reads this many rows of each data file (spread over the file)."""
TINY_BUDGETS = {  # the tiny pipeline: (GPU, dry run)
    "sft": ({"pretrain_steps": 150, "sft_steps": 150, "eval_every": 150, "n_eval_prompts": 64},
            {"pretrain_steps": 3, "sft_steps": 3, "batch_size": 8, "eval_every": 3, "n_eval_prompts": 8,
             "max_new_tokens": 8}),
    "rm": ({"steps": 60, "eval_every": 30, "n_eval_pairs": 128, "n_fresh_prompts": 32},
           {"steps": 3, "batch_size": 8, "eval_every": 3, "n_eval_pairs": 16, "n_fresh_prompts": 8,
            "max_new_tokens": 8}),
    "ppo": ({}, {"rollout_batch": 4, "minibatch_size": 4, "max_new_tokens": 8}),
}
TINY_ITERATIONS = 6  # PPO-max's 5 critic-pretraining iterations, then one policy iteration


# ----- models built offline ---------------------------------------------------------------------------
def chatml_tokenizer():
    """A byte-level tokenizer (one token per byte) with Qwen's special tokens and a ChatML template; EOS is
    ``<|im_end|>``, padding ``<|endoftext|>``. Real Qwen text would take fewer tokens: budgets cut prompts."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    raw = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    raw.decoder = decoders.ByteLevel()
    raw.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  padding_side="left", clean_up_tokenization_spaces=False)
    tok.chat_template = CHATML
    return tok


def qwen2_config(arch: ModelArch, tok):
    """The ``Qwen2Config`` of ``arch`` with Qwen2.5's other settings (RoPE theta 1e6, RMSNorm eps 1e-6, q/k/v
    biases, 32k positions) and ``tok``'s special tokens."""
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=arch.vocab_size, hidden_size=arch.hidden_size,
                       intermediate_size=arch.intermediate_size, num_hidden_layers=arch.num_layers,
                       num_attention_heads=arch.num_heads, num_key_value_heads=arch.num_kv_heads,
                       tie_word_embeddings=arch.tie_embeddings, pad_token_id=tok.pad_token_id,
                       bos_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **QWEN25_CONFIG)


def save_random_model(arch: ModelArch, folder: Path, device: torch.device, seed: int = 0) -> dict:
    """Build a random-initialised Qwen2 of shape ``arch`` in bf16 directly on ``device`` (no CPU copy of the
    weights to initialise), save it to ``folder`` in shards with the ChatML tokenizer; returns timings."""
    from transformers import AutoModelForCausalLM

    tok = chatml_tokenizer()
    seed_everything(seed)
    t0 = time.perf_counter()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(qwen2_config(arch, tok), dtype=torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    t1 = time.perf_counter()
    model.save_pretrained(folder, max_shard_size="2GB")
    tok.save_pretrained(folder)
    t2 = time.perf_counter()
    del model
    free_memory()
    return {"parameters": params, "build_s": t1 - t0, "save_s": t2 - t1}


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----- inputs that fill the budgets ---------------------------------------------------------------------
def long_conversations(n: int, seed: int, finals: list[str], history_turns: int = 12) -> list[str]:
    """``n`` HH prompts: ``history_turns`` SFT exchanges before each of ``finals`` (cycled)."""
    sft = data_mod.load_sft(DATA_DIR / "sft.jsonl")
    rng = random.Random(seed)
    return ["".join(r["prompt"] + r["response"] for r in rng.sample(sft, history_turns)) + finals[i % len(finals)]
            for i in range(n)]


def budget_prompts(tok, budget: int, n: int, system: bool) -> tuple[list[Prompt], list[int]]:
    """The ``n`` longest of 4n world test prompts after earlier exchanges, cut to ``budget`` tokens by
    ``format_prompts`` (whole turns); with their token counts."""
    prompts, _ = format_prompts(tok, long_conversations(4 * n, 1, raw_prompts(DATA_DIR, "test")), budget, system)
    lengths = [len(ids) for ids in tok([p.text for p in prompts], add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])[:n]
    return [prompts[i] for i in order], [lengths[i] for i in order]


def budget_demos(tok, max_len: int, n: int, system: bool) -> list[tuple[list[int], list[int]]]:
    """``n`` ptx demonstrations of exactly ``max_len`` tokens: long conversations that ``encode_demos`` cuts
    from the left, as it cuts any demonstration over the budget."""
    rows = data_mod.load_sft(DATA_DIR / "sft.jsonl")[:n]
    prompts = long_conversations(n, 2, [r["prompt"] for r in rows])
    return encode_demos(tok, [(p, r["response"]) for p, r in zip(prompts, rows)], max_len, truncate=True,
                        system_prompt=system)


# ----- measuring the trainer's phases ---------------------------------------------------------------------
class PhaseMeter:
    """Seconds and peak CUDA memory of consecutive phases: ``start(name)`` closes the open phase (synchronising
    the device first) and resets the peak counters; on the CPU the memory fields are None."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.rows: list[dict] = []
        self._open: tuple[str, int, float] | None = None

    def start(self, name: str, iteration: int) -> None:
        self.stop()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        if self.cuda:
            torch.cuda.synchronize()  # what ran before is not this phase's
        self._open = (name, iteration, time.perf_counter())

    def stop(self) -> None:
        if self._open is None:
            return
        if self.cuda:
            torch.cuda.synchronize()
        name, iteration, t0 = self._open
        self.rows.append({"iteration": iteration, "phase": name, "seconds": time.perf_counter() - t0,
                          "peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB if self.cuda else None,
                          "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB if self.cuda else None})
        self._open = None


@contextlib.contextmanager
def eos_masked(stack: AdapterStack, eos_id: int):
    """Within this context ``stack.causal_lm`` yields models whose EOS logit is -inf: every sampled response
    runs to ``max_new_tokens`` (random weights would end some early, which lowers the memory peak)."""
    original = stack.causal_lm

    @contextlib.contextmanager
    def causal_lm(name):
        with original(name) as lm:
            def forward(**kwargs):
                out = lm(**kwargs)
                out.logits[..., eos_id] = float("-inf")
                return out

            yield forward

    stack.causal_lm = causal_lm  # an instance attribute, removed on exit: the class is untouched
    try:
        yield
    finally:
        del stack.causal_lm


class MeasuredTrainer(PPOTrainer):
    """``PPOTrainer`` with its phases metered: rollout (EOS masked), scoring (experience, rewards, GAE) and
    update. Only the trainer's own methods run in between; nothing else changes."""

    def __init__(self, *args, meter: PhaseMeter, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.meter = meter
        self.prompt_lengths: list[int] = []

    def rollout(self, prompts):
        self.meter.start("rollout", self.iteration)
        with eos_masked(self.stack, self.tok.eos_token_id):
            ro = super().rollout(prompts)
        self.prompt_lengths.append(ro.prompt_len)
        self.meter.start("scoring", self.iteration)
        return ro

    def update(self, exp, train_policy):
        self.meter.start("update", self.iteration)
        try:
            return super().update(exp, train_policy)
        finally:
            self.meter.stop()


class LossScaledTrainer(MeasuredTrainer):
    """Dynamic loss scaling for fp16 compute (``torch.amp.GradScaler``): both losses are scaled before their
    backward pass, and the gradients unscaled before the trainer's own finiteness check, clipping and step.
    An overflow leaves inf in the gradients, so the trainer skips that step, and the scale halves."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.scaler = torch.amp.GradScaler(self.device.type, init_scale=2.0**16)
        self.initial_scale = self.scaler.get_scale()
        self.first_minibatch: tuple | None = None  # (minibatch, prompt length, rng state) for the diagnostic

    def policy_step_loss(self, mb, P):
        loss, stats = super().policy_step_loss(mb, P)
        return self.scaler.scale(loss), stats

    def critic_step_loss(self, mb, P):
        loss, stats = super().critic_step_loss(mb, P)
        return self.scaler.scale(loss), stats

    def losses_backward(self, mb, P, train_policy):
        if self.first_minibatch is None and train_policy:
            self.first_minibatch = (mb, P, self.rng.getstate())
        scale = self.scaler.get_scale()
        stats, losses = super().losses_backward(mb, P, train_policy)
        for opt in ([self.policy_opt] if train_policy else []) + [self.critic_opt]:
            self.scaler.unscale_(opt)
        self.scaler.update()
        return stats, {what: value / scale for what, value in losses.items()}


def gradient_underflow(trainer: LossScaledTrainer) -> dict:
    """LoRA and head gradients of the trainer's first minibatch (policy + critic loss, same ptx sample) at loss
    scales 1, S^(1/2) and S, where S is the scale the scaler settled on (no overflow at its last step), each
    divided by its scale; the relative L2 distance of the first two to the last, and the fraction of entries
    that are 0 unscaled but not at scale S (flushed by fp16 underflow)."""
    top = trainer.scaler.get_scale()
    scales = (1.0, 2.0 ** (math.log2(top) // 2), top)
    mb, P, rng_state = trainer.first_minibatch
    params = trainer.policy_params + trainer.critic_params
    trainer.stack.train()
    grads = {}
    for s in scales:
        for p in params:
            p.grad = None
        trainer.rng.setstate(rng_state)
        for loss_fn in (PPOTrainer.policy_step_loss, PPOTrainer.critic_step_loss):  # the unscaled losses
            loss, _ = loss_fn(trainer, mb, P)
            (loss * s).backward()
        grads[s] = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().double() / s
                              for p in params])
    for p in params:
        p.grad = None
    ref = grads[scales[-1]]
    return {"scales": list(scales), "relative_difference_unscaled": float((grads[1.0] - ref).norm() / ref.norm()),
            "relative_difference_middle": float((grads[scales[1]] - ref).norm() / ref.norm()),
            "flushed_fraction_unscaled": float(((grads[scales[0]] == 0) & (ref != 0)).double().mean()),
            "finite": all(bool(torch.isfinite(g).all()) for g in grads.values())}


# ----- one preset shape ---------------------------------------------------------------------------------
def shape_profile(name: str, folder: Path, device: torch.device, dry: bool, dtype: str = "auto") -> Profile:
    """The preset ``name`` on the saved model, ``device`` and ``dtype``; tiny shapes and budgets for a dry run."""
    base = SHAPES[name]
    arch = DRY_ARCHS[name] if dry else base.model.arch
    model = replace(base.model, source=str(folder), device=str(device), dtype=dtype, arch=arch)
    return replace(base, model=model, ppo=replace(base.ppo, **DRY_PPO) if dry else base.ppo)


def randomize_reward(stack: AdapterStack, seed: int) -> None:
    """Random LoRA B matrices (scale 0.01) and head (unit-variance scores) for the reward adapter: a stand-in
    for a trained reward model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in stack.peft.named_parameters():
            if "lora_B" in n and n.endswith(".reward.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
        head = stack.heads["reward"].weight
        head.copy_(torch.randn(head.shape, generator=g) / math.sqrt(head.shape[-1]))


def paged_gib(*optimizers) -> float:
    """Optimizer state in bitsandbytes' paged (managed) memory, which torch's allocator does not count."""
    return sum(t.numel() * t.element_size() for opt in optimizers for state in opt.state.values()
               for t in state.values() if isinstance(t, torch.Tensor) and getattr(t, "is_paged", False)) / GIB


def compare(est: dict, phases: list[dict], paged: float) -> dict | None:
    """Measured peak (allocated + paged optimizer state) of the last iteration against the estimate's tensors
    (persistent + the phase's transient), per phase and overall; None without CUDA figures."""
    last = [r for r in phases if r["iteration"] == max(p["iteration"] for p in phases)]
    if not last or last[0]["peak_allocated_gib"] is None:
        return None
    out = {}
    for r in last:
        predicted = est["persistent"] + sum(est[k] for k in PHASE_TERMS[r["phase"]])
        out[r["phase"]] = {"measured_gib": r["peak_allocated_gib"] + paged, "estimated_gib": predicted,
                           "ratio": (r["peak_allocated_gib"] + paged) / predicted}
    peak = max(r["peak_allocated_gib"] for r in last) + paged
    tensors = est["persistent"] + est["peak_phase_transient"]
    reserved = max(r["peak_reserved_gib"] for r in last) + paged
    out["peak"] = {"measured_gib": peak, "estimated_gib": tensors, "ratio": peak / tensors,
                   "measured_reserved_gib": reserved, "estimated_with_slack_gib": tensors + est["allocator_slack"],
                   "within_25_percent": abs(peak / tensors - 1) <= 0.25}
    return out


def run_shape(name: str, folder: Path, work: Path, device: torch.device, dry: bool, fp16: bool = False) -> dict:
    """2 PPO-max iterations of preset ``name`` on the model in ``folder``, metered; fp16 with loss scaling."""
    profile = shape_profile(name, folder, device, dry, "float16" if fp16 else "auto")
    cfg = profile.ppo_config("ppo_max", iterations=ITERATIONS, critic_pretrain_iterations=0)
    profile.validate()
    cfg.validate()
    spec, budget, system = profile.model, profile.max_prompt_tokens, profile.model.system_prompt
    tok = load_tokenizer_for(folder)
    prompts, lengths = budget_prompts(tok, budget, 2 * cfg.rollout_batch, system)
    demos = budget_demos(tok, budget + cfg.max_new_tokens, 64, system)
    seed_everything(cfg.seed)
    free_memory()
    t0 = time.perf_counter()
    stack = AdapterStack(load_base(spec, folder, device), ["policy", "critic", "reward"], profile.lora)
    randomize_reward(stack, cfg.seed + 1)
    stack.copy_adapter("reward", "critic")  # PPO-max #4: the critic starts as the reward model
    load_s = time.perf_counter() - t0
    cuda = device.type == "cuda"
    after_load = torch.cuda.memory_allocated() / GIB if cuda else None
    setup = PPOSetup(stack, tok, prompts, prompts, demos, None, None, optimizer_factory(spec, device), {})
    meter = PhaseMeter(device)
    trainer_cls = LossScaledTrainer if fp16 else MeasuredTrainer
    trainer = trainer_cls(cfg, setup, work / f"ppo_{name}", "ppo_max", meter=meter)
    rows = []
    for _ in range(ITERATIONS):
        rows.append(trainer.step())
        meter.stop()
    keys = ("pg_loss", "value_loss", "ptx_loss", "grad_norm", "reward", "kl_per_token", "response_length",
            "skipped_updates")
    iterations = [{k: row.get(k) for k in keys} for row in rows]
    losses = [row.get(k) for row in rows for k in ("pg_loss", "value_loss", "ptx_loss")]
    paged = paged_gib(trainer.policy_opt, trainer.critic_opt) if cuda else None
    est = estimate_memory(profile)
    measured_profile = replace(profile, ppo=replace(profile.ppo, max_prompt_tokens=max(trainer.prompt_lengths)))
    est_measured = estimate_memory(measured_profile, ptx_tokens=max(len(d[0]) for d in demos))
    result = {
        "arch": asdict(profile.model.arch), "dtype": str(resolve_dtype(spec, device)).replace("torch.", ""),
        "quantization": spec.quantization, "gradient_checkpointing": spec.gradient_checkpointing,
        "lora": asdict(profile.lora), "lora_dtype": str(trainer.policy_params[0].dtype).replace("torch.", ""),
        "ppo": {k: getattr(cfg, k) for k in ("rollout_batch", "minibatch_size", "ppo_epochs", "max_new_tokens",
                                             "max_prompt_tokens", "ptx_coef", "critic_pretrain_iterations")},
        "load_s": load_s, "after_load_allocated_gib": after_load, "prompt_tokens_available": [min(lengths), max(lengths)],
        "rollout_prompt_tokens": trainer.prompt_lengths, "ptx_tokens": max(len(d[0]) for d in demos),
        "phases": meter.rows, "iterations": iterations, "iteration_s": [
            sum(r["seconds"] for r in meter.rows if r["iteration"] == i) for i in range(1, ITERATIONS + 1)],
        "finite": all(v is not None and math.isfinite(v) for v in losses),
        "skipped_updates": sum(r["skipped_updates"] for r in rows),
        "paged_optimizer_gib": paged, "estimate": est, "estimate_at_measured_lengths": est_measured,
        "comparison": compare(est_measured, meter.rows, paged or 0.0),
    }
    if fp16:
        result["loss_scale"] = {"initial": trainer.initial_scale, "final": trainer.scaler.get_scale()}
        result["gradient_underflow"] = gradient_underflow(trainer)
        under = result["gradient_underflow"]
        result["scaling_changes_gradients"] = under["relative_difference_unscaled"] > max(
            10 * under["relative_difference_middle"], 1e-2)
    del trainer, setup, stack
    free_memory()
    return result


# ----- the tiny pipeline ---------------------------------------------------------------------------------
def data_subset(folder: Path) -> Path:
    """The world's data folder with :data:`DRY_ROWS` rows of each file, every k-th (all categories)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("stats.json", "tokenizer.json"):
        shutil.copy(DATA_DIR / name, folder / name)
    for name, n in DRY_ROWS.items():
        lines = (DATA_DIR / name).read_text().splitlines()
        (folder / name).write_text("\n".join(lines[:: max(1, len(lines) // n)][:n]) + "\n")
    return folder


def run_tiny(work: Path, device: torch.device, dry: bool) -> dict:
    """``run_pipeline`` on the tiny profile with ``ModelSpec.device`` set, at a short budget; seconds per stage.
    The dry run reads a subset of the data (the evaluations then cover fewer prompts and pairs)."""
    from rlhf_lite.pipeline import run_pipeline

    k = int(dry)
    data_dir = data_subset(work / "data") if dry else DATA_DIR
    profile = replace(TINY, model=replace(TINY.model, device=str(device)),
                      sft=replace(TINY.sft, **TINY_BUDGETS["sft"][k]), rm=replace(TINY.rm, **TINY_BUDGETS["rm"][k]))
    s = run_pipeline(work / "tiny", seed=0, data_dir=data_dir, iterations=TINY_ITERATIONS, profile=profile,
                     ppo_changes=TINY_BUDGETS["ppo"][k])
    stages = ("sft", "rm", "vanilla", "ppo_max")
    return {"budgets": {"sft": TINY_BUDGETS["sft"][k], "rm": TINY_BUDGETS["rm"][k],
                        "ppo": {**TINY_BUDGETS["ppo"][k], "iterations": TINY_ITERATIONS}},
            "stage_s": {st: s[st]["wall_seconds"] for st in stages}, "wall_seconds": s["wall_seconds"],
            "sft_gold": s["sft"].get("gold_score_after"), "rm_test_accuracy": s["rm"]["test_accuracy"],
            "ppo": {st: {"iterations": s[st]["iterations"], "final_reward": s[st]["final_reward"],
                         "final_gold_score": s[st]["final_gold_score"]} for st in ("vanilla", "ppo_max")}}


# ----- report --------------------------------------------------------------------------------------------
def _f(x, spec: str = ".3g") -> str:
    return "n/a" if x is None else format(x, spec)


def markdown(report: dict) -> str:
    """The results as markdown tables (memory n/a on the CPU)."""
    env = report["environment"]
    title = (f"# GPU check ({'dry run on the CPU' if report['dry_run'] else env['gpu']}; torch {env['torch']}, "
             f"transformers {env['transformers']}, {report['date']})")
    header = ("| part | status | dtype | s / iteration (1st, 2nd) | rollout / scoring / update s (2nd) | peak "
              "allocated + paged GiB | peak reserved GiB | estimate (tensors) GiB | measured / estimate |")
    lines = [title, "", header, "|---|---|---|---|---|---|---|---|---|"]
    for name in ("colab_t4", "fp16_t4", "consumer_24gb"):
        r = report["parts"].get(name)
        if r is None:
            continue
        if r["status"] != "ok":
            why = (r.get("error") or r.get("reason") or "").replace("|", "/")[:120]
            lines.append(f"| {name} | {r['status']}: {why} | | | | | | | |")
            continue
        second = {p["phase"]: p["seconds"] for p in r["phases"] if p["iteration"] == ITERATIONS}
        peak = (r["comparison"] or {}).get("peak", {})
        est = r["estimate_at_measured_lengths"]
        lines.append(f"| {name} | ok | {r['dtype']} | {' / '.join(_f(s, '.1f') for s in r['iteration_s'])} | "
                     f"{' / '.join(_f(second.get(p), '.1f') for p in PHASE_TERMS)} | {_f(peak.get('measured_gib'))} | "
                     f"{_f(peak.get('measured_reserved_gib'))} | {_f(est['persistent'] + est['peak_phase_transient'])}"
                     f" | {_f(peak.get('ratio'), '.2f')} |")
    fp16 = report["parts"].get("fp16_t4")
    if fp16 and fp16["status"] == "ok":
        u = fp16["gradient_underflow"]
        lines += ["", (f"fp16 (T4 path): losses finite: {'yes' if fp16['finite'] else 'NO'}; loss scale "
                       f"{fp16['loss_scale']['initial']:g} -> {fp16['loss_scale']['final']:g} "
                       f"({fp16['skipped_updates']} steps skipped on overflow); unscaled gradients differ from "
                       f"gradients at scale {u['scales'][2]:g} by {u['relative_difference_unscaled']:.2e} (scale "
                       f"{u['scales'][1]:g}: {u['relative_difference_middle']:.2e}); "
                       f"{u['flushed_fraction_unscaled']:.2e} of entries flushed to 0 unscaled.")]
    tiny = report["parts"].get("tiny_pipeline")
    if tiny:
        lines += ["", "| tiny pipeline stage | seconds |", "|---|---|"]
        if tiny["status"] == "ok":
            lines += [f"| {st} | {s:.1f} |" for st, s in tiny["stage_s"].items()]
            lines.append(f"| all (data check and report included) | {tiny['wall_seconds']:.1f} |")
        else:
            lines.append(f"| {tiny['status']}: {(tiny.get('error') or tiny.get('reason') or '')[:120]} | |")
    return "\n".join(lines) + "\n"


def environment(device: torch.device) -> dict:
    import peft
    import transformers

    try:
        import bitsandbytes
        bnb = bitsandbytes.__version__
    except ImportError:
        bnb = None
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "transformers": transformers.__version__, "peft": peft.__version__, "bitsandbytes": bnb,
           "device": str(device), "gpu": None, "gpu_memory_gib": None, "cuda_context_gib": None}
    if device.type == "cuda":
        torch.zeros(1, device=device)  # create the context
        free, total = torch.cuda.mem_get_info()
        env.update(gpu=torch.cuda.get_device_name(), gpu_memory_gib=total / GIB,
                   cuda_context_gib=(total - free - torch.cuda.memory_reserved()) / GIB)
    return env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu_check", help="results folder")
    ap.add_argument("--work", default=None, help="scratch folder for models and runs (default: a temporary one)")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes and budgets on the CPU")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    ap.add_argument("--budget-s", type=float, default=300.0, help="start no part expected to end after this")
    args = ap.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        ap.error(f"--parts: unknown {unknown}; choose from {', '.join(PARTS)}")
    if not args.dry_run and not torch.cuda.is_available():
        ap.error("no CUDA device: use --dry-run on a CPU")
    device = torch.device("cpu" if args.dry_run else "cuda")
    out = Path(args.out)
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu_check_"))
    start = time.perf_counter()
    report = {"dry_run": args.dry_run, "date": datetime.date.today().isoformat(), "environment": environment(device),
              "iterations": ITERATIONS, "budget_s": args.budget_s, "parts": {}}
    report["models"] = {}

    def model_folder(shape: str) -> Path:
        """The saved random model of preset ``shape``, built on first use."""
        folder = work / f"model_{shape}"
        if shape not in report["models"]:
            arch = DRY_ARCHS[shape] if args.dry_run else SHAPES[shape].model.arch
            report["models"][shape] = save_random_model(arch, folder, device)
        return folder

    try:
        for i, part in enumerate(parts):
            elapsed = time.perf_counter() - start
            if not args.dry_run and elapsed + EXPECTED_S[part] > args.budget_s:
                report["parts"][part] = {"status": "skipped", "reason": f"time: {elapsed:.0f} s spent, about "
                                         f"{EXPECTED_S[part]} s more needed, budget {args.budget_s:.0f} s"}
                continue
            print(f"== {part} ({elapsed:.0f} s)", flush=True)
            t0 = time.perf_counter()
            shape = "colab_t4" if part == "fp16_t4" else part
            try:
                if part == "tiny_pipeline":
                    result = run_tiny(work, device, args.dry_run)
                else:
                    result = run_shape(shape, model_folder(shape), work, device, args.dry_run, fp16=part == "fp16_t4")
                result["status"] = "ok"
            except Exception as e:  # noqa: BLE001 - one failing part (e.g. out of memory) must not lose the others
                traceback.print_exc()
                result = {"status": "error", "error": f"{type(e).__name__}: {e}"[:2000]}
            if shape in SHAPES and shape not in {"colab_t4" if p == "fp16_t4" else p for p in parts[i + 1:]}:
                shutil.rmtree(work / f"model_{shape}", ignore_errors=True)  # 15 GB for the 7B: free the disk
            free_memory()
            result["seconds"] = time.perf_counter() - t0
            report["parts"][part] = result
            report["wall_seconds"] = time.perf_counter() - start
            write_json(out / "gpu_check.json", report)
            (out / "gpu_check.md").write_text(markdown(report))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    report["wall_seconds"] = time.perf_counter() - start
    write_json(out / "gpu_check.json", report)
    (out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    print(json.dumps({p: r["status"] for p, r in report["parts"].items()}))
    return 0 if all(r["status"] == "ok" for r in report["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
