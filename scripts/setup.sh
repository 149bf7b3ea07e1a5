#!/usr/bin/env bash
# Create .venv and install rlhf_lite with its test tools. Idempotent: a second run installs nothing new.
# Where there is no NVIDIA GPU, torch is pinned to the CPU build 2.13.0 first, so that the range in
# requirements.txt is already satisfied and pip does not fetch a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip >/dev/null 2>&1 || true
if ! command -v nvidia-smi >/dev/null 2>&1; then
  # the CPU wheel; machines of this project keep it in /opt/wheels
  FIND=""; [ -d /opt/wheels ] && FIND="--find-links /opt/wheels"
  $PIP install -q $FIND "torch==2.13.0"
fi
$PIP install -q -r requirements-dev.txt
$PIP install -q --no-deps -e .
.venv/bin/python -c "import torch, transformers, peft; print(f'torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}')"
