#!/usr/bin/env bash
# The whole test suite: set-up, then the unit tests and every notebook under nbval (lax mode).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check rlhf_lite tests bench
.venv/bin/python -m pytest -q tests notebooks --nbval-lax --nbval-current-env --nbval-cell-timeout=3000 "$@"
