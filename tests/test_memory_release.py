"""Dropping the last reference to a model frees it by reference counting alone.

    model = NNsight(net); ...; del model   # the weights go now, not at the next gc pass

The cyclic collector is off in every test, so an object that survives is held by a
real reference cycle. The oracle is a weakref to the torch module (or tracer): dead
means freed. Each trace runs in a helper whose frame is gone when it returns.
"""

import gc
import weakref

import pytest
import torch

import nnsight
from nnsight import NNsight


class TwoLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(4, 4)
        self.b = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.b(self.a(x))


@pytest.fixture(autouse=True)
def no_cyclic_gc():
    gc.collect()  # start from a clean slate, then let only refcounting free things
    was = gc.isenabled()
    gc.disable()
    yield
    if was:
        gc.enable()


def _x():
    return torch.randn(2, 4)


def test_a_wrapped_model_is_freed_without_a_trace():
    def run():
        model = NNsight(TwoLayer())
        model.a, model.b  # build child envoys
        return weakref.ref(model._module)

    assert run()() is None


def test_a_traced_model_is_freed_and_the_saved_value_survives():
    def run():
        model = NNsight(TwoLayer())
        with model.trace(_x()):
            out = model.b.output.save()
        return out, weakref.ref(model._module)

    out, ref = run()
    assert ref() is None
    assert out.shape == (2, 4)


def test_holding_the_tracer_does_not_hold_the_model():
    def run():
        model = NNsight(TwoLayer())
        with model.trace() as tracer:
            with tracer.invoke(_x()):
                nnsight.save(model.a.output)
        return tracer, weakref.ref(model._module)

    tracer, ref = run()
    assert ref() is None
    assert tracer.model is None


def test_the_tracer_itself_is_freed():
    def run():
        model = NNsight(TwoLayer())
        with model.trace(_x()) as tracer:
            model.a.output.save()
        return weakref.ref(tracer)

    assert run()() is None


def test_an_error_in_the_trace_body_leaves_nothing_behind():
    def run():
        model = NNsight(TwoLayer())
        with pytest.raises(ValueError):
            with model.trace(_x()):
                raise ValueError("boom")
        return weakref.ref(model._module)

    assert run()() is None


def test_a_cache_dropped_with_the_model_frees_it():
    def run():
        model = NNsight(TwoLayer())
        with model.trace(_x()) as tracer:
            cache = tracer.cache()
        assert cache["model.a"].output.shape == (2, 4)
        return weakref.ref(model._module)

    assert run()() is None


def test_a_child_outlives_its_temporary_root():
    # The tree below the root is owned by the root, so a held child does not keep the
    # model's envoy; it still builds its own children from the shared options.
    net = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    inner = NNsight(net)[0]
    assert inner[0]._module is net[0][0]
    assert inner[0].parent is inner


class _RaisesAfterA(TwoLayer):
    def forward(self, x):
        hidden = self.a(x)
        raise RuntimeError("boom")


def test_a_model_that_raises_while_the_body_waits_is_freed():
    # The body is parked on b.output when the forward raises; unwinding it must not tie
    # the user's error to the model's frames.
    def run():
        model = NNsight(_RaisesAfterA())
        with pytest.raises(RuntimeError, match="boom"):
            with model.trace(_x()):
                nnsight.save(model.a.output)
                nnsight.save(model.b.output)
        return weakref.ref(model._module)

    assert all(run()() is None for _ in range(3))
