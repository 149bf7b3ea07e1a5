"""The PPO loop (PAPER.md Sec. 2): it only orchestrates; the math lives in ``core.py``.

One iteration, in phases:

1. **rollout**: sample responses for a batch of prompts with the policy adapter (KV cache);
2. **score**: reference log-probs (adapters off), old values (critic), RM score at the EOS, gold score
   (logged only, never trained on);
3. **shape rewards**: optional normalization of the RM score, then -eta * KL_t per token + score at EOS;
4. **GAE**: advantages and returns over response tokens (optionally whitened and clipped);
5. **update**: epochs of minibatches; clipped surrogate (+ entropy, + ptx) and (clipped) value loss;
6. **log**: the paper's monitors, the collapse detector, samples and checkpoints.

Tensors in phases 2-5 live in *response space*: (B, N) with N the longest response of the buffer,
where column i is response token i. Logits at sequence position P-1+i predict token i, and the critic's
value there is the value of the state before token i.
"""

from __future__ import annotations

import json
import random
import signal
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerFast

from .. import data as data_mod
from .. import world
from ..batching import encode_example, last_token_index, pad_batch
from ..evaluation import evaluate_gold
from ..generation import Rollout, decode_responses, encode_prompts, sample
from ..models import AdapterStack, LoraSettings
from ..sft import load_sft_model
from ..utils import DATA_DIR, MetricsLog, Stopwatch, progress, read_json, seed_everything, write_json
from . import core
from .config import CollapseBands, PPOConfig


# ----- the buffer ---------------------------------------------------------------------------------
@dataclass
class Experience:
    """One rollout buffer in response space; all (B, N) unless stated."""

    input_ids: torch.Tensor  # (B, P + N) prompt + response
    attention_mask: torch.Tensor  # (B, P + N)
    prompt_len: int
    mask: torch.Tensor  # response tokens (float)
    old_logprobs: torch.Tensor  # log pi_old(token)
    ref_logprobs: torch.Tensor  # log pi_ref(token)
    old_values: torch.Tensor  # V_old(state before token)
    rewards: torch.Tensor  # shaped per-token rewards
    advantages: torch.Tensor
    returns: torch.Tensor

    def minibatches(self, size: int, rng: random.Random) -> list[dict[str, torch.Tensor]]:
        """Shuffled minibatches of ``size`` rows, each a dict of the row-sliced tensors."""
        order = list(range(self.mask.shape[0]))
        rng.shuffle(order)
        out = []
        for i in range(0, len(order), size):
            idx = torch.tensor(order[i : i + size])
            out.append({k: v[idx] for k, v in asdict(self).items() if isinstance(v, torch.Tensor)})
        return out


def response_logits(stack: AdapterStack, name: str | None, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    prompt_len: int) -> torch.Tensor:
    """Logits (B, N, V) that predict the N response tokens; lm_head runs on those positions only."""
    hidden = stack.hidden(name, input_ids, attention_mask)[:, prompt_len - 1 : -1]
    return stack.base_model.lm_head(hidden).float()


def response_values(stack: AdapterStack, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    prompt_len: int) -> torch.Tensor:
    """Critic values (B, N) of the states before each response token."""
    return stack.values("critic", input_ids, attention_mask)[:, prompt_len - 1 : -1]


def rm_scores(stack: AdapterStack, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """RM score (B,) read at each sequence's last token (the EOS, or the cap when there is none)."""
    values = stack.values("reward", input_ids, attention_mask)
    return values.gather(1, last_token_index(attention_mask)[:, None]).squeeze(1)


# ----- monitors -----------------------------------------------------------------------------------
def repeated_trigram_fraction(texts: Sequence[str]) -> float:
    """Fraction of responses containing a repeated word trigram (the "pattern collapse" symptom)."""
    def has_repeat(t: str) -> bool:
        w = t.split()
        grams = [tuple(w[i : i + 3]) for i in range(len(w) - 2)]
        return len(grams) != len(set(grams))
    return float(np.mean([has_repeat(t) for t in texts])) if texts else 0.0


def detect_collapse(history: Sequence[dict], bands: CollapseBands) -> tuple[int, str] | None:
    """The paper's warning signs (Sec. 5.1): first iteration where a monitor left its band for
    ``bands.patience`` consecutive iterations, and why; None if never.

    ``history`` rows need ``iteration``, ``response_length``, ``kl_per_token``, ``ref_perplexity``,
    ``reward``, and ``gold_score`` on the rows where the gold measurement was taken.
    """
    k = bands.baseline_iterations
    if len(history) <= k:
        return None
    base_len = float(np.mean([h["response_length"] for h in history[:k]]))
    base_ppl = float(np.mean([h["ref_perplexity"] for h in history[:k]]))
    streak = 0
    peak_gold, reward_at_peak = -np.inf, None
    for h in history:
        reasons = []
        if h["response_length"] > bands.length_ratio * base_len:
            reasons.append(f"response length {h['response_length']:.1f} > {bands.length_ratio} x {base_len:.1f}")
        if h["kl_per_token"] > bands.kl_max:
            reasons.append(f"KL {h['kl_per_token']:.2f} nats/token > {bands.kl_max}")
        if h["ref_perplexity"] > bands.ref_perplexity_ratio * base_ppl:
            reasons.append(f"reference perplexity {h['ref_perplexity']:.1f} > {bands.ref_perplexity_ratio} x "
                           f"{base_ppl:.1f}")
        gold = h.get("gold_score")
        if gold is not None:
            if gold > peak_gold:
                peak_gold, reward_at_peak = gold, h["reward"]
            elif gold < peak_gold - bands.gold_drop and h["reward"] > reward_at_peak + bands.reward_rise:
                reasons.append(f"gold {gold:.2f} fell from its peak {peak_gold:.2f} while the RM reward rose "
                               f"to {h['reward']:.2f}")
        streak = streak + 1 if reasons else 0
        if streak >= bands.patience and h["iteration"] >= k:
            return int(h["iteration"]), "; ".join(reasons)
    return None


# ----- set-up ---------------------------------------------------------------------------------------
@dataclass
class PPOSetup:
    """Everything a run needs besides its config: the stack, tokenizer and data."""

    stack: AdapterStack
    tokenizer: PreTrainedTokenizerFast
    train_prompts: list[str]
    test_prompts: list[str]
    sft_examples: list[tuple[list[int], list[int]]] = field(default_factory=list)
    rm_stack: AdapterStack | None = None  # where the RM lives when it is not on ``stack`` (pretrained base)

    @property
    def reward_model(self) -> AdapterStack:
        return self.rm_stack if self.rm_stack is not None else self.stack


def build_setup(cfg: PPOConfig, sft_dir: str | Path, rm_dir: str | Path, data_dir: str | Path = DATA_DIR,
                n_test_prompts: int = 256) -> PPOSetup:
    """Load the base (SFT or pretrained), add policy/critic/reward adapters, load the RM, init the critic.

    Checks the SFT and RM folders before anything heavy happens.
    """
    sft_dir, rm_dir, data_dir = Path(sft_dir), Path(rm_dir), Path(data_dir)
    rm_meta_path = rm_dir / "adapter" / "adapter.json"
    if not rm_meta_path.exists():
        raise FileNotFoundError(f"{rm_dir} holds no reward model (missing {rm_meta_path}); run the rm stage first")
    rm_summary = read_json(rm_dir / "summary.json")
    lora = LoraSettings(**{**rm_summary["config"]["lora"],
                           "target_modules": tuple(rm_summary["config"]["lora"]["target_modules"])})
    base, tok = load_sft_model(sft_dir, "pretrained" if cfg.policy_init == "pretrained" else "model")
    cfg.validate(context_length=base.config.max_position_embeddings)
    stack = AdapterStack(base, ["policy", "critic", "reward"], lora)
    stack.load_adapter("reward", rm_dir / "adapter")
    rm_stack = None
    if cfg.policy_init == "pretrained":
        # The RM adapter was trained on the SFT base: on the pretrained base it would read other
        # features, so the RM keeps its own copy of the SFT base (the only case with two bases).
        rm_stack = AdapterStack(load_sft_model(sft_dir, "model")[0], ["reward"], lora)
        rm_stack.load_adapter("reward", rm_dir / "adapter")
        rm_stack.eval()
    if cfg.critic_init == "rm":
        stack.copy_adapter("reward", "critic")
    train = [r["prompt"] for r in data_mod.load_prompts(data_dir / "prompts_train.jsonl")]
    test = [r["prompt"] for r in data_mod.load_prompts(data_dir / "prompts_test.jsonl")][:n_test_prompts]
    sft_examples = []
    if cfg.ptx_coef:
        max_len = base.config.max_position_embeddings
        sft_examples = [encode_example(tok, r["prompt"], r["response"], max_len)
                        for r in data_mod.load_sft(data_dir / "sft.jsonl")]
    return PPOSetup(stack, tok, train, test, sft_examples, rm_stack)


# ----- the loop -------------------------------------------------------------------------------------
class PPOTrainer:
    """Runs PPO iterations over a :class:`PPOSetup`, logging to ``out_dir``."""

    def __init__(self, cfg: PPOConfig, setup: PPOSetup, out_dir: str | Path, preset: str = "custom") -> None:
        self.cfg, self.setup, self.preset = cfg, setup, preset
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.stack, self.tok = setup.stack, setup.tokenizer
        self.device = self.stack.device
        seed_everything(cfg.seed)
        self.rng = random.Random(cfg.seed)
        self.gen = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.policy_params = self.stack.adapter_parameters("policy")
        self.critic_params = self.stack.adapter_parameters("critic")
        self.policy_opt = torch.optim.Adam(self.policy_params, lr=cfg.policy_lr, betas=cfg.adam_betas)
        self.critic_opt = torch.optim.Adam(self.critic_params, lr=cfg.critic_lr, betas=cfg.adam_betas)
        self.reward_moments = core.RunningMoments()
        self.iteration = 0
        self.history: list[dict] = []
        self.samples: list[dict] = []
        self.collapse: tuple[int, str] | None = None
        self.timer = Stopwatch()

    # --- phase 1: rollout ---
    def rollout(self, prompts: Sequence[str]) -> Rollout:
        ids, att = encode_prompts(self.tok, prompts, self.device)
        self.stack.eval()
        with self.stack.activate("policy"):
            return sample(self.stack.base_model, ids, att, self.cfg.max_new_tokens, self.tok.eos_token_id,
                          self.tok.pad_token_id, self.cfg.temperature, self.cfg.top_p, self.gen)

    # --- phases 2-4: score, shape rewards, GAE ---
    @torch.no_grad()
    def make_experience(self, ro: Rollout) -> tuple[Experience, dict]:
        cfg, P = self.cfg, ro.prompt_len
        ids, att = ro.input_ids, ro.attention_mask
        mask = ro.response_mask[:, P:].float()
        old_logp = ro.logprobs[:, P:]
        ref_logits = response_logits(self.stack, None, ids, att, P) / cfg.temperature
        ref_logp = core.logprobs_from_logits(ref_logits, ids[:, P:]) * mask
        values = response_values(self.stack, ids, att, P) * mask
        scores = rm_scores(self.setup.reward_model, ids, att)
        # Score reparameterization (Sec. 5.3.1): normalize+clip or scale with running statistics.
        if cfg.reward_norm_clip is not None:
            used = core.normalize_and_clip_rewards(scores, self.reward_moments, cfg.reward_norm_clip)
        elif cfg.reward_scaling:
            used = core.scale_rewards(scores, self.reward_moments)
        else:
            self.reward_moments.update(scores)
            used = scores
        kl = core.kl_k1(old_logp, ref_logp) * mask
        rewards = core.shape_rewards(used, kl, mask, cfg.kl_coef)
        adv, ret = core.compute_gae(rewards, values, mask, cfg.gamma, cfg.lam)
        if cfg.adv_norm_clip is not None:
            adv = core.normalize_and_clip_advantages(adv, mask, cfg.adv_norm_clip)
        behaviour = ref_logp if cfg.old_policy == "reference" else old_logp
        exp = Experience(ids, att, P, mask, behaviour, ref_logp, values, rewards, adv, ret)
        seq_kl = (kl * mask).sum(-1)
        stats = {
            "reward": scores.mean().item(),
            "reward_std": scores.std().item() if len(scores) > 1 else 0.0,
            "reward_used": used.mean().item(),
            "kl_per_token": core.masked_mean(kl, mask).item(),
            "kl_per_sequence": seq_kl.mean().item(),
            "kl_k3_per_token": core.masked_mean(core.kl_k3(old_logp, ref_logp), mask).item(),
            "response_length": mask.sum(-1).mean().item(),
            "finished_fraction": ro.finished.float().mean().item(),
            "policy_perplexity": core.response_perplexity(old_logp, mask).mean().item(),
            "ref_perplexity": core.response_perplexity(ref_logp, mask).mean().item(),
            "advantage_mean": core.masked_mean(adv, mask).item(),
            "return_mean": core.masked_mean(ret, mask).item(),
            "value_mean": core.masked_mean(values, mask).item(),
            "explained_variance": core.explained_variance(values, ret, mask),
        }
        return exp, stats

    # --- phase 5: update ---
    def policy_step_loss(self, mb: dict[str, torch.Tensor], P: int) -> tuple[torch.Tensor, dict]:
        cfg = self.cfg
        logits = response_logits(self.stack, "policy", mb["input_ids"], mb["attention_mask"], P) / cfg.temperature
        labels = mb["input_ids"][:, P:]
        logp = core.logprobs_from_logits(logits, labels)
        loss, st = core.policy_loss(logp, mb["old_logprobs"], mb["advantages"], mb["mask"], cfg.clip_eps)
        stats = {"pg_loss": loss.item(), "clipfrac": st["clipfrac"].item(), "approx_kl": st["approx_kl"].item()}
        entropy = core.entropy_from_logits(logits.detach() if not cfg.entropy_coef else logits)
        stats["entropy"] = core.masked_mean(entropy.detach(), mb["mask"]).item()
        if cfg.entropy_coef:
            loss = loss + core.entropy_bonus(entropy, mb["mask"], cfg.entropy_coef, cfg.entropy_target)
        if cfg.ptx_coef and self.setup.sft_examples:
            batch = self.rng.sample(self.setup.sft_examples, min(len(self.setup.sft_examples), labels.shape[0]))
            ids, att, lm = pad_batch([b[0] for b in batch], [b[1] for b in batch], self.tok.pad_token_id)
            ids, att, lm = ids.to(self.device), att.to(self.device), lm.to(self.device)
            ptx_logits = self.stack.logits("policy", ids, att)[:, :-1]
            ptx = core.ptx_loss(ptx_logits, ids[:, 1:], lm[:, 1:])
            loss = loss + cfg.ptx_coef * ptx
            stats["ptx_loss"] = ptx.item()
        return loss, stats

    def critic_step_loss(self, mb: dict[str, torch.Tensor], P: int) -> tuple[torch.Tensor, dict]:
        values = response_values(self.stack, mb["input_ids"], mb["attention_mask"], P)
        loss, st = core.value_loss(values, mb["old_values"], mb["returns"], mb["mask"], self.cfg.value_clip)
        return loss, {"value_loss": loss.item(), "vf_clipfrac": st["vf_clipfrac"].item()}

    def update(self, exp: Experience, train_policy: bool) -> dict:
        cfg = self.cfg
        self.stack.train()
        agg: dict[str, list[float]] = {}
        for _ in range(cfg.ppo_epochs):
            for mb in exp.minibatches(cfg.minibatch_size, self.rng):
                stats = {}
                self.policy_opt.zero_grad(set_to_none=True)
                self.critic_opt.zero_grad(set_to_none=True)
                if train_policy:
                    p_loss, p_stats = self.policy_step_loss(mb, exp.prompt_len)
                    p_loss.backward()
                    stats.update(p_stats)
                v_loss, v_stats = self.critic_step_loss(mb, exp.prompt_len)
                v_loss.backward()
                stats.update(v_stats)
                if cfg.max_grad_norm is not None:  # one norm over policy and critic (PPO-max #6)
                    stats["grad_norm"] = core.clip_grad_norm_global(self.policy_params + self.critic_params,
                                                                    cfg.max_grad_norm)
                if train_policy:
                    self.policy_opt.step()
                self.critic_opt.step()
                for k, v in stats.items():
                    agg.setdefault(k, []).append(v)
        return {k: float(np.mean(v)) for k, v in agg.items()}

    # --- one iteration, and the run ---
    def step(self) -> dict:
        cfg = self.cfg
        self.iteration += 1
        prompts = self.rng.sample(self.setup.train_prompts, cfg.rollout_batch)
        ro = self.rollout(prompts)
        exp, stats = self.make_experience(ro)
        texts = decode_responses(self.tok, ro)
        gold = [world.gold_score(p, t, f) for p, t, f in zip(prompts, texts, ro.finished.tolist())]
        train_policy = self.iteration > cfg.critic_pretrain_iterations
        stats.update(self.update(exp, train_policy))
        row = {"iteration": self.iteration, "train_gold_score": float(np.mean(gold)),
               "repetition_fraction": repeated_trigram_fraction(texts), "policy_updated": train_policy, **stats}
        if self.iteration % cfg.gold_every == 0 or self.iteration == cfg.iterations:
            row.update(self.gold_eval())
        if self.iteration % cfg.sample_every == 0 or self.iteration == 1:
            self.samples += [{"iteration": self.iteration, **s} for s in self._samples(prompts, texts, gold, exp)]
        row["wall_seconds"] = self.timer()
        return row

    def gold_eval(self) -> dict:
        with self.stack.activate("policy"):
            ev = evaluate_gold(self.stack.base_model, self.tok, self.setup.test_prompts, self.cfg.max_new_tokens,
                               device=self.device)
        return {"gold_score": ev.score, "eval_response_length": float(np.mean(ev.lengths)),
                **{f"gold/{k}": v for k, v in ev.report.items() if k not in ("overall", "n")}}

    def _samples(self, prompts, texts, gold, exp, k: int = 4) -> list[dict]:
        scores = exp.rewards.sum(-1)
        return [{"prompt": p.split("Human:")[-1].replace("\n\nAssistant:", "").strip(), "response": t.strip(),
                 "gold": round(g, 3), "shaped_return": round(float(s), 3)}
                for p, t, g, s in list(zip(prompts, texts, gold, scores))[:k]]

    def train(self) -> dict:
        """Run every iteration; on Ctrl-C save a checkpoint and stop cleanly. Returns the summary."""
        cfg = self.cfg
        log = MetricsLog(self.out / "metrics.jsonl")
        interrupted = False
        baseline = self.gold_eval()  # the starting policy (SFT), same measurement as every stage
        log.log({"iteration": 0, **baseline})
        prev = signal.getsignal(signal.SIGINT)
        try:
            bar = progress(range(self.iteration, cfg.iterations), f"PPO {self.preset}")
            for _ in bar:
                row = self.step()
                self.history.append(row)
                log.log(row)
                bar.set_postfix(reward=f"{row['reward']:.2f}", kl=f"{row['kl_per_token']:.3f}",
                                len=f"{row['response_length']:.1f}")
                if self.collapse is None:
                    self.collapse = detect_collapse(self.history, cfg.collapse)
                    if self.collapse:
                        log.log({"iteration": self.iteration, "event": "collapse", "reason": self.collapse[1]})
                if cfg.checkpoint_every and self.iteration % cfg.checkpoint_every == 0:
                    self.save_checkpoint(self.out / "checkpoint")
        except KeyboardInterrupt:
            interrupted = True
            self.save_checkpoint(self.out / "checkpoint")
        finally:
            signal.signal(signal.SIGINT, prev)
            log.close()
        self.save_checkpoint(self.out / "checkpoint")
        summary = self.summary(baseline, interrupted)
        write_json(self.out / "summary.json", summary)
        with (self.out / "samples.jsonl").open("w") as fh:
            for s in self.samples:
                fh.write(json.dumps(s, sort_keys=True) + "\n")
        from ..plotting import plot_ppo

        plot_ppo([self.out], self.out / "ppo_monitors.png", labels=[self.preset])
        return summary

    def summary(self, baseline: dict, interrupted: bool = False) -> dict:
        h = self.history
        golds = [baseline["gold_score"]] + [r["gold_score"] for r in h if "gold_score" in r]
        return {
            "stage": "ppo",
            "preset": self.preset,
            "config": self.cfg.to_dict(),
            "iterations": self.iteration,
            "interrupted": interrupted,
            "initial_reward": h[0]["reward"] if h else None,
            "final_reward": h[-1]["reward"] if h else None,
            "initial_gold_score": baseline["gold_score"],
            "peak_gold_score": max(golds),
            "final_gold_score": golds[-1],
            "final_kl": h[-1]["kl_per_token"] if h else None,
            "final_kl_per_sequence": h[-1]["kl_per_sequence"] if h else None,
            "initial_response_length": h[0]["response_length"] if h else None,
            "final_response_length": h[-1]["response_length"] if h else None,
            "final_repetition_fraction": h[-1]["repetition_fraction"] if h else None,
            "collapse_detected": self.collapse is not None,
            "collapse_iteration": self.collapse[0] if self.collapse else None,
            "collapse_reason": self.collapse[1] if self.collapse else None,
            "wall_seconds": self.timer(),
        }

    # --- checkpoints ---
    def save_checkpoint(self, path: str | Path) -> None:
        """Adapters, heads, optimizer states, running statistics, RNG states and the iteration."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.stack.save_adapter("policy", path / "policy")
        self.stack.save_adapter("critic", path / "critic")
        torch.save({
            "iteration": self.iteration,
            "policy_opt": self.policy_opt.state_dict(),
            "critic_opt": self.critic_opt.state_dict(),
            "reward_moments": self.reward_moments.state_dict(),
            "rng": self.rng.getstate(),
            "gen": self.gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "history": self.history,
            "samples": self.samples,
            "collapse": self.collapse,
        }, path / "trainer.pt")


def run_ppo(out_dir: str | Path, sft_dir: str | Path, rm_dir: str | Path, cfg: PPOConfig, preset: str = "custom",
            data_dir: str | Path = DATA_DIR) -> dict:
    """Build the setup and run PPO; writes metrics.jsonl, summary.json, samples, plots, checkpoint."""
    cfg.validate()
    setup = build_setup(cfg, sft_dir, rm_dir, data_dir)
    return PPOTrainer(cfg, setup, out_dir, preset).train()
