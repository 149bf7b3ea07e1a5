"""Write the Colab parts of every notebook from the repository's own files, and check them.

The repository's home is ``[project.urls] Repository`` in pyproject.toml, the one place it is set. From it and
from requirements.txt this script writes, in every ``notebooks/*.ipynb``:

* the **badge**: the first line of the first (markdown) cell, an "Open In Colab" link to the notebook on the
  ``main`` branch of that home;
* the **set-up cell**: the first code cell. On Colab it installs what Colab lacks, at requirements.txt's pins
  except torch (Colab keeps its own CUDA build; any package already at a pinned version is left alone), plus
  the notebook's extras (pyproject's optional dependencies named in the notebook's metadata
  ``rlhf_lite.extras``), then this repository; anywhere else it installs nothing. Then it picks the profile:
  ``colab_t4`` on a GPU for a notebook that asks Colab for one (metadata ``accelerator: GPU``), else ``tiny``,
  and prints one line.

It also points the README's Colab badges at the same home. Nothing else is touched; a cell whose text does not
change keeps its outputs, a rewritten one loses them (re-execute the notebook before committing it).

    python scripts/sync_notebooks.py           # write
    python scripts/sync_notebooks.py --check   # list what is out of date, exit 1 if anything is
"""

from __future__ import annotations

import json
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BRANCH = "main"
MARKER = "# Colab set-up, written by scripts/sync_notebooks.py"
BADGE_IMG = "https://colab.research.google.com/assets/colab-badge.svg"
BADGE_RE = re.compile(r"\[!\[Open In Colab\]\([^)]*\)\]\((https://colab\.research\.google\.com/github/[^)]*?"
                      r"/(notebooks/[^)/]+\.ipynb))\)")
GPU_PROFILE = "colab_t4"


def repo_url(root: Path = ROOT) -> str:
    """The repository's home, ``https://github.com/OWNER/NAME`` (pyproject.toml [project.urls] Repository)."""
    url = tomllib.loads((root / "pyproject.toml").read_text())["project"]["urls"]["Repository"].rstrip("/")
    if not re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", url):
        raise ValueError(f"pyproject.toml [project.urls] Repository = {url!r}: Colab opens notebooks from GitHub only "
                         "(https://github.com/OWNER/NAME)")
    return url


def pins(root: Path = ROOT) -> list[str]:
    """requirements.txt's requirements, comments dropped, without torch."""
    out = []
    for line in (root / "requirements.txt").read_text().splitlines():
        req = line.split("#", 1)[0].strip()
        if req and not re.match(r"torch\b", req):
            out.append(req)
    return out


def extras(names: list[str], root: Path = ROOT) -> list[str]:
    """The requirements of pyproject's optional-dependency groups ``names``."""
    groups = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    missing = [n for n in names if n not in groups]
    if missing:
        raise ValueError(f"notebook metadata rlhf_lite.extras names {missing[0]!r}, which pyproject.toml's "
                         f"[project.optional-dependencies] lacks")
    return [req for n in names for req in groups[n]]


def badge(url: str, notebook: str) -> str:
    return f"[![Open In Colab]({BADGE_IMG})]({colab_link(url, notebook)})"


def colab_link(url: str, notebook: str) -> str:
    return f"https://colab.research.google.com/github/{url.removeprefix('https://github.com/')}/blob/{BRANCH}/" \
           f"notebooks/{notebook}"


def setup_cell(url: str, requirements: list[str], gpu_profile: str) -> str:
    """The source of the set-up cell."""
    listed = "".join(f"    {json.dumps(r)},\n" for r in requirements)
    pick = (f"{gpu_profile} on a GPU, else tiny" if gpu_profile != "tiny"
            else "tiny (this notebook asks Colab for no GPU)")
    return f'''{MARKER} (edit that script, not this cell).
# On Colab: install what Colab lacks at requirements.txt's pins (torch stays Colab's CUDA build), then this
# repository. Anywhere else nothing is installed. Then pick the profile: {pick}.
import importlib.metadata
import importlib.util
import os
import subprocess
import sys

REPO = "{url}"
PINS = [
{listed}]
GPU_PROFILE = "{gpu_profile}"
COLAB = "google.colab" in sys.modules


def lacking(pins: list[str]) -> list[str]:
    """The pins whose package is missing or at another version."""
    from packaging.requirements import Requirement

    out = []
    for pin in pins:
        req = Requirement(pin)
        try:
            if req.specifier.contains(importlib.metadata.version(req.name), prereleases=True):
                continue
        except importlib.metadata.PackageNotFoundError:
            pass
        out.append(pin)
    return out


todo = lacking(PINS) if COLAB else []
if todo:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", *todo], check=True)
if COLAB and importlib.util.find_spec("rlhf_lite") is None:  # not yet cloned in this session
    if not os.path.isdir("rlhf_lite/.git"):
        subprocess.run(["git", "clone", "--depth", "1", REPO + ".git"], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "-e", "rlhf_lite"], check=True)
    os.chdir("rlhf_lite")
    sys.path.insert(0, os.getcwd())

import torch

GPU = torch.cuda.is_available()
PROFILE = GPU_PROFILE if GPU else "tiny"
where = f"Colab: {{len(todo)}} packages installed" if COLAB else "not on Colab: nothing installed"
print(f"{{where}}; GPU: {{torch.cuda.get_device_name(0) if GPU else 'none'}}; profile: {{PROFILE}}")'''


def _lines(text: str) -> list[str]:
    """A notebook cell's ``source``: lines with their newlines, the last without."""
    lines = text.split("\n")
    return [line + "\n" for line in lines[:-1]] + ([lines[-1]] if lines[-1] else [])


def _code_cell(source: str) -> dict:
    return {"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [], "source": _lines(source)}


def _is_setup_cell(cell: dict) -> bool:
    src = "".join(cell["source"])
    return cell["cell_type"] == "code" and (MARKER in src or "google.colab" in src)


def sync_notebook(nb: dict, name: str, url: str, requirements: list[str]) -> dict:
    """``nb`` with its badge and set-up cell up to date (a new dict; nothing else changes)."""
    nb = json.loads(json.dumps(nb))
    cells = nb["cells"]
    first = cells[0]
    if first["cell_type"] != "markdown":
        raise ValueError(f"{name}: the first cell must be markdown (the badge and the title)")
    text = "".join(first["source"])
    line = badge(url, name)
    text = BADGE_RE.sub(line, text, count=1) if BADGE_RE.search(text.split("\n", 1)[0]) else f"{line}\n\n{text}"
    first["source"] = _lines(text)
    meta = nb.setdefault("metadata", {})
    code = next((i for i, c in enumerate(cells) if c["cell_type"] == "code"), len(cells))
    if code < len(cells) and _is_setup_cell(cells[code]) and "rlhf_lite" not in meta:
        # an older set-up cell: keep the extras it installed (pip install -e ".[hh]")
        found = re.search(r'-e", "\.\[([\w,]+)\]"', "".join(cells[code]["source"]))
        if found:
            meta["rlhf_lite"] = {"extras": found.group(1).split(",")}
    wanted = requirements + extras(meta.get("rlhf_lite", {}).get("extras", []))
    gpu_profile = GPU_PROFILE if meta.get("accelerator") == "GPU" else "tiny"
    source = setup_cell(url, wanted, gpu_profile)
    if code < len(cells) and _is_setup_cell(cells[code]):
        if "".join(cells[code]["source"]) != source:
            cells[code].update(source=_lines(source), outputs=[], execution_count=None)
    else:
        cells.insert(code, _code_cell(source))
    return nb


def sync_readme(text: str, url: str) -> str:
    """The README with every Colab badge's link on ``url``."""
    return BADGE_RE.sub(lambda m: badge(url, m.group(2).removeprefix("notebooks/")), text)


def _dump(nb: dict) -> str:
    return json.dumps(nb, indent=1, ensure_ascii=False) + "\n"


def sync(root: Path = ROOT, write: bool = True) -> list[str]:
    """Bring every notebook and the README up to date; return the files that were (or, with ``write=False``,
    would be) changed, relative to ``root``."""
    url, requirements = repo_url(root), pins(root)
    changed = []
    for path in sorted((root / "notebooks").glob("*.ipynb")):
        old = path.read_text()
        new = _dump(sync_notebook(json.loads(old), path.name, url, requirements))
        if new != old:
            changed.append(str(path.relative_to(root)))
            if write:
                path.write_text(new)
    readme = root / "README.md"
    old = readme.read_text()
    new = sync_readme(old, url)
    if new != old:
        changed.append("README.md")
        if write:
            readme.write_text(new)
    return changed


def main(argv: list[str]) -> int:
    check = "--check" in argv
    changed = sync(write=not check)
    for name in changed:
        print(f"{'out of date' if check else 'updated'}: {name}")
    if check and changed:
        print("run: python scripts/sync_notebooks.py (then re-execute the notebooks it rewrote)")
    return 1 if check and changed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
