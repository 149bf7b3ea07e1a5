"""Peak memory of one PPO-max iteration: one 4-bit base with three LoRA adapters vs the usual four models.

    OMP_NUM_THREADS=2 .venv/bin/python bench/memory.py        # a few minutes on a 2-core CPU

Both set-ups run the same iteration (docs/paper.md Sec. 2-3) on the same random-init Llama of about 0.5B
parameters, with gradient checkpointing:

  (a) ``AdapterStack`` on ``load_causal_lm(quantization="nf4")`` (NF4, double quantization) as our CPU path
      runs it: fp32 compute (``pick_compute_dtype``), so its embeddings, LM head and activations are fp32,
      twice the bytes of (b)'s: the comparison is conservative. The policy, critic and reward model are LoRA
      adapters (+ heads); the reference is the base with the adapters off; torch Adam on policy and critic;
  (b) four separate bf16 models: policy and reference (causal LMs), critic and reward model (backbones with
      a scalar head); full fine-tuning of policy and critic with torch Adam (its states in bf16 too: the
      cheapest full fine-tune; fp32 master weights and states would add 8 bytes per trained parameter).

The iteration: sample ``ROLLOUT`` responses of ``NEW`` tokens to random ``PROMPT``-token prompts with the
KV cache; reference log-probs, critic values and RM scores of the buffer without gradients; shaped rewards,
GAE; then one epoch of minibatches of ``MINIBATCH`` (here the whole buffer: one PPO update): clipped surrogate
+ ptx loss on ``PTX``-token demonstrations, clipped value loss, one global gradient clip, one step of each
optimizer. The sequences are short because bf16 matrix products are slow on CPUs without AVX512-BF16 (a bf16
backward through one 3456 x 1280 weight matrix costs about 15 ms per token here).

Each set-up runs in its own subprocess. What is measured: the kernel's peak resident set (VmHWM) during the
iteration, reset once the models are loaded and between phases (``/proc/self/clear_refs``), minus the
resident set right after the imports: resident weights plus everything the iteration allocates. Weights are
cloned into anonymous memory after loading so that no file-backed mapping of the checkpoint is counted or
missed, and glibc returns every buffer over 1 MiB on free (``MALLOC_MMAP_THRESHOLD_``, with transparent huge
pages: ``glibc.malloc.hugetlb=1``), so the peak follows live tensors rather than the heap's high-water mark.
The last line printed is JSON: ``{"a_4bit_adapters_mib", "b_four_models_bf16_mib", "ratio"}``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROLLOUT, MINIBATCH, PROMPT, NEW = 2, 2, 16, 8
PTX = PROMPT + NEW  # the ptx batch goes through the same policy forward as the rollouts
ARCH = {"hidden_size": 1280, "num_hidden_layers": 24, "intermediate_size": 3456, "num_attention_heads": 20,
        "num_key_value_heads": 4, "vocab_size": 32000, "tie_word_embeddings": False}
MIB = 1024**2
# glibc keeps freed multi-MB buffers in its heap (RSS then overstates live memory: by 0.8 GiB in (a)); with a
# fixed mmap threshold every buffer over 1 MiB is its own mapping, returned to the kernel when freed. Huge
# pages for those mappings keep the page faults (bitsandbytes de-quantizes every 4-bit weight per call) cheap.
WORKER_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20), "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}


# ----- memory readings ------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def rss_mib() -> float:
    """Current resident set size."""
    return _status_kib("VmRSS") / 1024


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS; False where not permitted."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_mib() -> float:
    """Peak resident set size since the last reset (or process start)."""
    return _status_kib("VmHWM") / 1024


def trim_heap() -> None:
    """Give freed heap pages back to the kernel so that loading transients do not count as resident."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class Meter:
    """Peak RSS (above ``base``) and seconds of each phase of the iteration, resetting the peak between phases."""

    def __init__(self, base: float) -> None:
        self.base, self.t = base, time.perf_counter()
        self.phases: dict[str, dict[str, float]] = {}
        reset_peak()

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.phases[name] = {"peak_mib": peak_mib() - self.base, "seconds": now - self.t}
        trim_heap()
        reset_peak()
        self.t = time.perf_counter()


# ----- the two set-ups behind one interface ------------------------------------------------------------
class OneBase:
    """(a): one 4-bit base, adapters policy/critic/reward, reference = adapters off."""

    def __init__(self, folder: Path) -> None:
        from rlhf_lite.loading import load_causal_lm
        from rlhf_lite.models import AdapterStack, LoraSettings

        base = load_causal_lm(folder, quantization="nf4", dtype=torch.float32)
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        self.stack = AdapterStack(base, ["policy", "critic", "reward"], LoraSettings())
        self.stack.copy_adapter("reward", "critic")  # PPO-max #4 (both fresh here; the copy is the cost)

    def modules(self) -> list[nn.Module]:
        return [self.stack]

    def sampler(self) -> nn.Module:
        self.stack.activate("policy")
        return self.stack.base_model

    def hidden(self, role: str, ids: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
        name = {"policy": "policy", "reference": None, "critic": "critic", "reward": "reward"}[role]
        return self.stack.hidden(name, ids, att)

    def lm_head(self, role: str) -> nn.Module:
        return self.stack.base_model.lm_head

    def head(self, role: str) -> nn.Module:
        return self.stack.heads[role]

    def params(self, role: str) -> list[nn.Parameter]:
        return self.stack.adapter_parameters(role)


class FourModels:
    """(b): policy, reference, critic and reward model as four bf16 models."""

    def __init__(self, folder: Path) -> None:
        from transformers import AutoModel, AutoModelForCausalLM

        from rlhf_lite.models import position_ids_from_mask

        self.pos = position_ids_from_mask
        kw = {"dtype": torch.bfloat16}
        self.lms = {r: AutoModelForCausalLM.from_pretrained(folder, **kw) for r in ("policy", "reference")}
        self.backbones = {r: AutoModel.from_pretrained(folder, **kw) for r in ("critic", "reward")}
        hidden = self.lms["policy"].config.hidden_size
        self.heads = {"critic": nn.Linear(hidden, 1), "reward": nn.Linear(hidden, 1, bias=False)}
        for r in ("reference", "reward"):
            self.net(r).requires_grad_(False)
        self.heads["reward"].requires_grad_(False)
        for r in ("policy", "critic"):
            self.net(r).activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})

    def net(self, role: str) -> nn.Module:
        return self.lms[role] if role in self.lms else self.backbones[role]

    def modules(self) -> list[nn.Module]:
        return [*self.lms.values(), *self.backbones.values(), *self.heads.values()]

    def sampler(self) -> nn.Module:
        return self.lms["policy"]

    def hidden(self, role: str, ids: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
        body = self.lms[role].model if role in self.lms else self.backbones[role]
        return body(input_ids=ids, attention_mask=att, position_ids=self.pos(att)).last_hidden_state

    def lm_head(self, role: str) -> nn.Module:
        return self.lms[role].lm_head

    def head(self, role: str) -> nn.Module:
        return self.heads[role]

    def params(self, role: str) -> list[nn.Parameter]:
        head = self.heads.get(role)
        return [*self.net(role).parameters(), *(head.parameters() if head is not None else [])]


# ----- one PPO-max iteration ---------------------------------------------------------------------------
def ppo_max_iteration(m: OneBase | FourModels, vocab: int, meter: Meter, seed: int = 0) -> dict[str, float]:
    """Rollout, scoring, GAE, one epoch of policy and critic updates; returns a few numbers (sanity)."""
    from rlhf_lite.generation import sample
    from rlhf_lite.ppo import core

    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(3, vocab, (ROLLOUT, PROMPT), generator=g)
    ptx_ids = torch.randint(3, vocab, (MINIBATCH, PTX), generator=g)
    ones = torch.ones_like(prompts)
    policy_opt = torch.optim.Adam(m.params("policy"), lr=1e-5, betas=(0.9, 0.95))
    critic_opt = torch.optim.Adam(m.params("critic"), lr=1e-5, betas=(0.9, 0.95))

    def resp_logits(role: str, ids: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
        return m.lm_head(role)(m.hidden(role, ids, att)[:, PROMPT - 1: -1]).float()

    def values(role: str, ids: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
        h = m.hidden(role, ids, att)
        return m.head(role)(h.to(m.head(role).weight.dtype)).squeeze(-1).float()

    for mod in m.modules():
        mod.eval()
    with torch.no_grad():  # phase 1: rollout (eos_id -1: every response runs to NEW tokens)
        ro = sample(m.sampler(), prompts, ones, NEW, eos_id=-1, pad_id=0, generator=g)
        meter.mark("rollout")
        ids, att = ro.input_ids, ro.attention_mask
        mask = ro.response_mask[:, PROMPT:].float()
        old_logp = ro.logprobs[:, PROMPT:]
        # phase 2: reference, critic and RM passes
        ref_logp = core.logprobs_from_logits(resp_logits("reference", ids, att), ids[:, PROMPT:])
        old_values = values("critic", ids, att)[:, PROMPT - 1: -1]
        scores = values("reward", ids, att)[:, -1]
        # phase 3-4: PPO-max reward normalization, KL-shaped rewards, GAE
        used = core.normalize_rewards(scores, core.RunningMoments(), "normalize", 0.8)
        rewards = core.shape_rewards(used, core.kl_k1(old_logp, ref_logp) * mask, mask, 0.2)
        adv, ret = core.compute_gae(rewards, old_values, mask, 1.0, 0.95)
        meter.mark("scoring")
    for mod in m.modules():
        mod.train()
    stats: dict[str, float] = {}
    for i in range(0, ROLLOUT, MINIBATCH):  # phase 5: one epoch of minibatches
        sl = slice(i, i + MINIBATCH)
        policy_opt.zero_grad(set_to_none=True)
        critic_opt.zero_grad(set_to_none=True)
        # Rollout minibatch and ptx demonstrations in one policy forward: the trainer runs them as two
        # graphs alive at once, which stores the same tensors; one pass halves the slow bf16 matmuls.
        both = torch.cat([ids[sl], ptx_ids])
        logits = m.lm_head("policy")(m.hidden("policy", both, torch.cat([att[sl], torch.ones_like(ptx_ids)]))).float()
        n = sl.stop - sl.start
        logp = core.logprobs_from_logits(logits[:n, PROMPT - 1: -1], ids[sl, PROMPT:])
        pg, _ = core.policy_loss(logp, old_logp[sl], adv[sl], mask[sl], 0.2)
        ptx = core.ptx_loss(logits[n:, :-1], ptx_ids[:, 1:], torch.ones_like(ptx_ids[:, 1:]))
        (pg + 0.5 * ptx).backward()
        v = values("critic", ids[sl], att[sl])[:, PROMPT - 1: -1]
        vl, _ = core.value_loss(v, old_values[sl], ret[sl], mask[sl], 0.2)
        vl.backward()
        stats["grad_norm"] = core.clip_grad_norm_global(m.params("policy") + m.params("critic"), 1.0)
        policy_opt.step()
        critic_opt.step()
        stats.update(pg_loss=pg.item(), ptx_loss=ptx.item(), value_loss=vl.item())
        meter.mark(f"update_{i // MINIBATCH}")
    return stats


def worker(kind: str, folder: Path) -> dict:
    """Run one set-up in this process and measure it (see the module docstring)."""
    import bitsandbytes  # noqa: F401  (every library both set-ups use is imported before the baseline)
    import peft  # noqa: F401
    import transformers
    from transformers.models.llama import modeling_llama  # noqa: F401

    from rlhf_lite import generation, models  # noqa: F401
    from rlhf_lite.ppo import core  # noqa: F401

    transformers.logging.disable_progress_bar()
    trim_heap()
    base_rss = rss_mib()
    t0 = time.perf_counter()
    m = OneBase(folder) if kind == "a" else FourModels(folder)
    with torch.no_grad():  # own every weight in anonymous memory (no mmapped checkpoint pages)
        for mod in m.modules():
            for p in mod.parameters():
                if getattr(p, "quant_state", None) is None:  # 4-bit weights were made at load time
                    p.data = p.data.clone()
    load_peak = peak_mib()
    trim_heap()
    loaded = rss_mib()
    exact = reset_peak()
    load_s = time.perf_counter() - t0
    meter = Meter(base_rss)
    stats = ppo_max_iteration(m, transformers.AutoConfig.from_pretrained(folder).vocab_size, meter)
    peak = max(p["peak_mib"] for p in meter.phases.values()) if exact else peak_mib() - base_rss
    return {"kind": kind, "baseline_rss_mib": base_rss, "load_peak_mib": load_peak - base_rss,
            "resident_after_load_mib": loaded - base_rss, "iteration_peak_mib": peak,
            "peak_is_iteration_only": exact, "load_s": load_s,
            "iteration_s": sum(p["seconds"] for p in meter.phases.values()), "phases": meter.phases, **stats}


# ----- the driver ------------------------------------------------------------------------------------
def save_model(folder: Path) -> int:
    """A random-init Llama of about 0.5B parameters, saved in bf16 (4-bit loading needs from_pretrained)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**ARCH, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with torch.device("meta"):
        n = sum(p.numel() for p in LlamaForCausalLM(cfg).parameters())
    torch.set_default_dtype(torch.bfloat16)  # build in bf16: half the memory of the parent process
    model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(folder)
    del model
    return n


def estimate_for_bench() -> dict:
    """The analytic estimate (rlhf_lite.memory.estimate_memory) of set-up (a) at the bench's sizes (fp32)."""
    from rlhf_lite.loading import ModelSpec
    from rlhf_lite.memory import ModelArch, estimate_memory
    from rlhf_lite.models import LoraSettings
    from rlhf_lite.ppo.config import PPOConfig
    from rlhf_lite.profiles import Profile

    arch = ModelArch(hidden_size=ARCH["hidden_size"], num_layers=ARCH["num_hidden_layers"],
                     intermediate_size=ARCH["intermediate_size"], num_heads=ARCH["num_attention_heads"],
                     num_kv_heads=ARCH["num_key_value_heads"], vocab_size=ARCH["vocab_size"],
                     tie_embeddings=ARCH["tie_word_embeddings"])
    spec = ModelSpec(source="bench_0.5b", quantization="nf4", gradient_checkpointing=True, optimizer="adam",
                     max_params=1e9, arch=arch)
    ppo = PPOConfig(rollout_batch=ROLLOUT, minibatch_size=MINIBATCH, max_new_tokens=NEW, max_prompt_tokens=PROMPT)
    prof = Profile(name="bench_0.5b", description="bench/memory.py set-up (a)", model=spec, lora=LoraSettings(),
                   ppo=ppo)
    return estimate_memory(prof, dtype_bytes=4, device_type="cpu", ptx_tokens=PTX)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", choices=("a", "b"), help=argparse.SUPPRESS)
    ap.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
        print(json.dumps(worker(args.worker, args.model)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "llama_0.5b"
        n = save_model(folder)
        print(f"random-init Llama: {n / 1e6:.0f}M parameters, {ARCH}")
        print(f"iteration: rollout {ROLLOUT} x ({PROMPT} prompt + {NEW} new tokens), minibatch {MINIBATCH}, "
              f"ptx {MINIBATCH} x {PTX} tokens, gradient checkpointing, {ROLLOUT // MINIBATCH} update step(s)")
        res = {}
        for kind in ("a", "b"):
            out = subprocess.run([sys.executable, __file__, "--worker", kind, "--model", str(folder)],
                                 capture_output=True, text=True, check=False, env=WORKER_ENV)
            if out.returncode:
                sys.exit(f"worker {kind} failed:\n{out.stderr[-3000:]}")
            res[kind] = json.loads(out.stdout.strip().splitlines()[-1])
    a, b = res["a"], res["b"]
    names = {"a": "(a) 4-bit base + 3 LoRA adapters", "b": "(b) 4 separate bf16 models"}
    print(f"\n{'set-up':<36}{'resident after load':>21}{'iteration peak':>16}{'load peak':>11}{'time':>9}")
    for k, r in res.items():
        print(f"{names[k]:<36}{r['resident_after_load_mib']:>17.0f} MiB{r['iteration_peak_mib']:>12.0f} MiB"
              f"{r['load_peak_mib']:>7.0f} MiB{r['load_s'] + r['iteration_s']:>8.0f}s")
    print("\nper phase: peak RSS above the baseline (seconds)")
    for k, r in res.items():
        print(f"{names[k]:<36}" + "  ".join(f"{ph} {v['peak_mib']:.0f} MiB ({v['seconds']:.0f}s)"
                                            for ph, v in r["phases"].items()))
    how = "VmHWM reset after loading" if a["peak_is_iteration_only"] else "ru_maxrss incl. loading (no reset)"
    print(f"(peak RSS minus RSS after imports; {how}; baseline {a['baseline_rss_mib']:.0f} MiB)")

    from rlhf_lite.memory import GIB, format_estimate

    est = estimate_for_bench()
    print("\nanalytic estimate of (a) at these sizes (rlhf_lite.memory.estimate_memory, fp32 compute, CPU):")
    print(format_estimate(est))
    print(f"estimate {est['total'] * GIB / MIB:.0f} MiB vs measured {a['iteration_peak_mib']:.0f} MiB "
          f"({est['total'] * GIB / MIB / a['iteration_peak_mib']:.2f}x)")
    ratio = a["iteration_peak_mib"] / b["iteration_peak_mib"]
    print(json.dumps({"a_4bit_adapters_mib": round(a["iteration_peak_mib"], 1),
                      "b_four_models_bf16_mib": round(b["iteration_peak_mib"], 1), "ratio": round(ratio, 4)}))


if __name__ == "__main__":
    main()
