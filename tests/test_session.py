"""Sessions: values flow between traces and are bound after the session."""

import torch

from nnsight import NNsight


def test_value_from_first_trace_used_in_second(seq):
    model = NNsight(seq)
    a, b = torch.rand(1, 5), torch.rand(1, 5)
    with model.session():
        with model.trace(a):
            hs1 = model[0].output.save()
        with model.trace(b):
            model[0].output[:] = hs1
            out2 = model.output.save()
        plain = hs1 * 2
    assert torch.allclose(out2, seq(a))
    assert torch.equal(hs1, seq[0](a))
