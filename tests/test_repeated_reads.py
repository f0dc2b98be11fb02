"""Repeated reads of a module: within one invoke and one iteration, every read is the same call.

Later calls are reached with ``tracer.iter[...]`` (generation steps, or the successive
calls of a module within one forward) and with ``envoy.next()``. The oracle is a plain
``register_forward_hook`` recording every call.
"""

import warnings

import pytest
import torch

from nnsight import LanguageModel, NNsight, OutOfOrderError


class TwiceApplied(torch.nn.Module):
    """``self.out(self.lin(self.lin(x)))``: one Linear applied twice in one forward."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.out = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.out(self.lin(self.lin(x)))


class Recurrent(torch.nn.Module):
    """A cell called in a Python loop (the shape of an RNN unrolled by hand)."""

    def __init__(self, steps=3):
        super().__init__()
        self.cell = torch.nn.Linear(4, 4)
        self.steps = steps

    def forward(self, x):
        for _ in range(self.steps):
            x = torch.tanh(self.cell(x))
        return x


def _with_call_zeroed(net, module, call, x):
    """The hand-patched oracle: ``net(x)`` with call number ``call`` of ``module`` returning zeros."""
    calls = []

    def zero(module, inputs, output):
        calls.append(1)
        return output * 0 if len(calls) == call else output

    handle = module.register_forward_hook(zero)
    try:
        return net(x)
    finally:
        handle.remove()


@pytest.fixture
def twice():
    torch.manual_seed(0)
    return TwiceApplied()


def test_shared_module_read_twice_is_the_first_call(twice, recorded):
    x = torch.randn(2, 4)
    seen = recorded(twice.lin, lambda: twice(x))
    model = NNsight(twice)
    with model.trace(x):
        a = model.lin.output.save()
        b = model.lin.output.save()
    assert torch.equal(a, seen[0]) and torch.equal(b, seen[0])


def test_read_after_write_sees_the_edit(twice):
    x = torch.randn(2, 4)
    model = NNsight(twice)
    with model.trace(x):
        before = model.lin.output.clone().save()
        model.lin.output = model.lin.output * 0
        after = model.lin.output.save()
        out = model.output.save()

    expected = _with_call_zeroed(twice, twice.lin, 1, x)
    assert before.abs().sum() > 0 and after.abs().sum() == 0
    assert torch.allclose(out, expected)


def test_iter_over_the_calls_of_a_recurrent_module(recorded):
    torch.manual_seed(0)
    net = Recurrent(3)
    x = torch.randn(2, 4)
    seen = recorded(net.cell, lambda: net(x))
    model = NNsight(net)
    with model.trace(x) as tracer:
        outs = list().save()
        for step in tracer.iter[0:2]:
            outs.append(model.cell.output.clone())
    assert len(outs) == 2 and all(torch.equal(o, s) for o, s in zip(outs, seen[:2]))
    with model.trace(x) as tracer:
        every = list().save()
        for step in tracer.iter[:]:  # open-ended: ends when the module makes no further call
            every.append(model.cell.output.clone())
        after = [True].save()
    assert len(every) == 3 and all(torch.equal(o, s) for o, s in zip(every, seen))
    assert after == [True]


def test_iter_edit_of_one_call_equals_a_hand_patched_forward():
    torch.manual_seed(0)
    net = Recurrent(3)
    x = torch.randn(2, 4)
    model = NNsight(net)
    with model.trace(x) as tracer:
        for step in tracer.iter[1]:
            model.cell.output[:] = 0
        out = model.output.save()

    expected = _with_call_zeroed(net, net.cell, 2, x)
    assert torch.allclose(out, expected)


def test_bounded_iter_past_the_last_call_warns_and_ends():
    torch.manual_seed(0)
    net = Recurrent(2)
    model = NNsight(net)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with model.trace(torch.randn(1, 4)) as tracer:
            outs = list().save()
            for step in tracer.iter[0:4]:
                outs.append(model.cell.output)
    assert len(outs) == 2
    assert any("module call(s) [2, 3] never ran" in str(w.message) for w in caught)


def test_next_reaches_the_following_call(twice, recorded):
    x = torch.randn(2, 4)
    seen = recorded(twice.lin, lambda: twice(x))
    model = NNsight(twice)
    with model.trace(x):
        first = model.lin.output.save()
        second = model.lin.next().output.save()
        second_again = model.lin.output.save()  # .next() moved this iteration's reads on
    assert torch.equal(first, seen[0]) and torch.equal(second, seen[1]) and torch.equal(second_again, seen[1])


def test_read_again_after_a_later_module_is_out_of_order(twice):
    model = NNsight(twice)
    with pytest.raises(OutOfOrderError, match="model.lin.output"):
        with model.trace(torch.randn(1, 4)):
            a = model.lin.output.save()
            b = model.out.output.save()
            c = model.lin.output.save()


def test_read_after_write_in_generate(gpt2, gpt2_tokenizer):
    model = LanguageModel(gpt2, tokenizer=gpt2_tokenizer)
    with model.generate("Hello world", max_new_tokens=2):
        pre = model.transformer.wte.output.clone().save()
        model.transformer.wte.output = model.transformer.wte.output * 0
        post = model.transformer.wte.output.save()
    assert pre.abs().sum() > 0 and post.abs().sum() == 0 and post.shape == pre.shape


def test_iter_over_generation_steps_equals_hooks(gpt2, gpt2_tokenizer, recorded):
    model = LanguageModel(gpt2, tokenizer=gpt2_tokenizer)
    ids = gpt2_tokenizer("Hello world", return_tensors="pt")
    seen = recorded(
        gpt2.lm_head,
        lambda: gpt2.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=gpt2_tokenizer.eos_token_id),
    )
    with model.generate("Hello world", max_new_tokens=3) as tracer:
        logits = list().save()
        for step in tracer.iter[:]:
            logits.append(model.lm_head.output)
            logits_again = model.lm_head.output  # the same step's call
            assert logits_again is logits[-1]
    assert len(logits) == 3
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(logits, seen))
