"""The envoy tree mirrors the module tree."""

import pytest
import torch

from nnsight import NNsight


def test_navigation(gpt2):
    model = NNsight(gpt2)
    h = model.transformer.h
    assert len(h) == 2 and h[-1]._module is gpt2.transformer.h[1]
    assert [e._module for e in h] == list(gpt2.transformer.h)
    assert [e._module for e in h[0:2]] == list(gpt2.transformer.h)
    assert model.get("transformer.h.0.mlp")._module is gpt2.transformer.h[0].mlp
    assert model.get("model.transformer.h.1")._module is gpt2.transformer.h[1]
    assert model.transformer.h[0].attn.embed_dim == 32  # attributes pass through
    names = [name for name, _ in model.named_modules()]
    assert names == [name for name, _ in gpt2.named_modules()]
    assert len(model.modules()) == len(list(gpt2.modules()))
    assert repr(model) == repr(gpt2)
    assert model.transformer.h[1].path == "model.transformer.h.1"


def test_to_and_plain_call(seq):
    model = NNsight(seq)
    assert model.to("cpu") is model
    x = torch.rand(1, 5)
    assert torch.equal(model(x), seq(x))
    assert torch.equal(model[0](x), seq[0](x))


def test_stop_keeps_values_and_skips_the_rest(seq):
    model = NNsight(seq)
    calls = []
    handle = seq[2].register_forward_hook(lambda m, i, o: calls.append(1))
    x = torch.rand(1, 5)
    with model.trace(x) as tracer:
        first = model[0].output.save()
        tracer.stop()
        after = model[2].output.save()
    handle.remove()
    assert torch.equal(first, seq[0](x)) and calls == []
    with pytest.raises(UnboundLocalError):
        after  # noqa: B018


def test_envoy_of_a_plain_module_is_a_root_that_traces(seq):
    """0.8.1 scripts build roots with ``Envoy(module, rename=...)``; the oracle is a plain forward hook."""
    from nnsight import Envoy

    seen = []
    handle = seq[0].register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    x = torch.rand(2, 5)
    try:
        model = Envoy(seq, rename={"0": "first"})
        with model.trace(x):
            hidden = model.first.output.save()
            out = model.output.save()
    finally:
        handle.remove()
    assert isinstance(model, NNsight) and model.first._module is seq[0]
    assert torch.equal(hidden, seen[0]) and torch.equal(out, seq(x))
