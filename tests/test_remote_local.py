"""``remote="local"``: the whole remote path in-process; what the sandbox refuses and accepts, without a server."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("RestrictedPython")
pytest.importorskip("transformers")

from nnsight.remote import SandboxError  # noqa: E402


@pytest.fixture
def model(gpt2_module, gpt2_tokenizer):
    from nnsight import LanguageModel

    return LanguageModel(gpt2_module, tokenizer=gpt2_tokenizer)


def test_user_error_fifty_times_in_one_process_comes_back_as_the_users_error(model):
    for _ in range(50):
        with pytest.raises(RuntimeError, match="cannot be multiplied"):
            with model.trace("Hello", remote="local"):
                bad = torch.ones(2, 3) @ torch.ones(2, 3)
                out = model.lm_head.output.save()
    with model.trace("Hello", remote="local"):
        out = model.lm_head.output.save()
    with model.trace("Hello"):
        oracle = model.lm_head.output.save()
    assert torch.allclose(out, oracle)


def test_refusals_are_the_sandboxs(model):
    with pytest.raises(SandboxError, match="__class__"):
        with model.trace("Hello", remote="local"):
            k = model.lm_head.output.__class__
    with pytest.raises(SandboxError, match="_getattr_"):
        with model.trace("Hello", remote="local"):
            _getattr_ = 1
    with pytest.raises(SandboxError, match="_module"):
        with model.trace("Hello", remote="local"):
            m = model.transformer._module
    with pytest.raises(SandboxError, match="import of 'os'"):
        with model.trace("Hello", remote="local"):
            import os
    with pytest.raises(SandboxError, match="setting attributes"):
        with model.trace("Hello", remote="local"):
            model.transformer.h[0].forward = None


def test_a_class_may_not_subclass_what_the_sandbox_does_not_allow(model):
    with pytest.raises(SandboxError, match="cannot be a base class"):
        with model.trace("Hello", remote="local"):
            class Sneaky(torch.Tensor):
                pass


def test_weights_stay_read_only_through_augmented_assignment(model):
    before = model.transformer.h[0].mlp.c_fc.weight.detach().clone()
    with pytest.raises(SandboxError, match="read-only"):
        with model.trace("Hello", remote="local"):
            w = model.transformer.h[0].mlp.c_fc.weight
            w[0] += 1
    assert torch.equal(model.transformer.h[0].mlp.c_fc.weight.detach(), before)


def test_remote_takes_true_or_local(model):
    with pytest.raises(ValueError, match='"local"'):
        model.trace("Hello", remote="elsewhere")


def test_remote_inside_remote_code_is_refused_by_the_threads_own_state(model):
    import threading

    from nnsight.remote import client

    assert not hasattr(client, "_IN_WORKER")  # no module flag set from outside
    with client.executing_remote_code():
        with pytest.raises(SandboxError, match="inside remote code"):
            model.trace("Hello", remote="local")
        seen = []
        other = threading.Thread(target=lambda: seen.append(model.trace("Hello", remote="local")))
        other.start()
        other.join()
        assert seen  # another thread is not running remote code


def test_a_job_that_changes_the_model_is_refused_as_the_server_refuses_it(model, monkeypatch):
    """The server's integrity check runs after every local job; a hole in the guards (simulated here) is caught."""
    from nnsight.sandbox.guards import Guards
    from nnsight.server.integrity import refusal

    weight = model.transformer.h[0].mlp.c_fc.weight
    before = weight.detach().clone()
    monkeypatch.setattr(Guards, "is_shared", lambda self, tensor: False)  # the guards no longer see the weights
    try:
        with pytest.raises(SandboxError) as caught:
            with model.trace("Hello", remote="local"):
                w = model.transformer.h[0].mlp.c_fc.weight.detach()  # shares the weight's memory
                w[0] += 1  # in place, on the model's own weight
                out = model.lm_head.output.save()
        assert not torch.equal(weight.detach(), before)  # the write did happen: only the integrity check saw it
        expected = refusal("the model's parameters, buffers, hooks or module attributes changed", reloaded=False)
        assert str(caught.value) == expected["message"]
        assert "it was refused" in str(caught.value) and "build it again" in str(caught.value)
    finally:
        with torch.no_grad():
            weight.copy_(before)
    monkeypatch.undo()
    with model.trace("Hello", remote="local"):  # an untouched model passes the same check
        out = model.lm_head.output.save()
    with model.trace("Hello"):
        oracle = model.lm_head.output.save()
    assert torch.allclose(out, oracle)


def test_the_served_and_local_refusals_differ_only_in_what_happens_to_the_model():
    from nnsight.server.integrity import refusal

    served, local = refusal("x changed"), refusal("x changed", reloaded=False)
    assert served["type"] == local["type"] == "SandboxError"
    assert served["message"] == "the job changed the served model (x changed); it was refused and the model reloaded"
    assert local["message"].split(" and ")[0] == served["message"].split(" and ")[0]


def test_a_read_after_the_result_comes_back_as_after_run_error(model):
    from nnsight import MissedValueError, OutOfOrderError

    with pytest.raises(OutOfOrderError, match="requested after the model had finished") as info:
        with model.trace("Hello", remote="local") as tracer:
            result = tracer.result
            late = model.transformer.h[0].output
    assert type(info.value).__name__ == "AfterRunError" and isinstance(info.value, MissedValueError)
