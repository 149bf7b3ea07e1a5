"""The hand-off snippets of docs/handoff.md, run as written (read from the file) on a small exported policy,
offline: transformers generation, TRL's DPO and GRPO trainers starting from the export, and the folder vLLM
reads. TRL comes from requirements-bench.txt, which CI installs."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from rlhf_lite import cli, world
from rlhf_lite.models import AdapterStack, build_tiny_model
from rlhf_lite.utils import DATA_DIR, REPO_ROOT, write_json
from tests.conftest import EOS, PAD, SMALL, SMALL_LORA, randomize_adapters
from tests.test_robustness import TOK

EXPORT = "runs/ppo_max_hf"  # the folder the snippets load, relative to the working directory


def snippets() -> dict[str, str]:
    """The ``# tested`` python blocks of docs/handoff.md by the title of their section."""
    text = (REPO_ROOT / "docs/handoff.md").read_text()
    out = {}
    for section in re.split(r"^## ", text, flags=re.MULTILINE)[1:]:
        title = section.splitlines()[0]
        for block in re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL):
            if block.startswith("# tested\n"):
                out[title] = block
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> tuple[Path, AdapterStack]:
    """A working directory with ``data/`` and the export of a run whose policy is a random LoRA adapter on a
    saved tiny base (what ``python -m rlhf_lite export`` reads: RUN/policy and the base in its summary)."""
    work = tmp_path_factory.mktemp("handoff")
    base = work / "sft_model"
    build_tiny_model(len(TOK), PAD, EOS, SMALL, 0).save_pretrained(base)
    TOK.save_pretrained(base)
    from transformers import AutoModelForCausalLM

    stack = AdapterStack(AutoModelForCausalLM.from_pretrained(base), ["policy"], SMALL_LORA)
    randomize_adapters(stack, 3)
    stack.save_adapter("policy", work / "run/policy")
    write_json(work / "run/summary.json", {"provenance": {"policy_base": str(base)}})
    cli.main(["export", "--run", str(work / "run"), "--out", str(work / EXPORT)])
    (work / "data").symlink_to(DATA_DIR)
    return work, stack.eval()


@pytest.fixture
def run_snippet(workdir, monkeypatch):
    """Run a snippet in the working directory, with datasets' cache there too; returns its namespace."""
    import datasets

    work, _ = workdir
    monkeypatch.chdir(work)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", work / "datasets_cache")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def run(title: str) -> dict:
        namespace: dict = {"__name__": "__handoff__"}
        exec(compile(snippets()[title], f"docs/handoff.md: {title}", "exec"), namespace)  # noqa: S102
        return namespace

    return run


def test_the_doc_has_the_tested_snippets() -> None:
    assert set(snippets()) == {"transformers (tested)", "TRL: DPO from the PPO policy (tested)",
                               "TRL: GRPO against the gold judge (tested)"}


def test_transformers_snippet_generates_the_policys_greedy_reply(run_snippet, workdir, capsys) -> None:
    ns = run_snippet("transformers (tested)")
    printed = capsys.readouterr().out.strip()
    _, stack = workdir
    # the reference: greedy decoding with the trainer's own policy (a plain loop over its logits)
    ids = ns["inputs"]["input_ids"]
    with torch.no_grad():
        for _ in range(24):
            nxt = stack.logits("policy", ids, torch.ones_like(ids))[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], 1)
            if nxt.item() == TOK.eos_token_id:
                break
    reply = TOK.decode(ids[0, ns["inputs"]["input_ids"].shape[1]:], skip_special_tokens=True)
    assert printed == reply.strip() and len(reply.split()) > 3


def test_dpo_snippet_trains_from_the_exported_policy(run_snippet, workdir) -> None:
    from transformers import AutoModelForCausalLM

    ns = run_snippet("TRL: DPO from the PPO policy (tested)")
    work, _ = workdir
    raw = json.loads((DATA_DIR / "prefs_train.jsonl").open().readline())
    first = ns["pairs"][0]
    assert first["prompt"] + first["chosen"] == raw["chosen"] and first["prompt"] + first["rejected"] == raw["rejected"]
    trainer = ns["trainer"]
    assert trainer.state.global_step == 2
    # the first step's loss is -log sigmoid(0): the policy starts as its reference, both the export
    assert trainer.state.log_history[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    exported = AutoModelForCausalLM.from_pretrained(work / EXPORT).state_dict()
    ref = trainer.ref_model.state_dict()
    assert all(torch.equal(ref[k].cpu(), v) for k, v in exported.items())
    trained = trainer.model.state_dict()
    assert any(not torch.equal(trained[k].cpu(), v) for k, v in exported.items())  # two steps moved it


def test_grpo_snippet_optimizes_the_gold_judge(run_snippet, monkeypatch) -> None:
    calls = []
    real = world.gold_score

    def recording(prompt, response, finished):
        calls.append(real(prompt, response, finished))
        return calls[-1]

    monkeypatch.setattr(world, "gold_score", recording)
    trainer = run_snippet("TRL: GRPO against the gold judge (tested)")["trainer"]
    assert trainer.state.global_step == 1
    assert len(calls) >= 4 and len(calls) % 4 == 0  # one score per completion, groups of num_generations
    logged = trainer.state.log_history[0]["rewards/gold/mean"]
    assert logged == pytest.approx(sum(calls) / len(calls), abs=1e-6)  # TRL optimized exactly these rewards


def test_the_export_is_what_vllm_reads(workdir) -> None:
    """vLLM itself needs a CUDA GPU (not tested); this checks the folder it loads: a supported architecture,
    safetensors weights without adapter tensors, a fast tokenizer, a generation config, no peft files."""
    from safetensors import safe_open

    work, _ = workdir
    folder = work / EXPORT
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert {"model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= {
        p.name for p in folder.iterdir()}
    assert not (folder / "adapter_config.json").exists()
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert not any("lora" in k for k in f.keys())  # noqa: SIM118 (safe_open is not iterable)
