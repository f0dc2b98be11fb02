"""The sandbox in-process (no server): static checks, the restricted compiler through the engine, guards."""

import pytest
import torch

pytest.importorskip("RestrictedPython")
transformers = pytest.importorskip("transformers")

from nnsight import LanguageModel  # noqa: E402
from nnsight.sandbox import SandboxError  # noqa: E402
from nnsight.sandbox.guards import Guards  # noqa: E402
from nnsight.sandbox.policy import check_source  # noqa: E402
from nnsight.sandbox.runner import forget, run_request  # noqa: E402
from nnsight.remote.serialize import decode_values  # noqa: E402


@pytest.fixture(scope="module")
def model(gpt2_module, gpt2_tokenizer):
    return LanguageModel(gpt2_module, tokenizer=gpt2_tokenizer)


def run(model, body, job="t", **extra):
    req = {"source": body, "body_lineno": 2, "kind": "trace", "inputs": ["Hello world"], "filename": "u.py",
           "variables": {"model": {"$t": "envoy", "path": "model"}, "torch": {"$t": "module", "name": "torch"}}, **extra}
    try:
        tree, blob = run_request(model, Guards(model), req, job, lambda s: None)
    finally:
        forget(job)
    return decode_values(tree, blob)


def test_result_matches_a_local_trace(model):
    out = run(model, "    model.transformer.h[0].output[0][:] = 0\n    logits = model.lm_head.output.save()\n")
    with model.trace("Hello world"):
        model.transformer.h[0].output[0][:] = 0
        logits = model.lm_head.output.save()
    assert torch.equal(out["logits"], logits)


@pytest.mark.parametrize("source", ["x.__class__", "import os", "eval('1')", "class A:\n    def __get__(self, o, t):\n        pass", "_write_ = 1", "class A(metaclass=M):\n    pass", "__nnsight_rt__"])
def test_static_check_refuses(source):
    with pytest.raises(SandboxError):
        check_source(source)


def test_engine_names_cannot_be_forged(model):
    with pytest.raises(SandboxError, match="__nnsight_save__"):
        run(model, "    __nnsight_save__(1)\n")


def test_weights_unchanged_after_refused_writes(model):
    before = model.lm_head.weight.detach().clone()
    for body in ("    model.lm_head.weight[0] = 1\n", "    model.lm_head.weight.detach().zero_()\n",
                 "    model.transformer.wte.weight.T[0] = 3\n"):
        with pytest.raises(SandboxError):
            run(model, body)
    assert torch.equal(model.lm_head.weight, before)


def test_linecache_and_engine_caches_are_released(model):
    import linecache

    from nnsight.tracing import capture

    run(model, "    out = model.lm_head.output.save()\n", job="released")
    assert not [k for k in linecache.cache if "released" in str(k)]
    assert not [name for name in capture.blocks.filenames() if "released" in name]


def test_a_tensor_whose_storage_cannot_be_read_counts_as_the_weights():
    import torch

    from nnsight import NNsight
    from nnsight.sandbox.guards import Guards

    guards = Guards(NNsight(torch.nn.Linear(2, 2)))
    sparse = torch.sparse_coo_tensor([[0]], [1.0], (2,))
    with pytest.raises(NotImplementedError):
        sparse.untyped_storage()  # the premise: no storage to compare
    assert guards.is_shared(sparse)
    with pytest.raises(SandboxError, match="read-only"):
        guards.write(sparse)
    assert not guards.is_shared(torch.zeros(2))
    assert not guards.is_shared(torch.nn.Parameter(torch.zeros(2)))  # the user's own parameter


def test_one_list_of_wire_errors_and_importable_modules():
    from nnsight.remote import client
    from nnsight.remote.wire import ERROR_TYPES, IMPORTABLE_MODULES, RemoteError, error_class
    from nnsight.sandbox import policy, runner

    assert policy.ALLOWED_IMPORTS == frozenset(IMPORTABLE_MODULES)
    assert not hasattr(client, "_ERROR_TYPES") and not hasattr(runner, "ALLOWED_ERRORS")
    for name in ERROR_TYPES:
        assert error_class(name).__name__ == name
    assert error_class("OSError") is RemoteError  # not on the list: never raised as itself
    info = runner.describe_error(OSError("disk"), "job", "f.py")
    assert info["type"] == "RemoteError" and "OSError: disk" in info["message"]
