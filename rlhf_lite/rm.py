"""Stage 2: the reward model (PAPER.md Sec. 1, step 2; paper Sec. 3.1, Eq. 1-2).

The RM is the SFT backbone with a bias-free linear head read at the last token (the EOS) of
``prompt + response + EOS``. Here it is the ``reward`` LoRA adapter plus its head on the shared base.
Training minimizes the Bradley-Terry pairwise loss, optionally plus an LM loss on the chosen response
(paper Eq. 2 with beta_rm = 1; the released script sets it to 0).

Beyond accuracy, the stage measures what accuracy hides (the paper's caution, Sec. 3.1): agreement with
the gold judge, the RM's correlation with length and gold, and a controlled exploit probe that pads
correct answers with filler phrases.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerFast

from . import data as data_mod
from . import world
from .batching import encode_examples, last_token_index, pad_batch
from .evaluation import EVAL_SEED, rollout_in_batches
from .models import AdapterStack, LoraSettings
from .ppo.core import ptx_loss
from .sft import load_sft_model, model_fingerprint
from .utils import DATA_DIR, MetricsLog, Stopwatch, progress, seed_everything, write_json


@dataclass(frozen=True)
class RMConfig:
    """Settings of the reward-model stage."""

    steps: int = 150
    """Optimizer steps (each a batch of preference pairs)."""
    batch_size: int = 64
    """Preference pairs per step (chosen and rejected run in one forward pass)."""
    lr: float = 2e-3
    """AdamW learning rate of the reward adapter and head (constant after a short warm-up)."""
    warmup_steps: int = 20
    """Linear warm-up steps."""
    lm_coef: float | None = 1.0
    """beta_rm of paper Eq. 2: weight of the LM loss on chosen responses; None turns it off."""
    eval_every: int = 25
    """Steps between train/test accuracy measurements."""
    n_eval_pairs: int = 256
    """Test pairs used for the periodic accuracy curve (the final numbers use all test pairs)."""
    n_fresh_prompts: int = 128
    """Test prompts for which two fresh SFT samples form a pair (gold agreement off the training
    distribution)."""
    max_new_tokens: int = 24
    """Response budget of the fresh SFT samples."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA settings of the reward adapter (PPO must use the same)."""
    seed: int = 0
    """Seed of batch order and sampling."""

    def validate(self) -> None:
        """Fail before training on impossible values."""
        for name in ("steps", "batch_size", "eval_every", "n_eval_pairs", "max_new_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"RMConfig.{name} must be positive, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"RMConfig.lr must be > 0, got {self.lr}")
        if self.lm_coef is not None and self.lm_coef < 0:
            raise ValueError(f"RMConfig.lm_coef must be >= 0 or None, got {self.lm_coef}")


# ----- the math -----------------------------------------------------------------------------------
def pairwise_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry ranking loss, paper Eq. 1: mean of -log sigmoid(r_chosen - r_rejected). Shapes (B,)."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def scores_at_eos(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Read the head at each row's last real token (the EOS): (B, T) values -> (B,) scores.

    Works for left and right padding alike.
    """
    idx = last_token_index(attention_mask)
    return values.gather(1, idx[:, None]).squeeze(1)


def rm_score(stack: AdapterStack, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """RM scores (B,) of full sequences ``prompt + response + EOS``."""
    return scores_at_eos(stack.values("reward", input_ids, attention_mask), attention_mask)


def rm_loss(
    stack: AdapterStack, ids: torch.Tensor, att: torch.Tensor, loss_mask: torch.Tensor, lm_coef: float | None
) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of a batch whose first half is chosen and second half rejected sequences (2B, T).

    ``loss_mask`` marks response tokens; the LM term (paper Eq. 2) uses only the chosen half's.
    """
    B = ids.shape[0] // 2
    if lm_coef:
        values, logits = stack.values_and_logits("reward", ids, att)
    else:
        values, logits = stack.values("reward", ids, att), None
    scores = scores_at_eos(values, att)
    rc, rr = scores[:B], scores[B:]
    loss = pairwise_loss(rc, rr)
    stats = {"rank_loss": loss.item(), "accuracy": (rc > rr).float().mean().item(), "margin": (rc - rr).mean().item()}
    if lm_coef:
        lm = ptx_loss(logits[:B, :-1], ids[:B, 1:], loss_mask[:B, 1:])
        loss = loss + lm_coef * lm
        stats["lm_loss"] = lm.item()
    stats["loss"] = loss.item()
    return loss, stats


# ----- batching -----------------------------------------------------------------------------------
def encode_pairs(tok: PreTrainedTokenizerFast, pairs: Sequence[data_mod.PreferencePair], max_len: int
                 ) -> list[tuple[list[int], list[int], list[int], list[int]]]:
    """Token ids and response masks of (chosen, rejected) for each pair."""
    chosen = encode_examples(tok, [p.prompt for p in pairs], [p.chosen for p in pairs], max_len)
    rejected = encode_examples(tok, [p.prompt for p in pairs], [p.rejected for p in pairs], max_len)
    return [(c, cm, r, rm) for (c, cm), (r, rm) in zip(chosen, rejected)]


def collate_pairs(batch, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chosen rows then rejected rows, right-padded: (2B, T) ids, attention and response masks."""
    seqs = [b[0] for b in batch] + [b[2] for b in batch]
    masks = [b[1] for b in batch] + [b[3] for b in batch]
    return pad_batch(seqs, masks, pad_id)


@torch.no_grad()
def score_texts(stack: AdapterStack, tok: PreTrainedTokenizerFast, prompts: Sequence[str], responses: Sequence[str],
                max_len: int, batch_size: int = 256) -> np.ndarray:
    """RM scores of (prompt, response) pairs, in batches; responses get an EOS appended."""
    out = []
    for i in range(0, len(prompts), batch_size):
        enc = encode_examples(tok, prompts[i:i + batch_size], responses[i:i + batch_size], max_len)
        ids, att, _ = pad_batch([e[0] for e in enc], [e[1] for e in enc], tok.pad_token_id)
        out.append(rm_score(stack, ids.to(stack.device), att.to(stack.device)).cpu())
    return torch.cat(out).numpy()


@torch.no_grad()
def pair_accuracy(stack: AdapterStack, encoded, pad_id: int, batch_size: int = 128) -> tuple[float, np.ndarray]:
    """Fraction of pairs with r_chosen > r_rejected, and the margins (N,)."""
    margins = []
    for i in range(0, len(encoded), batch_size):
        ids, att, _ = collate_pairs(encoded[i:i + batch_size], pad_id)
        s = rm_score(stack, ids.to(stack.device), att.to(stack.device)).cpu()
        B = ids.shape[0] // 2
        margins.append(s[:B] - s[B:])
    m = torch.cat(margins).numpy()
    return float((m > 0).mean()), m


# ----- evaluation of what accuracy hides --------------------------------------------------------------
def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """How often two score differences order a pair the same way, over pairs where ``b`` is not a tie."""
    keep = np.abs(b) > 1e-9
    return float((np.sign(a[keep]) == np.sign(b[keep])).mean()) if keep.any() else float("nan")


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation coefficient (nan when either side is constant)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def exploit_probe_texts(prompts: Sequence[str], max_fillers: int = 4) -> list[dict]:
    """The controlled probe: each reference answer with 0..max_fillers distinct fillers appended,
    and with one filler repeated 2..max_fillers times. One dict per (prompt, variant)."""
    rows = []
    for p in prompts:
        ref = world.reference_answer(p)
        for k in range(max_fillers + 1):
            rows.append({"prompt": p, "kind": "distinct", "fillers": k,
                         "response": ref + "".join(" " + f for f in world.FILLERS[:k])})
        for k in range(2, max_fillers + 1):
            rows.append({"prompt": p, "kind": "repeated", "fillers": k,
                         "response": ref + (" " + world.FILLERS[0]) * k})
    return rows


def run_exploit_probe(stack: AdapterStack, tok: PreTrainedTokenizerFast, prompts: Sequence[str], max_len: int
                      ) -> tuple[list[dict], dict[str, float]]:
    """Score the probe with the RM and the gold judge; returns rows and the summary gains."""
    rows = exploit_probe_texts(prompts)
    rm = score_texts(stack, tok, [r["prompt"] for r in rows], [r["response"] for r in rows], max_len)
    for r, s in zip(rows, rm):
        r["rm"] = float(s)
        r["gold"] = world.gold_score(r["prompt"], r["response"])
    plain = [r for r in rows if r["fillers"] == 0]

    def change(kind: str, key: str) -> float:
        padded = [r[key] for r in rows if r["fillers"] > 0 and r["kind"] == kind]
        return float(np.mean(padded) - np.mean([r[key] for r in plain]))

    # The headline gain is over distinct fillers (the annotators' length taste); one filler repeated
    # is reported apart, since repetition is penalised by gold and annotators alike.
    summary = {
        "padding_rm_gain": change("distinct", "rm"),
        "padding_gold_change": change("distinct", "gold"),
        "repeated_padding_rm_gain": change("repeated", "rm"),
        "repeated_padding_gold_change": change("repeated", "gold"),
    }
    return rows, summary


def probe_curve(rows: Sequence[dict], kind: str, key: str) -> tuple[list[int], list[float]]:
    """Mean ``key`` ("rm" or "gold") per number of fillers, for probe rows of ``kind``."""
    ks = sorted({r["fillers"] for r in rows if r["kind"] == kind or r["fillers"] == 0})
    return ks, [float(np.mean([r[key] for r in rows if r["fillers"] == k and (k == 0 or r["kind"] == kind)]))
                for k in ks]


# ----- the stage ----------------------------------------------------------------------------------
def build_rm_stack(sft_dir: str | Path, lora: LoraSettings) -> tuple[AdapterStack, PreTrainedTokenizerFast]:
    """The SFT model as base, with a fresh ``reward`` adapter and head."""
    base, tok = load_sft_model(sft_dir)
    return AdapterStack(base, ["reward"], lora), tok


def train_rm(out_dir: str | Path, sft_dir: str | Path, cfg: RMConfig | None = None,
             data_dir: str | Path = DATA_DIR) -> dict:
    """Train and evaluate the RM; write ``adapter/``, metrics.jsonl, probe.jsonl, plots, summary.json."""
    cfg = cfg or RMConfig()
    cfg.validate()
    timer = Stopwatch()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = Path(data_dir)
    train_pairs = data_mod.load_preference_pairs(data_dir / "prefs_train.jsonl")
    test_pairs = data_mod.load_preference_pairs(data_dir / "prefs_test.jsonl")
    test_prompts = [r["prompt"] for r in data_mod.load_prompts(data_dir / "prompts_test.jsonl")]
    sft_model = model_fingerprint(sft_dir)  # PPO checks that it loads this RM onto the same SFT model

    seed_everything(cfg.seed)
    stack, tok = build_rm_stack(sft_dir, cfg.lora)
    max_len = stack.base_model.config.max_position_embeddings
    train_enc = encode_pairs(tok, train_pairs, max_len)
    test_enc = encode_pairs(tok, test_pairs, max_len)
    rng = random.Random(cfg.seed)
    eval_train = rng.sample(train_enc, min(cfg.n_eval_pairs, len(train_enc)))
    eval_test = test_enc[: cfg.n_eval_pairs]

    params = stack.adapter_parameters("reward")
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup_steps))
    log = MetricsLog(out / "metrics.jsonl")
    order: list[int] = []
    stack.train()
    for step in progress(range(1, cfg.steps + 1), "reward model"):
        if len(order) < cfg.batch_size:  # epochs of shuffled pairs
            order += rng.sample(range(len(train_enc)), len(train_enc))
        batch = [train_enc[i] for i in order[: cfg.batch_size]]
        del order[: cfg.batch_size]
        ids, att, lm = collate_pairs(batch, tok.pad_token_id)
        loss, stats = rm_loss(stack, ids.to(stack.device), att.to(stack.device), lm.to(stack.device), cfg.lm_coef)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        row = {"step": step, **stats}
        if step % cfg.eval_every == 0 or step == cfg.steps:
            stack.eval()
            row["train_accuracy"], _ = pair_accuracy(stack, eval_train, tok.pad_token_id)
            row["test_accuracy"], _ = pair_accuracy(stack, eval_test, tok.pad_token_id)
            stack.train()
        log.log(row)
    log.close()
    stack.eval()
    stack.save_adapter("reward", out / "adapter")

    # --- final evaluation on every test pair -------------------------------------------------------
    # One scoring pass over every test response serves accuracy, agreement and the correlations.
    prompts_all = [p.prompt for p in test_pairs for _ in (0, 1)]
    responses_all = [r for p in test_pairs for r in (p.chosen, p.rejected)]
    rm_all = score_texts(stack, tok, prompts_all, responses_all, max_len)
    margins = rm_all[0::2] - rm_all[1::2]
    test_acc = float((margins > 0).mean())
    gold_diff = np.array([p.meta["gold_chosen"] - p.meta["gold_rejected"] for p in test_pairs])
    gold_agree = agreement(margins, gold_diff)
    annot_agree = agreement(np.ones_like(gold_diff), gold_diff)  # labels order chosen first
    gold_all = np.array([world.gold_score(p, r) for p, r in zip(prompts_all, responses_all)])
    len_all = np.array([len(tok(r, add_special_tokens=False)["input_ids"]) for r in responses_all])

    # Fresh pairs: two SFT samples per test prompt, off the annotators' candidate distribution.
    fresh_prompts = test_prompts[: cfg.n_fresh_prompts]
    gen = torch.Generator(device=stack.device).manual_seed(EVAL_SEED)
    with stack.activate(None):
        sampled = [rollout_in_batches(stack.base_model, tok, fresh_prompts, cfg.max_new_tokens, gen,
                                      device=stack.device) for _ in (0, 1)]
    fresh_rm = [score_texts(stack, tok, fresh_prompts, s[0], max_len) for s in sampled]
    fresh_gold = [np.array([world.gold_score(p, r, f) for p, r, f in zip(fresh_prompts, s[0], s[1])]) for s in sampled]
    fresh_agree = agreement(fresh_rm[0] - fresh_rm[1], fresh_gold[0] - fresh_gold[1])

    probe_prompts = [p for p in test_prompts if world.category_of(p) != "harmful"][:64]
    probe_rows, probe = run_exploit_probe(stack, tok, probe_prompts, max_len)
    with (out / "probe.jsonl").open("w") as fh:
        import json

        for r in probe_rows:
            fh.write(json.dumps(r, sort_keys=True) + "\n")
    np.savez(out / "test_scores.npz", rm=rm_all, gold=gold_all, length=len_all, margins=margins, gold_diff=gold_diff)

    summary = {
        "stage": "rm",
        "config": asdict(cfg),
        "sft_model": sft_model,
        "test_accuracy": test_acc,
        "gold_agreement": gold_agree,
        "annotator_gold_agreement": annot_agree,
        "fresh_gold_agreement": fresh_agree,
        "length_correlation": pearson(rm_all, len_all),
        "gold_correlation": pearson(rm_all, gold_all),
        **probe,
        "probe_rm_by_fillers": probe_curve(probe_rows, "distinct", "rm")[1],
        "probe_gold_by_fillers": probe_curve(probe_rows, "distinct", "gold")[1],
        "wall_seconds": timer(),
    }
    write_json(out / "summary.json", summary)
    from .plotting import plot_rm

    plot_rm(out, out / "rm_report.png")
    return summary


def load_rm_summary(rm_dir: str | Path) -> dict:
    """summary.json of an RM run (raises FileNotFoundError naming the folder)."""
    from .utils import read_json

    return read_json(Path(rm_dir) / "summary.json")
