"""Model back ends under the names the public nnsight package uses (``nnsight.modeling.vllm``)."""
