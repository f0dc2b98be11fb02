"""Persistent edits: the edited model applies them to every trace; the original stays untouched."""

import torch

from nnsight import NNsight


def test_edit_returns_edited_copy_and_original_is_unchanged(seq):
    model = NNsight(seq)
    x = torch.rand(2, 5)
    with model.edit() as edited:
        model[0].output[:] = 0
    with model.trace(x):
        plain = model[0].output.save()
    with edited.trace(x):
        zeroed = edited[0].output.save()
        out = edited.output.save()
    assert not torch.all(plain == 0)
    assert torch.all(zeroed == 0)
    assert torch.allclose(out, seq[2](seq[1](torch.zeros(2, 10))))
    assert torch.equal(seq(x), model(x))


def test_edit_captures_values_and_composes_with_interventions(seq):
    model = NNsight(seq)
    x = torch.rand(1, 5)
    steer = torch.full((10,), 0.5)
    with model.edit() as edited:
        model[0].output[:] = model[0].output + steer
    steer = None  # the edit keeps the value it captured
    with edited.trace(x):
        edited[2].output[:] = edited[2].output * 3
        out = edited.output.save()
    expected = seq[2](seq[1](seq[0](x) + 0.5)) * 3
    assert torch.allclose(out, expected)


def test_inplace_edit_and_clear(seq):
    model = NNsight(seq)
    x = torch.rand(1, 5)
    with model.edit(inplace=True):
        model[0].output[:] = 0
    with model.trace(x):
        zeroed = model[0].output.save()
    assert torch.all(zeroed == 0)
    model.clear_edits()
    with model.trace(x):
        again = model[0].output.save()
    assert not torch.all(again == 0)


def test_edit_as_tracer_and_edited_pair(seq):
    """0.8.1's ``as (tracer, edited)`` form: the edited copy zeroes layer 0; the oracle is a forward hook."""
    model = NNsight(seq)
    with model.edit() as (tracer, edited):
        edited[0].output[:] = 0
    x = torch.rand(2, 5)
    with edited.trace(x):
        out = edited.output.save()
    with model.trace(x):
        plain = model.output.save()
    handle = seq[0].register_forward_hook(lambda m, i, o: torch.zeros_like(o))
    try:
        expected = seq(x)
    finally:
        handle.remove()
    assert tracer is not edited and torch.equal(out, expected) and torch.equal(plain, seq(x))
