"""DPO, GRPO and best-of-n: each loss and estimator against hand values or a plain loop, and the measurement."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from rlhf_lite.beyond.bon import bon_curve, bon_expected, bon_kl, bon_weights
from rlhf_lite.beyond.dpo import DPOConfig, dpo_loss, pair_logprobs, sequence_logprobs
from rlhf_lite.beyond.grpo import GRPOConfig, group_advantages, grpo_loss
from rlhf_lite.beyond.measure import as_monitors, measure_policy
from rlhf_lite.settings import SettingError
from tests.conftest import make_stack

LN2 = math.log(2)


# ----- DPO ------------------------------------------------------------------------------------------
def test_dpo_loss_by_hand() -> None:
    # h = beta * ((pi_w - ref_w) - (pi_l - ref_l)): pair 1: 0.5 * (0.5 + 0.5) = 0.5; pair 2: 0.5 * (0 - 1) = -0.5
    pc = torch.tensor([-1.0, -2.0], requires_grad=True)
    loss, st = dpo_loss(pc, torch.tensor([-3.0, -1.0]), torch.tensor([-1.5, -2.0]), torch.tensor([-2.5, -2.0]), 0.5)
    # -log sigmoid(0.5) = log(1 + e^-0.5) = 0.474077; -log sigmoid(-0.5) = log(1 + e^0.5) = 0.974077
    assert loss.item() == pytest.approx((0.474077 + 0.974077) / 2, abs=1e-6)
    assert st["reward_accuracy"].item() == 0.5 and st["margin"].item() == pytest.approx(0.0, abs=1e-7)
    assert st["chosen_reward"].item() == pytest.approx(0.125) and st["rejected_reward"].item() == pytest.approx(0.125)
    loss.backward()
    # d/d pi_w of -log sigmoid(h) / 2 = -beta * sigmoid(-h) / 2: sigmoid(-0.5) = 0.377541, sigmoid(0.5) = 0.622459
    assert pc.grad.tolist() == pytest.approx([-0.5 * 0.377541 / 2, -0.5 * 0.622459 / 2], abs=1e-6)


def test_conservative_dpo_by_hand_and_the_start_of_training() -> None:
    one = [torch.tensor([x]) for x in (-1.0, -3.0, -1.5, -2.5)]  # h = 0.5 at beta 0.5
    plain, _ = dpo_loss(*one, beta=0.5)
    smooth, _ = dpo_loss(*one, beta=0.5, label_smoothing=0.2)
    assert plain.item() == pytest.approx(0.474077, abs=1e-6)
    assert smooth.item() == pytest.approx(0.8 * 0.474077 + 0.2 * 0.974077, abs=1e-6)
    same = torch.tensor([-4.0, -7.0])
    loss, st = dpo_loss(same, same - 1, same, same - 1, beta=0.1)  # policy == reference: h = 0
    assert loss.item() == pytest.approx(LN2) and st["reward_accuracy"].item() == 0.0


def test_sequence_logprobs_against_a_plain_loop() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 7, generator=g)
    labels = torch.tensor([[1, 2, 3, -100], [4, 5, 6, 0]])
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1]])
    want = [sum(torch.log_softmax(logits[b, t], -1)[labels[b, t]].item() for t in range(4) if mask[b, t])
            for b in range(2)]
    assert sequence_logprobs(logits, labels, mask).tolist() == pytest.approx(want, abs=1e-5)


def test_pair_logprobs_reads_only_response_tokens() -> None:
    stack = make_stack(("policy",))
    ids = torch.tensor([[5, 6, 7, 8, 9, 0], [5, 11, 12, 13, 0, 0]])  # right-padded, pad = 0
    att = (ids != 0).long()
    loss_mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 0, 1, 1, 0, 0]])
    for name in ("policy", None):
        with torch.no_grad():
            full = torch.log_softmax(stack.logits(name, ids, att), -1)
            want = [sum(full[b, t - 1, ids[b, t]].item() for t in range(1, 6) if loss_mask[b, t]) for b in range(2)]
            assert pair_logprobs(stack, name, ids, att, loss_mask).tolist() == pytest.approx(want, abs=1e-5)


# ----- GRPO -----------------------------------------------------------------------------------------
def test_group_advantages_by_hand() -> None:
    r = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 5.0, 5.0, 5.0])
    # group 2: mean 4/3, sample std sqrt(((8/3)^2 + 2 (4/3)^2) / 2) = 2.309401
    want = [-1 / 1.0001, 0.0, 1 / 1.0001, (8 / 3) / 2.309501, -(4 / 3) / 2.309501, -(4 / 3) / 2.309501, 0, 0, 0]
    assert group_advantages(r, 3).tolist() == pytest.approx(want, abs=1e-5)
    assert group_advantages(r, 3, scale_by_std=False).tolist() == pytest.approx(
        [-1, 0, 1, 8 / 3, -4 / 3, -4 / 3, 0, 0, 0], abs=1e-6)
    with pytest.raises(ValueError, match="not groups of 4"):
        group_advantages(r, 4)
    # eight equal float32 scores: their float32 mean is off by one rounding step, which divided by the eps of
    # an empty spread gave every response an advantage of 6e-4; equal scores carry no signal
    assert torch.mean(torch.full((8,), 0.7)).item() != torch.tensor(0.7).item()
    assert group_advantages(torch.full((16,), 0.7), 8).tolist() == [0.0] * 16


def test_grpo_loss_by_hand_sequence_and_token_means() -> None:
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -9.0]], requires_grad=True)
    ref = logp.detach() - LN2  # pi_ref / pi = 1/2 on every token: k3 = (1/2 - 1) + ln 2 = 0.193147
    mask = torch.tensor([[1, 1], [1, 0]])
    adv = torch.tensor([1.0, -2.0])
    k3 = 0.5 - 1 + LN2
    loss, st = grpo_loss(logp, logp.detach(), ref, adv, mask, 0.2, 0.1, "sequence")
    # ratio 1: per response the token mean of A - 0.1 k3, then the mean over responses
    assert loss.item() == pytest.approx(-((1 - 0.1 * k3) + (-2 - 0.1 * k3)) / 2, abs=1e-6)
    assert st["kl_k3"].item() == pytest.approx(k3, abs=1e-6) and st["clipfrac"].item() == 0.0
    loss.backward()
    # d/dlogp of -(rho A - beta k3) at rho = 1: -A + beta (1 - pi_ref/pi) = -A + 0.05, over |o_i| and B
    assert logp.grad.flatten().tolist() == pytest.approx([(-1 + 0.05) / 4, (-1 + 0.05) / 4, (2 + 0.05) / 2, 0.0],
                                                         abs=1e-6)
    token, _ = grpo_loss(logp, logp.detach(), ref, adv, mask, 0.2, 0.1, "token")
    assert token.item() == pytest.approx(-(2 * (1 - 0.1 * k3) + (-2 - 0.1 * k3)) / 3, abs=1e-6)
    nokl, _ = grpo_loss(logp, logp.detach(), ref, adv, mask, 0.2, None, "sequence")
    assert nokl.item() == pytest.approx(0.5, abs=1e-6)


def test_grpo_loss_clips_like_ppo() -> None:
    old = torch.zeros(2, 1)
    logp = torch.full((2, 1), 0.5)  # ratio e^0.5 = 1.6487
    loss, st = grpo_loss(logp, old, logp, torch.tensor([1.0, -1.0]), torch.ones(2, 1), 0.2, None)
    # A = 1: min(1.6487, 1.2) = 1.2 (clipped); A = -1: min(-1.6487, -1.2) = -1.6487 (not clipped)
    assert loss.item() == pytest.approx(-(1.2 - math.exp(0.5)) / 2, abs=1e-6)
    assert st["clipfrac"].item() == 0.5


def test_grpo_loss_ignores_garbage_off_the_mask() -> None:
    logp = torch.tensor([[-1.0, -200.0]], requires_grad=True)  # exp(ref - logp) would overflow off the mask
    loss, _ = grpo_loss(logp, torch.tensor([[-1.0, 0.0]]), torch.tensor([[-1.0, 0.0]]), torch.tensor([1.0]),
                        torch.tensor([[1, 0]]), 0.2, 0.04)
    loss.backward()
    assert loss.item() == pytest.approx(-1.0) and logp.grad.tolist() == [[-1.0, 0.0]]


def test_configs_refuse_impossible_settings() -> None:
    with pytest.raises(SettingError, match=r"GRPOConfig.group_size must be >= 2"):
        GRPOConfig(group_size=1).validate()
    with pytest.raises(SettingError, match=r"GRPOConfig.minibatch_size must divide .* \(64\)"):
        GRPOConfig(minibatch_size=48).validate()
    with pytest.raises(SettingError, match=r"DPOConfig.label_smoothing must lie in \[0, 0.5\)"):
        DPOConfig(label_smoothing=0.5).validate()
    with pytest.raises(SettingError, match=r"DPOConfig.max_new_tokens must be below the model's context length"):
        DPOConfig(max_new_tokens=128).validate(context_length=128)


# ----- best-of-n ------------------------------------------------------------------------------------
def test_bon_kl_by_hand() -> None:
    assert bon_kl(1) == 0.0
    assert bon_kl(2) == pytest.approx(LN2 - 0.5)
    assert bon_kl(4) == pytest.approx(2 * LN2 - 0.75)
    with pytest.raises(ValueError):
        bon_kl(0)


def test_bon_expected_against_every_subset() -> None:
    g = torch.Generator().manual_seed(3)
    scores, values = torch.randn(6, generator=g).tolist(), torch.randn(6, generator=g).tolist()
    for n in range(1, 7):
        subsets = list(itertools.combinations(range(6), n))
        want = sum(values[max(s, key=lambda i: scores[i])] for s in subsets) / len(subsets)
        assert bon_expected(scores, values, n) == pytest.approx(want, abs=1e-12)
        assert bon_weights(6, n).sum() == pytest.approx(1.0)
    assert bon_expected(scores, values, 1) == pytest.approx(sum(values) / 6)
    assert bon_expected(scores, values, 6) == values[max(range(6), key=lambda i: scores[i])]


def test_bon_curve_is_the_mean_over_prompts() -> None:
    import numpy as np

    scores = np.array([[0.1, 0.9, 0.5], [2.0, 1.0, 3.0]])
    gold = np.array([[1.0, -1.0, 0.0], [0.0, 5.0, 2.0]])
    rows = bon_curve(scores, {"gold_score": gold}, (1, 3))
    assert rows[0] == {"n": 1, "kl_bon": 0.0, "gold_score": pytest.approx((0 + 7 / 3) / 2)}
    assert rows[1]["gold_score"] == pytest.approx((-1.0 + 2.0) / 2) and rows[1]["kl_bon"] == pytest.approx(bon_kl(3))


# ----- the common measurement ------------------------------------------------------------------------
class _Tok:
    """Prompts are space-separated token ids; eos 1, pad 0."""

    eos_token_id, pad_token_id, padding_side = 1, 0, "left"

    def __call__(self, texts, return_tensors=None, padding=False, add_special_tokens=False):
        rows = [[int(t) for t in s.split()] for s in texts]
        width = max(map(len, rows))
        ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids)


def test_measure_policy_kl_and_reward_against_full_forward_passes() -> None:
    from rlhf_lite.evaluation import GoldJudge
    from rlhf_lite.text import Prompt

    stack = make_stack(("policy", "reward"))
    judge = GoldJudge(lambda p, r, f: float(len(r.split())), lambda p: "all", ("all",))
    prompts = [Prompt(t, t) for t in ("5 6 7", "8 9", "10 11 12 13")]
    row, ev, stats = measure_policy(stack, "policy", _Tok(), prompts, 5, judge, stack, samples_per_prompt=2)
    assert row["gold_score"] == ev.score and ev.report["n"] == 6.0
    kl, reward = [], []
    with torch.no_grad():
        for ro in ev.rollouts:
            P = ro.prompt_len
            pol = torch.log_softmax(stack.logits("policy", ro.input_ids, ro.attention_mask), -1)
            ref = torch.log_softmax(stack.logits(None, ro.input_ids, ro.attention_mask), -1)
            values = stack.values("reward", ro.input_ids, ro.attention_mask)
            for b in range(ro.input_ids.shape[0]):
                toks = [t for t in range(P, ro.input_ids.shape[1]) if ro.response_mask[b, t]]
                kl.append(sum(pol[b, t - 1, ro.input_ids[b, t]] - ref[b, t - 1, ro.input_ids[b, t]] for t in toks))
                reward.append(values[b, toks[-1]])
    assert stats.kl.tolist() == pytest.approx([float(k) for k in kl], abs=1e-4)
    assert row["eval_kl_per_sequence"] == pytest.approx(sum(float(k) for k in kl) / 6, abs=1e-4)
    assert row["eval_reward"] == pytest.approx(sum(float(r) for r in reward) / 6, abs=1e-5)
    ref_row, _, _ = measure_policy(stack, None, _Tok(), prompts, 5, judge, stack)
    assert abs(ref_row["eval_kl_per_sequence"]) < 1e-4  # the reference against itself
    monitors = as_monitors({"iteration": 0, **row})
    assert monitors["kl_per_token"] == row["eval_kl_per_token"] and monitors["reward"] == row["eval_reward"]


# ----- the stored sweep ------------------------------------------------------------------------------
def test_stale_results_fail_and_name_the_command() -> None:
    from dataclasses import replace

    from rlhf_lite.beyond import sweep
    from rlhf_lite.profiles import TINY
    from rlhf_lite.settings import to_dict
    from rlhf_lite.stage import data_fingerprint
    from rlhf_lite.utils import DATA_DIR

    meta = {"seeds": [0, 1], "sft": {"config": to_dict(TINY.sft)}, "rm": {"config": to_dict(TINY.rm)},
            "data_sha256": data_fingerprint(DATA_DIR)["sha256"]}
    runs = {(m.name, s): {"config": to_dict(sweep.method_config(m.name, s))} for m in sweep.METHODS for s in (0, 1)}
    assert sweep.check_results({"meta": meta, "runs": runs})[0].startswith("12 runs (6 methods x seeds [0, 1])")
    assert runs[("vanilla", 1)]["config"]["seed"] == 1 and runs[("vanilla", 1)]["config"]["gold_every"] == 5
    runs[("dpo", 1)] = {"config": to_dict(replace(sweep.method_config("dpo", 1), beta=0.2))}
    with pytest.raises(sweep.StaleResults, match=r"dpo seed 1: beta: stored 0.2, now 0.1.*python -m rlhf_lite.beyond.sweep"):
        sweep.check_results({"meta": meta, "runs": runs})
    with pytest.raises(sweep.StaleResults, match="SFT stage: sft_steps: stored 1, now 400"):
        sweep.check_results({"meta": {**meta, "sft": {"config": {**meta["sft"]["config"], "sft_steps": 1}}},
                             "runs": {k: v for k, v in runs.items() if k != ("dpo", 1)}})


def test_the_budgets_are_matched() -> None:
    from rlhf_lite.beyond.sweep import budget_rows

    rows = {r[0]: r[1:] for r in budget_rows()}
    assert rows["vanilla PPO"] == [3840, 240, 32, "-"] and rows["GRPO"] == [3840, 240, 32, "-"]
    assert rows["PPO-max"][:2] == [3840, 220]  # 5 critic-only iterations
    assert rows["DPO"] == [0, 240, 80, 9600]  # the RM stage's 150 x 64 pairs


def test_the_rm_hacking_rule_and_gold_at_a_kl() -> None:
    import numpy as np

    from rlhf_lite.beyond.report import Curves, at_kl

    def run(gold, reward):
        k = len(gold)
        return Curves("x", "x", np.array([np.linspace(0, 2, k)]), np.array([gold]), np.array([reward]),
                      np.ones((1, k)), np.ones((1, k)), np.linspace(0, 1, k), np.array([1.0]), np.array([False]))

    # after the peak (0.8; the start does not count), gold falls by 0.4 while the reward rises by 0.5: hacking
    assert run([0.5, 0.8, 0.4], [0.0, 0.5, 1.0]).hacked(0)
    assert not run([0.5, 0.8, 0.4], [0.0, 0.5, 0.7]).hacked(0)  # the reward rose by only 0.2
    assert not run([0.5, 0.8, 0.6], [0.0, 0.5, 1.5]).hacked(0)  # the gold fell by only 0.2
    start_is_best = run([0.9, 0.3, 0.2], [0.0, 0.5, 1.0])  # from the start, gold fell 0.7 while the reward rose 1.0
    assert start_is_best.peak(0) == 1 and not start_is_best.hacked(0)
    c = run([0.0, 1.0, 0.5], [0, 0, 0])  # KL 0, 1, 2
    assert at_kl(c, 0.5) == pytest.approx(0.5) and at_kl(c, 1.5) == pytest.approx(0.75) and at_kl(c, 3) is None


def _curves(name: str, label: str, gold, kl, reward=None, wall: float = 100.0, ref_ppl: float = 2.0):
    """Curves of three identical seeds from one mean path (best-of-n: its progress is n)."""
    import numpy as np

    from rlhf_lite.beyond.report import Curves

    k = len(gold)
    rep = lambda x: np.array([x] * 3, dtype=float)
    progress = np.array([1, 2, 4, 8][:k], dtype=float) if name == "bon" else np.linspace(0, 1, k)
    return Curves(name, label, rep(kl), rep(gold), rep(reward if reward is not None else [0.0] * k),
                  rep([10.0] * k), rep([ref_ppl] * k), progress, np.full(3, wall), np.zeros(3, dtype=bool))


def test_the_verdict_rules_on_made_up_curves() -> None:
    from rlhf_lite.beyond.report import findings, verdicts

    def cs(dpo_gold_end: float, grpo_wall: float, bon_gold):
        return {
            "vanilla": _curves("vanilla", "vanilla PPO", [0.5, 0.6, -1.0], [0, 0.5, 20], [0, 1, 3], wall=200),
            "ppo_max": _curves("ppo_max", "PPO-max", [0.5, 0.7, 0.65], [0, 0.2, 0.3], wall=220, ref_ppl=1.5),
            "grpo": _curves("grpo", "GRPO", [0.5, 0.6, 0.0], [0, 0.4, 10], [0, 1, 3], wall=grpo_wall),
            "grpo_no_kl": _curves("grpo_no_kl", "GRPO without KL", [0.5, 0.6, -0.5], [0, 0.4, 20], wall=grpo_wall),
            "dpo": _curves("dpo", "DPO", [0.5, 0.55, dpo_gold_end], [0, 0.1, 15], [0, 0.5, 1], ref_ppl=100),
            "bon": _curves("bon", "best-of-n", bon_gold, [0.0, 0.19, 0.66, 1.2], [0, 1, 2, 3]),
        }

    got = {row[0]: row[-1] for row in verdicts(cs(-0.5, 100, [0.5, 0.66, 0.6, 0.5]))}
    assert got["Well-tuned PPO beats DPO"] == "reproduced"  # 0.65 - (-0.5) on every seed
    assert got["DPO drifts to responses off the reference's distribution"] == "reproduced"  # KL 15 > 0.3, ppl 100 > 1.5
    assert got["Without a critic, RL costs less"] == "reproduced"
    assert got["Gold rises, then falls as best-of-n optimizes harder"] == "reproduced"
    assert got["... and keeps RL's gains"] == "partly"  # GRPO's +0.1 matches vanilla's, not PPO-max's +0.2
    # DPO's peak 0.55 is below PPO-max's 0.7 and not above vanilla's 0.6 + 0.05
    assert got["DPO's gold-vs-KL frontier dominates PPO's (their Fig. 2, with a ground-truth reward)"] == "differs"
    got = {row[0]: row[-1] for row in verdicts(cs(0.9, 300, [0.5, 0.6, 0.7, 0.8]))}
    assert got["Well-tuned PPO beats DPO"] == "differs" and got["Without a critic, RL costs less"] == "differs"
    assert got["Gold rises, then falls as best-of-n optimizes harder"] == "partly"  # it only rises
    answers = {row[0]: row[-1] for row in findings(cs(-0.5, 100, [0.5, 0.66, 0.6, 0.5]))}
    assert answers["Which method reaches the best gold score, and at which KL?"] == "PPO-max"
    assert answers["Which methods hack the RM (after the gold peak, gold falls while the RM reward rises)?"] == (
        "vanilla PPO, GRPO, DPO")


def test_the_sweep_reuses_only_finished_runs_of_the_current_config(tmp_path, monkeypatch) -> None:
    from dataclasses import replace

    from rlhf_lite.beyond import sweep
    from rlhf_lite.settings import to_dict
    from rlhf_lite.utils import write_json

    monkeypatch.setattr("rlhf_lite.notebook.RUNS", tmp_path)
    assert not sweep.finished("vanilla", 1)  # no folder
    folder = tmp_path / "beyond_ppo" / "vanilla_seed1"
    folder.mkdir(parents=True)
    write_json(folder / "summary.json", {"config": to_dict(sweep.method_config("vanilla", 1)), "interrupted": False})
    assert sweep.finished("vanilla", 1) and not sweep.finished("vanilla", 2)
    write_json(folder / "summary.json", {"config": to_dict(sweep.method_config("vanilla", 1)), "interrupted": True})
    assert not sweep.finished("vanilla", 1)  # stopped by a signal: run it again
    write_json(folder / "summary.json", {"config": to_dict(replace(sweep.method_config("vanilla", 1), gold_early_until=20))})
    assert not sweep.finished("vanilla", 1)
