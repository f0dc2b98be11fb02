"""``from nnsight.modeling.vllm import VLLM``: the vLLM backend (see ``nnsight.models.vllm``).

Importing this module does not import vLLM; building a ``VLLM`` does.
"""

from ..models.vllm import VLLM, VLLMInterleaver, VLLMTracer

__all__ = ["VLLM", "VLLMTracer", "VLLMInterleaver"]
