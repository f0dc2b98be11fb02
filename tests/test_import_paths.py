"""The import paths scripts and libraries written for nnsight 0.8.1 use name our own objects."""

import pytest
import torch

import nnsight
from nnsight import NNsight


def test_extension_api_names_are_the_implementation():
    from nnsight.intervention.envoy import Envoy, eproperty
    from nnsight.intervention.hooks import requires_input, requires_output
    from nnsight.intervention.interleaver import Mediator
    from nnsight.intervention.errors import MissedProviderError, OutOfOrderError
    from nnsight.intervention.tracing.globals import Object
    from nnsight.tracing.eproperty import eproperty as ours
    from nnsight.tracing.interleaver import Mediator as engine_mediator

    assert Envoy is nnsight.Envoy and eproperty is ours and Mediator is engine_mediator
    assert Mediator.OutOfOrderError is OutOfOrderError is nnsight.OutOfOrderError
    assert Mediator.MissedProviderError is MissedProviderError is nnsight.MissedValueError
    from nnsight.intervention.interleaver import OutOfOrderError as module_level

    assert module_level is nnsight.OutOfOrderError
    assert issubclass(nnsight.NNsightDeprecationWarning, FutureWarning)
    assert callable(requires_output) and callable(requires_input)
    assert isinstance(torch.zeros(1), Object)


def test_caught_by_their_0_8_1_names(seq, twolayer):
    from nnsight.intervention.interleaver import Mediator

    model = NNsight(seq)
    with pytest.raises(Mediator.OutOfOrderError):
        with model.trace(torch.rand(1, 5)):
            model[2].output.save()
            model[0].output.save()
    model = NNsight(twolayer)
    with pytest.raises(Mediator.MissedProviderError, match="unused"):
        with model.trace(torch.rand(1, 4)):
            model.unused.output.save()


def test_wrapper_module_gives_a_function_an_envoy(seq):
    from nnsight.util import WrapperModule

    seq.add_module("twice", WrapperModule(lambda t: t * 2))
    try:
        model = NNsight(seq)
        x = torch.rand(1, 2)
        with model.trace(torch.rand(1, 5)):
            out = model.twice(x).save()
        assert torch.equal(out, x * 2)
        assert WrapperModule()(x) is x and WrapperModule()(x, x) == (x, x)
        with pytest.raises(TypeError, match="wraps a callable"):
            WrapperModule(3)
    finally:
        del seq._modules["twice"]


def test_importing_patches_nothing():
    import subprocess
    import sys

    code = ("import torch; before = (torch.Tensor.backward, object.__dict__.get('save')); "
            "import nnsight, nnsight.intervention.envoy, nnsight.intervention.tracing.globals, nnsight.util; "
            "assert (torch.Tensor.backward, object.__dict__.get('save')) == before")
    subprocess.run([sys.executable, "-c", code], check=True)
