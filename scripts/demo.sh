#!/usr/bin/env bash
# Install everything, then run the end-to-end demo on the offline SmolLM2 model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=1
.venv/bin/python examples/demo.py "$@"
