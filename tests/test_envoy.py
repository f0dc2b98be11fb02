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


class _WithLooseModules(torch.nn.Module):
    """A module that keeps one submodule out of ``_modules`` and names others through properties."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(4, 4)
        object.__setattr__(self, "loose", torch.nn.Linear(4, 4))  # called in forward, never registered

    @property
    def base_model(self):
        return self

    @property
    def first(self):
        return self.body

    def forward(self, x):
        return self.loose(self.body(x))


def test_modules_reached_through_plain_attributes_are_envoys():
    torch.manual_seed(0)
    net = _WithLooseModules()
    model = NNsight(net)
    # A property naming the module itself or one of the tree's modules gives the tree's own envoy.
    assert model.base_model is model
    assert model.first is model.body and model.first.path == "model.body"
    # An unregistered module gets an envoy of its own, whose values can be read like a child's.
    loose = model.loose
    assert loose._module is net.loose and loose.path == "model.loose" and model.loose is loose
    assert "model.loose" not in [path for path, _ in model.named_modules()]
    seen = {}
    handle = net.loose.register_forward_hook(lambda m, args, out: seen.update(input=args[0].clone()))
    x = torch.rand(2, 4)
    try:
        with model.trace(x):
            loose_in = model.loose.input.save()
            model.loose.output[:] = 0
            out = model.output.save()
    finally:
        handle.remove()
    assert torch.equal(loose_in, seen["input"]) and torch.equal(loose_in, net.body(x))
    assert torch.equal(out, torch.zeros(2, 4))
    assert not torch.equal(model(x), out)  # nothing stays on the module after the trace


def test_base_model_of_a_transformers_model_is_its_transformer_envoy(gpt2):
    model = NNsight(gpt2)
    assert gpt2.base_model is gpt2.transformer
    assert model.base_model is model.transformer
    assert model.config is gpt2.config  # other attributes still pass through as they are


def test_trace_false_runs_the_model_and_applies_persistent_edits(seq):
    model = NNsight(seq)
    x = torch.rand(3, 5)
    assert torch.equal(model.trace(x, trace=False), seq(x))
    with model.edit(inplace=True):
        model[0].output[:] = 0
    edited = model.trace(x, trace=False)
    assert torch.equal(edited, seq[2](seq[1](torch.zeros(3, seq[0].out_features))))
    assert torch.equal(model(x), seq(x))  # a plain call leaves the edits out, as in nnsight 0.8.1
