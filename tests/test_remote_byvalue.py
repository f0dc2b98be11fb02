"""The user's own functions travel by value (source + closure + globals), never pickled; compared with local runs."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("RestrictedPython")
pytest.importorskip("transformers")

from nnsight.remote import UnsupportedValue  # noqa: E402

OFFSET = 0.25


def make_scaler(factor):
    def scale(t):
        return t * factor + OFFSET

    return scale


def make_counter():
    def count(n):
        return 0 if n == 0 else 1 + count(n - 1)

    return count


def with_defaults(t, k: int = 2, *, shift=1.0):
    """Docstrings and annotations travel with the source."""
    import math

    return t * k + shift + math.pi


TWO_LAMBDAS = (lambda t: t + 1, lambda t: t * 3)  # noqa: E731
WITH_DEFAULT = lambda t, s=OFFSET: t - s  # noqa: E731


@pytest.fixture
def model(gpt2_module, gpt2_tokenizer):
    from nnsight import LanguageModel

    return LanguageModel(gpt2_module, tokenizer=gpt2_tokenizer)


def run(model, remote, fn):
    with model.trace("Hello world", remote=remote):
        out = fn(model.transformer.h[0].output).save()
    return out


@pytest.mark.parametrize(
    "make",
    [
        lambda: make_scaler(3.0),
        lambda: with_defaults,
        lambda: TWO_LAMBDAS[0],
        lambda: TWO_LAMBDAS[1],
        lambda: WITH_DEFAULT,
        lambda: (lambda t: make_counter()(3) * t),
    ],
    ids=["closure", "defaults-annotations-import", "lambda-1-of-2", "lambda-2-of-2", "lambda-default", "nested-recursion"],
)
def test_function_by_value_matches_local(model, make):
    fn = make()
    assert torch.allclose(run(model, False, fn), run(model, "local", fn))


def test_functions_of_installed_packages_are_refused_with_the_fix(model):
    from transformers.pytorch_utils import apply_chunking_to_forward as gelu_fn  # a function of an installed package

    with pytest.raises(UnsupportedValue, match=r"installed package .*nnsight.register"):
        run(model, "local", gelu_fn)


def test_allowed_library_functions_travel_by_name(model):
    fn = torch.nn.functional.gelu
    assert torch.allclose(run(model, False, fn), run(model, "local", fn))


def test_register_and_local_modules():
    import json

    from nnsight.remote.byvalue import is_local_module, registered
    import nnsight

    assert is_local_module(__name__)  # this test file is the user's own code
    assert not is_local_module("json") and not is_local_module("torch")
    assert "transformers.activations" not in registered
    nnsight.register("transformers")
    try:
        assert is_local_module("transformers.activations")
    finally:
        registered.names.discard("transformers")
    with pytest.raises(ValueError, match="standard library"):
        nnsight.register(json)


def test_get_local_env_never_classes_stdlib_as_local():
    import sys

    from nnsight.ndif import get_local_env

    env = get_local_env()
    assert env["python_version"] == sys.version
    assert env["packages"]["torch"] == torch.__version__.split("+")[0] or env["packages"]["torch"].startswith(torch.__version__.split("+")[0])
    local = [name for name, version in env["packages"].items() if version == "local"]
    assert not [name for name in local if name in sys.stdlib_module_names]
