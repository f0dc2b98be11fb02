"""Ad-hoc module calls in a trace: invisible by default; ``hook=True`` makes them part of the interleaving."""

import pytest
import torch

from nnsight import MissedValueError, NNsight


class Net(torch.nn.Module):
    """``sae`` is attached to the tree but the forward never calls it."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(4, 4)
        self.b = torch.nn.Linear(4, 4)
        self.sae = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 4))

    def forward(self, x):
        return self.b(self.a(x))


def _net():
    torch.manual_seed(0)
    return Net()


def test_default_ad_hoc_call_does_not_count_as_a_call(twolayer):
    model = NNsight(twolayer)
    x = torch.rand(2, 4)
    with model.trace(x):
        h = model.inp.output
        adhoc = model.shared(h).save()      # not one of shared's calls in the forward
        first = model.shared.output.save()  # still the forward's first call
    assert torch.allclose(adhoc, twolayer.shared(twolayer.inp(x)))
    assert torch.allclose(first, twolayer.shared(twolayer.inp(x)))


def test_hooked_call_from_an_edit_is_readable_and_editable_in_the_trace():
    net = _net()
    model = NNsight(net)
    x = torch.rand(2, 4)
    with model.edit() as edited:
        edited.a.output = edited.sae(edited.a.output, hook=True)
    with edited.trace(x):
        enc = edited.sae[0].output.save()
        edited.sae[1].output[:] = 0           # an edit inside the hooked call
        out = edited.output.save()
    with torch.no_grad():
        expected_enc = net.sae[0](net.a(x))
        expected_out = net.b(net.sae[2](torch.zeros(2, 3)))
    assert torch.allclose(enc, expected_enc, atol=1e-6)
    assert torch.allclose(out, expected_out, atol=1e-6)
    with model.trace(x):  # the original model is untouched
        plain = model.output.save()
    assert torch.allclose(plain, net(x))


def test_hooked_call_in_one_invoke_is_seen_by_another():
    net = _net()
    model = NNsight(net)
    x = torch.rand(1, 4)
    with model.trace() as tracer:
        with tracer.invoke(x):
            model.a.output = model.sae(model.a.output, hook=True)
            mine = model.output.save()
        with tracer.invoke(x):
            theirs = model.sae[0].output.save()
    with torch.no_grad():
        assert torch.allclose(theirs, net.sae[0](net.a(x)), atol=1e-6)
        assert torch.allclose(mine, net.b(net.sae(net.a(x))), atol=1e-6)


def test_unhooked_call_is_invisible_to_other_invokes():
    net = _net()
    model = NNsight(net)
    x = torch.rand(1, 4)
    with pytest.raises(MissedValueError, match=r"model\.sae\[0\]\.output"):
        with model.trace() as tracer:
            with tracer.invoke(x):
                model.a.output = model.sae(model.a.output)  # hook=False: nothing is served
            with tracer.invoke(x):
                model.sae[0].output.save()
