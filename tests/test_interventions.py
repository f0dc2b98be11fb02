"""Writes through a trace equal a hand-patched forward."""

import pytest
import torch

from nnsight import NNsight


def patched(module, name, fn):
    """The oracle: a plain forward hook that rewrites ``name``'s output with ``fn``."""
    handle = dict(module.named_modules())[name].register_forward_hook(lambda m, i, o: fn(o))
    return handle


def test_inplace_zero_equals_hook(seq):
    x = torch.rand(2, 5)
    model = NNsight(seq)
    with model.trace(x):
        model[0].output[:] = 0
        out = model.output.save()
    h = patched(seq, "0", lambda o: torch.zeros_like(o))
    expected = seq(x)
    h.remove()
    assert torch.equal(out, expected)
    assert not torch.equal(seq(x), expected)  # the model itself is untouched afterwards


def test_replacement_then_reread_returns_new_value(seq):
    x = torch.rand(2, 5)
    model = NNsight(seq)
    with model.trace(x):
        hs = model[0].output.clone().save()
        model[0].output = hs * 2
        doubled = model[0].output.save()
        out = model.output.save()
    h = patched(seq, "0", lambda o: o * 2)
    expected = seq(x)
    h.remove()
    assert torch.equal(out, expected)
    assert torch.equal(doubled, hs * 2)


def test_input_and_inputs_assignment(seq):
    x = torch.rand(2, 5)
    model = NNsight(seq)
    with model.trace(x):
        model[2].input = model[2].input * 0
        out_a = model.output.save()
    assert torch.allclose(out_a, seq[2].bias.expand(2, 2))
    with model.trace(x):
        args, kwargs = model[2].inputs
        model[2].inputs = ((args[0] + 1,), kwargs)
        out_b = model.output.save()
    assert torch.allclose(out_b, seq[2](seq[1](seq[0](x)) + 1))


def test_read_inputs_after_output(seq):
    x = torch.rand(2, 5)
    model = NNsight(seq)
    with model.trace(x):
        out = model[0].output.save()
        inp = model[0].input.save()
    assert torch.equal(inp, x) and torch.equal(out, seq[0](x))


def test_tuple_output_edit_and_whole_replacement():
    class Pair(torch.nn.Module):
        def forward(self, x):
            return x + 1, x * 2

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pair = Pair()

        def forward(self, x):
            a, b = self.pair(x)
            return a + b

    net = Net()
    model = NNsight(net)
    x = torch.ones(2, 3)
    with model.trace(x):
        model.pair.output[0][:] = 0
        out1 = model.output.save()
    assert torch.equal(out1, x * 2)
    with model.trace(x):
        a, b = model.pair.output
        model.pair.output = (a * 10, b)
        out2 = model.output.save()
    assert torch.equal(out2, (x + 1) * 10 + x * 2)


def test_gpt2_block_intervention_equals_hook(gpt2, block_hidden):
    ids = torch.tensor([[464, 412, 733, 417, 8765]])
    model = NNsight(gpt2)
    with model.trace(ids):
        block_hidden(model.transformer.h[0].output)[:, -1, :] = 0
        logits = model.output.logits.save()

    def zero_last(o):
        block_hidden(o)[:, -1, :] = 0
        return o

    h = patched(gpt2, "transformer.h.0", zero_last)
    expected = gpt2(ids).logits
    h.remove()
    assert torch.allclose(logits, expected, atol=1e-6)
    assert not torch.allclose(gpt2(ids).logits, expected)


def test_dataclass_output_field_edit(gpt2):
    ids = torch.tensor([[1, 2, 3]])
    model = NNsight(gpt2)
    with model.trace(ids):
        out = model.output
        out.logits[:] = 1.0
        saved = model.output.save()
    assert torch.all(saved.logits == 1.0)


def test_skip_module(seq):
    x = torch.rand(2, 5)
    model = NNsight(seq)
    with model.trace(x):
        model[1].skip(model[0].output)  # skip the ReLU
        out = model.output.save()
    assert torch.allclose(out, seq[2](seq[0](x)))


def test_scalar_assignment_to_output(seq):
    x = torch.rand(2, 5)
    model = NNsight(seq)
    with model.trace(x):
        model[0].output = 0
        out = model.output.save()
    assert torch.allclose(out, seq[2](torch.zeros(2, 10)))


def test_write_from_an_earlier_module_value(seq):
    """``model[2].output = model[0].output[...]`` (value first, as Python does) equals a hand-patched forward."""
    model = NNsight(seq)
    x = torch.rand(3, 5)
    with model.trace(x):
        model[2].output = model[0].output[:, :2]
        out = model.output.save()
    with model.trace(x):
        model[2].output[:] = model[0].output[:, 2:4] * 2
        sliced = model.output.save()
    hidden = seq[0](x)
    assert torch.equal(out, hidden[:, :2])
    assert torch.equal(sliced, hidden[:, 2:4] * 2)
