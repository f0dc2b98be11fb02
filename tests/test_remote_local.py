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
