"""The notebooks' Colab parts agree with the repository: every badge (notebook and README) opens the notebook at
pyproject.toml's one repository home, and every set-up cell installs requirements.txt's pins except torch.
After a notebook changes, ``python scripts/sync_notebooks.py`` brings it back in line."""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tomllib
import types
from pathlib import Path

import pytest

from rlhf_lite.utils import REPO_ROOT

NOTEBOOKS = sorted((REPO_ROOT / "notebooks").glob("*.ipynb"))


def load_script():
    spec = importlib.util.spec_from_file_location("sync_notebooks", REPO_ROOT / "scripts/sync_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sync = load_script()


def requirements_without_torch() -> list[str]:
    """requirements.txt read here with a plain loop (not the script's parser)."""
    out = []
    for line in (REPO_ROOT / "requirements.txt").read_text().splitlines():
        line = line.partition("#")[0].strip()
        if line and not line.startswith("torch"):
            out.append(line)
    return out


def setup_cell(path: Path) -> str:
    return "".join(next(c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code")["source"])


def assigned(source: str, name: str):
    """The literal a module-level ``name = ...`` of ``source`` assigns."""
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"no {name} = ... in the set-up cell")


def test_notebooks_and_readme_are_in_sync() -> None:
    """Fails when a notebook or the README was edited (or merged) without re-running the script."""
    assert NOTEBOOKS
    assert sync.sync(REPO_ROOT, write=False) == [], "run: python scripts/sync_notebooks.py"


def test_badges_open_each_notebook_at_the_one_repository_home() -> None:
    home = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["urls"]["Repository"]
    assert home == "https://github.com/rlhf-lite/rlhf_lite"
    readme = (REPO_ROOT / "README.md").read_text()
    for path in NOTEBOOKS:
        link = f"https://colab.research.google.com/github/rlhf-lite/rlhf_lite/blob/main/notebooks/{path.name}"
        first = "".join(json.loads(path.read_text())["cells"][0]["source"]).splitlines()[0]
        assert first == f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({link})"
        assert f"]({link})" in readme, f"the README has no Colab badge for {path.name}"
        assert assigned(setup_cell(path), "REPO") == home


def test_set_up_cells_install_requirements_pins_except_torch() -> None:
    pins = requirements_without_torch()
    assert "transformers==5.24.0" in pins and not any(p.startswith("torch") for p in pins)
    for path in NOTEBOOKS:
        meta = json.loads(path.read_text())["metadata"]
        extras = meta.get("rlhf_lite", {}).get("extras", [])
        groups = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
        assert assigned(setup_cell(path), "PINS") == pins + [r for e in extras for r in groups[e]], path.name
        wanted = "colab_t4" if meta.get("accelerator") == "GPU" else "tiny"
        assert assigned(setup_cell(path), "GPU_PROFILE") == wanted, path.name


def run_cell(source: str) -> dict:
    namespace: dict = {"__name__": "__notebook__"}
    exec(compile(source, "set-up cell", "exec"), namespace)  # noqa: S102
    return namespace


def test_off_colab_the_set_up_cell_installs_nothing(monkeypatch, capsys) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError(f"the set-up cell ran {args[0]} off Colab")

    monkeypatch.setattr(subprocess, "run", refuse)
    for path in NOTEBOOKS:
        ns = run_cell(setup_cell(path))
        assert ns["PROFILE"] == "tiny" and ns["todo"] == []
        assert capsys.readouterr().out == "not on Colab: nothing installed; GPU: none; profile: tiny\n"


def test_on_colab_the_set_up_cell_installs_exactly_what_is_lacking(monkeypatch, tmp_path, capsys) -> None:
    """A stand-in Colab: some packages at other versions, two missing, one at the pin; the cell installs the
    others at their pins, clones the repository once and installs it without dependencies. Checked on the first
    notebook and on a copy of it that asks for a GPU and the ``hh`` extra (metadata), whichever notebooks exist."""
    colab_versions = {"transformers": "4.57.1", "peft": "0.21.2", "accelerate": "1.10.1", "tokenizers": "0.22.1",
                      "numpy": "2.0.2", "matplotlib": "3.10.0", "tqdm": "4.67.1", "datasets": "4.0.0"}

    def version(name: str) -> str:
        if name not in colab_versions:  # bitsandbytes and gguf: not on Colab
            raise importlib.metadata.PackageNotFoundError(name)
        return colab_versions[name]

    first = json.loads(NOTEBOOKS[0].read_text())
    gpu_hh = json.loads(json.dumps(first))
    gpu_hh["metadata"].update(accelerator="GPU", rlhf_lite={"extras": ["hh"]})
    gpu_hh = sync.sync_notebook(gpu_hh, NOTEBOOKS[0].name, sync.repo_url(), sync.pins())
    cells = {"first": setup_cell(NOTEBOOKS[0]),
             "gpu_hh": "".join(next(c for c in gpu_hh["cells"] if c["cell_type"] == "code")["source"])}
    assert assigned(cells["gpu_hh"], "PINS")[-1] == "datasets" and assigned(cells["gpu_hh"], "GPU_PROFILE") == "colab_t4"

    real_find_spec, calls, moved = importlib.util.find_spec, [], []
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    monkeypatch.setattr(importlib.metadata, "version", version)
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "rlhf_lite" else real_find_spec(n, *a))
    monkeypatch.setattr(subprocess, "run", lambda cmd, check: calls.append(cmd))
    monkeypatch.setattr(os, "chdir", moved.append)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(tmp_path)
    for name, source in cells.items():
        calls.clear()
        ns = run_cell(source)
        pip = [sys.executable, "-m", "pip", "install", "-q"]
        assert calls == [
            pip + ["transformers==5.24.0", "accelerate==1.15.0", "bitsandbytes==0.50.2", "tokenizers==0.23.3",
                   "gguf==0.19.0", "matplotlib==3.11.2", "tqdm==4.70.1"],  # numpy 2.0.2 fits >=1.26,<3;
            # datasets (the hh extra) is unpinned and there
            ["git", "clone", "--depth", "1", "https://github.com/rlhf-lite/rlhf_lite.git"],
            pip + ["--no-deps", "-e", "rlhf_lite"],
        ], name
        assert moved[-1] == "rlhf_lite" and ns["PROFILE"] == "tiny"  # no GPU here
        assert capsys.readouterr().out == "Colab: 7 packages installed; GPU: none; profile: tiny\n"


def test_the_script_rewrites_only_what_is_out_of_date(tmp_path: Path) -> None:
    for name in ("pyproject.toml", "requirements.txt", "README.md"):
        shutil.copy(REPO_ROOT / name, tmp_path / name)
    shutil.copytree(REPO_ROOT / "notebooks", tmp_path / "notebooks")
    path = tmp_path / "notebooks" / NOTEBOOKS[0].name
    nb = json.loads(path.read_text())
    untouched = json.dumps(nb["cells"][5:])
    # a pin moved in requirements.txt, a badge pointing elsewhere in the README
    req = tmp_path / "requirements.txt"
    req.write_text(req.read_text().replace("peft==0.21.2", "peft==0.22.0"))
    readme = tmp_path / "README.md"
    readme.write_text(readme.read_text().replace("github/rlhf-lite/rlhf_lite/blob/main/notebooks/00",
                                                 "github/someone/else/blob/main/notebooks/00"))
    assert sync.sync(tmp_path, write=False) == [f"notebooks/{p.name}" for p in NOTEBOOKS] + ["README.md"]
    assert sync.sync(tmp_path) != [] and sync.sync(tmp_path) == []  # idempotent
    assert '"peft==0.22.0"' in setup_cell(path)
    assert "github/rlhf-lite/rlhf_lite/blob/main/notebooks/00" in readme.read_text()
    after = json.loads(path.read_text())
    assert json.dumps(after["cells"][5:]) == untouched  # nothing else moved
    code = next(c for c in after["cells"] if c["cell_type"] == "code")
    assert code["outputs"] == [] and code["execution_count"] is None  # to be re-executed
    with pytest.raises(ValueError, match="first cell must be markdown"):
        sync.sync_notebook({"cells": [code]}, "x.ipynb", sync.repo_url(tmp_path), [])
