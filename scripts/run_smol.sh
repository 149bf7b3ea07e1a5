#!/usr/bin/env bash
# The real-model run: SmolLM2-135M-Instruct through the whole pipeline into runs/smol (57 min on two
# idle CPU cores; stages already finished there are kept), its small files copied to results/smol (no
# weights), then notebook 05 executed on them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false RLHF_LITE_PROGRESS=0
.venv/bin/python -m rlhf_lite fetch-model smollm2
.venv/bin/python -m rlhf_lite pipeline --profile smol --out "${1:-runs/smol}" --reuse
.venv/bin/python -c "import sys; from rlhf_lite.notebook import publish_run; publish_run(sys.argv[1], 'results/smol')" \
  "${1:-runs/smol}"
.venv/bin/jupyter nbconvert --to notebook --execute --inplace notebooks/05_real_model.ipynb
