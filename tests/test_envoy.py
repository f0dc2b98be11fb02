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
    # As nnsight 0.8.1 lists them: full paths, each module after its children, the model last.
    names = [name for name, _ in model.named_modules()]
    assert sorted(names) == sorted("model." + name if name else "model" for name, _ in gpt2.named_modules())
    assert names[-1] == "model" and names.index("model.transformer.h.0.mlp.c_fc") < names.index("model.transformer.h.0.mlp")
    assert len(model.modules()) == len(list(gpt2.modules()))
    assert [e._module for e in model.transformer.h[1].modules()] == [m for m in _post_order(gpt2.transformer.h[1])]
    assert repr(model) == repr(gpt2)
    assert model.transformer.h[1].path == "model.transformer.h.1"


def _post_order(module):
    for child in module.children():
        yield from _post_order(child)
    yield module


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


def test_replacing_a_child_module_through_its_envoy(seq):
    """``model.layer = new_module`` (0.8.1 allows it) swaps the torch module; traces then see the new one."""
    model = NNsight(seq)
    old = model[2]
    replacement = torch.nn.Linear(10, 2)
    setattr(model, "2", replacement)
    x = torch.rand(2, 5)
    with model.trace(x):
        out = model[2].output.save()
    assert seq[2] is replacement and model[2]._module is replacement and old._module is not replacement
    assert torch.equal(out, replacement(seq[1](seq[0](x))))


def test_parent_root_and_filtered_modules(gpt2):
    """The 0.8.1 tree accessors, checked against the torch module tree."""
    model = NNsight(gpt2)
    mlp = model.transformer.h[1].mlp
    assert mlp.parent._module is gpt2.transformer.h[1] and mlp.root is model and model.parent is None
    linear = model.modules(include_fn=lambda e: isinstance(e._module, torch.nn.Linear), names=True)
    expected = [name for name, m in gpt2.named_modules() if isinstance(m, torch.nn.Linear)]
    assert [path for path, _ in linear] == ["model." + name for name in expected]


def test_an_envoy_is_as_true_as_its_module():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ModuleList())
    model = NNsight(net)
    assert bool(model[0]) is bool(net[0]) is True  # a leaf: no children, still true
    assert bool(model[1]) is bool(net[1]) is False  # an empty ModuleList, as torch says
    assert (model[0] or None) is model[0]


def test_device_and_devices_fall_back_to_the_parameters():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
    model = NNsight(net)
    assert model.device == net[0].weight.device
    assert model.devices == {p.device for p in net.parameters()}
    assert model[1].device is None and model[1].devices == set()

    class OwnDevice(torch.nn.Module):
        device = "its own"

    assert NNsight(OwnDevice()).device == "its own"  # the module's own attribute wins
