"""Gradients inside a trace equal torch.autograd on the same computation."""

import pytest
import torch

from nnsight import NNsight, OutOfOrderError


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def test_grad_equals_autograd():
    net = _net()
    model = NNsight(net)
    x = torch.rand(2, 4)
    with model.trace(x):
        hidden = model[0].output
        loss = model.output.sum()
        with loss.backward():
            grad = hidden.grad.save()
    h = net[0](x)
    expected = torch.autograd.grad(net[2](net[1](h)).sum(), h)[0]
    assert torch.allclose(grad, expected)


def test_replacing_a_gradient_changes_parameter_grads_like_a_hook():
    net = _net()
    model = NNsight(net)
    x = torch.rand(2, 4)
    with model.trace(x):
        hidden = model[1].output
        loss = model.output.sum()
        with loss.backward():
            hidden.grad = hidden.grad * 2
    ours = net[0].weight.grad.clone()
    net.zero_grad()
    h = net[1](net[0](x))
    h.register_hook(lambda g: g * 2)
    net[2](h).sum().backward()
    assert torch.allclose(ours, net[0].weight.grad)


def test_backward_order_later_layers_first():
    net = _net()
    model = NNsight(net)
    with model.trace(torch.rand(2, 4)):
        first = model[0].output
        second = model[1].output
        loss = model.output.sum()
        with loss.backward():
            g2 = second.grad.save()
            g1 = first.grad.save()
    assert g1.shape == (2, 8) and g2.shape == (2, 8)


def test_wrong_backward_order_is_an_error():
    net = _net()
    model = NNsight(net)
    with pytest.raises(Exception, match="shape"):
        with model.trace(torch.rand(2, 4)):
            first = model[0].output
            second = model[1].output
            loss = model.output.sum()
            with loss.backward():
                g1 = first.grad
                g2 = second.grad  # already computed before first's


def test_retain_graph_and_two_backward_passes():
    net = _net()
    model = NNsight(net)
    x = torch.rand(2, 4)
    with model.trace(x):
        hidden = model[0].output
        out = model.output
        with out.sum().backward(retain_graph=True):
            g_sum = hidden.grad.save()
        with (out ** 2).sum().backward():
            g_sq = hidden.grad.save()
    h = net[0](x)
    o = net[2](net[1](h))
    assert torch.allclose(g_sum, torch.autograd.grad(o.sum(), h, retain_graph=True)[0])
    assert torch.allclose(g_sq, torch.autograd.grad((o ** 2).sum(), h)[0])


def test_plain_backward_untouched_by_import():
    import nnsight  # noqa: F401

    assert torch.Tensor.backward.__module__ == "torch._tensor"


def test_gradients_with_several_invokes():
    net = _net()
    model = NNsight(net)
    a, b = torch.rand(1, 4), torch.rand(2, 4)
    with model.trace() as tracer:
        with tracer.invoke(a):
            hidden_a = model[0].output
            loss_a = model.output.sum()
            with loss_a.backward(retain_graph=True):
                grad_a = hidden_a.grad.save()
        with tracer.invoke(b):
            hidden_b = model[0].output
            out_b = model.output.save()
    h = net[0](a)
    expected = torch.autograd.grad(net[2](net[1](h)).sum(), h)[0]
    assert torch.allclose(grad_a, expected)
    assert out_b.shape == (2, 3)


def test_backward_after_the_trace_is_plain_pytorch():
    # The documented form: retain_grad inside the trace, an ordinary backward after it.
    net = _net()
    model = NNsight(net)
    x = torch.rand(2, 4)
    with model.trace(x):
        hidden = model[0].output
        hidden.retain_grad()
        hidden = hidden.save()
        loss = model.output.sum().save()
    loss.backward(retain_graph=True)
    h = net[0](x)
    expected = torch.autograd.grad(net[2](net[1](h)).sum(), h)[0]
    assert torch.allclose(hidden.grad, expected)
    # 0.8.1's `with loss.backward():` after the trace needs a global patch of Tensor.backward;
    # without one, backward runs and Python then refuses the `with` (nothing else happens).
    with pytest.raises(TypeError, match="context manager"):
        with loss.backward():
            pass
    assert torch.allclose(hidden.grad, 2 * expected)  # that backward did run: gradients accumulate
