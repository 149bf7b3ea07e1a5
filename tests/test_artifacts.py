"""Artifacts other tools load: a run's policy is a peft adapter on the SFT model, and ``export`` writes it as a
plain Hugging Face model with the trainer's own logits."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from rlhf_lite import cli
from rlhf_lite.export import export_policy
from rlhf_lite.models import AdapterStack, build_tiny_model
from rlhf_lite.ppo.trainer import PPOSetup, PPOTrainer
from tests.conftest import EOS, PAD, SMALL, SMALL_LORA, randomize_adapters
from tests.test_robustness import CFG, TOK, tiny_setup


@pytest.fixture
def trained_run(tmp_path: Path, monkeypatch) -> tuple[PPOTrainer, Path, Path]:
    """A PPO run of two iterations on a base saved as a model folder (as the SFT stage writes it)."""
    monkeypatch.setattr("rlhf_lite.plotting.plot_ppo", lambda *a, **k: None)
    base_dir = tmp_path / "sft_model"
    build_tiny_model(len(TOK), PAD, EOS, SMALL, 0).save_pretrained(base_dir)
    TOK.save_pretrained(base_dir)
    from transformers import AutoModelForCausalLM

    stack = AdapterStack(AutoModelForCausalLM.from_pretrained(base_dir), ["policy", "critic", "reward"], SMALL_LORA)
    randomize_adapters(stack, 3, head_scale=0.3)
    setup = tiny_setup()
    setup = PPOSetup(stack, TOK, setup.train_prompts, setup.test_prompts, setup.sft_examples, judge=setup.judge,
                     provenance={"policy_base": str(base_dir)})
    run = tmp_path / "run"
    trainer = PPOTrainer(replace(CFG, iterations=2), setup, run)
    trainer.train()
    return trainer, run, base_dir


def _batch():
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    return ids, (ids != 0).long()


def test_peft_loads_the_saved_policy_with_the_trainers_logits(trained_run) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trainer, run, base_dir = trained_run
    ids, att = _batch()
    with torch.no_grad():
        ours = trainer.stack.logits("policy", ids, att)
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(run / "policy"))
        pos = (att.cumsum(-1) - 1).clamp(min=0)
        theirs = peft_model(input_ids=ids, attention_mask=att, position_ids=pos).logits
    m = att.bool()
    torch.testing.assert_close(theirs[m], ours[m], atol=1e-5, rtol=1e-5)
    assert (ours - trainer.stack.logits(None, ids, att)).abs().max() > 1e-3  # the adapter matters


def test_export_gives_a_plain_model_with_the_same_logits(trained_run, tmp_path: Path, capsys) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trainer, run, _ = trained_run
    cli.main(["export", "--run", str(run), "--out", str(tmp_path / "exported")])
    assert "exported the policy" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "exported")
    assert not any("lora" in n for n, _ in model.named_parameters())  # merged: no peft needed
    ids, att = _batch()
    with torch.no_grad():
        pos = (att.cumsum(-1) - 1).clamp(min=0)
        exported = model(input_ids=ids, attention_mask=att, position_ids=pos).logits
        ours = trainer.stack.logits("policy", ids, att)
    m = att.bool()
    torch.testing.assert_close(exported[m], ours[m], atol=1e-5, rtol=1e-5)
    tok = AutoTokenizer.from_pretrained(tmp_path / "exported")
    assert tok("\n\nHuman: hi", add_special_tokens=False)["input_ids"] == TOK("\n\nHuman: hi",
                                                                              add_special_tokens=False)["input_ids"]
    with pytest.raises(FileNotFoundError, match="holds no policy adapter"):
        export_policy(tmp_path, tmp_path / "x")
