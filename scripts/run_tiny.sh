#!/usr/bin/env bash
# The main job on the tiny default profile: set-up, then the whole pipeline into runs/tiny.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
.venv/bin/python -m rlhf_lite pipeline --profile tiny --out "${1:-runs/tiny}"
