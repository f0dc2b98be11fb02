#!/usr/bin/env bash
# Install everything, then run the whole test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=1
.venv/bin/python -m pytest tests/ "$@"
