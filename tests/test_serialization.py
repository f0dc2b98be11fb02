"""nnsight.intervention.serialization: dumps/loads round trips of values and the user's own code (no pickle)."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

pytest.importorskip("RestrictedPython")

import serialization_helpers as h  # noqa: E402
from nnsight.intervention.serialization import dumps, loads  # noqa: E402
from nnsight.remote import SandboxError, UnsupportedValue  # noqa: E402


def rt(obj):
    data = dumps(obj)
    assert isinstance(data, bytes) and json.loads(data)["format"] == "nnsight-serialization"
    return loads(data)


def test_plain_values_and_tensors_round_trip_exactly():
    value = {"t": torch.arange(6.0).view(2, 3), "n": [1, 2.5, None, True, "s", (1, 2)], "nan": float("inf"),
             "d": torch.float16, "s": slice(1, None, 2)}
    back = rt(value)
    assert torch.equal(back["t"], value["t"]) and back["n"] == value["n"] and back["nan"] == float("inf")
    assert back["d"] is torch.float16 and back["s"] == slice(1, None, 2)


@pytest.mark.parametrize("fn, args", [
    (h.plain, (2.0,)), (h.recursive, (5,)), (h.ping, (3,)), (h.with_import, (16.0,)),
    (h.make_adder(4), (1,)), (h.LAMBDAS[0], (1,)), (h.LAMBDAS[1], (2,)), (h.NESTED, (3,)),
], ids=["defaults-annotations-docstring", "recursion", "mutual-recursion", "import-inside", "closure",
        "lambda-1-of-2", "lambda-2-of-2-with-default", "nested-lambda"])
def test_functions_round_trip(fn, args):
    assert rt(fn)(*args) == fn(*args)


def test_keyword_defaults_and_generators():
    assert rt(h.plain)(1.0, k=3, shift=2.0) == h.plain(1.0, k=3, shift=2.0)
    assert rt(h.plain)(1.0) == h.plain(1.0)
    assert list(rt(h.counter_gen)(3)) == list(h.counter_gen(3))


def test_async_functions_are_refused_by_name():
    with pytest.raises(SandboxError, match="async"):
        rt(h.async_fn)
    assert asyncio.run(h.async_fn(1)) == 1


def test_tensor_function_uses_the_allowed_torch():
    t = torch.tensor([-1.0, 2.0])
    assert torch.equal(rt(h.tensor_fn)(t), h.tensor_fn(t))


def test_dataclasses_round_trip_with_state():
    p = h.Point(3.0, 4.0, ["a"])
    back = rt(p)
    assert (back.x, back.y, back.tags, back.norm) == (3.0, 4.0, ["a"], 5.0)
    fresh = rt(h.Point)(6.0, 8.0)
    assert fresh.norm == 10.0 and fresh.tags == []  # __post_init__ and default_factory ran
    frozen = rt(h.Frozen(1))
    assert (frozen.a, frozen.b) == (1, "b")
    with pytest.raises(Exception, match="cannot assign"):
        frozen.a = 2


def test_classes_with_inheritance_and_class_variables():
    child = rt(h.Child(5))
    assert child.describe() == "child:5" and child.double() == 10 and child.kind == "child"
    Child = rt(h.Child)
    assert Child(2).describe() == "child:2"


def test_imports_outside_the_allow_list_are_refused_naming_them():
    with pytest.raises(SandboxError, match="import of 'os'"):
        rt(h.uses_os)


def test_installed_code_is_refused_at_dumps():
    import json as stdlib_json

    with pytest.raises(UnsupportedValue, match="module json is not available"):
        dumps(stdlib_json)
    from transformers.pytorch_utils import apply_chunking_to_forward

    with pytest.raises(UnsupportedValue, match="installed package"):
        dumps(apply_chunking_to_forward)


def test_the_format_is_not_pickle():
    data = dumps({"f": h.plain, "t": torch.ones(2)})
    assert b"\x80" not in data[:2]  # a pickle stream starts with PROTO
    document = json.loads(data)
    assert any("def plain" in d["source"] for d in document["definitions"])
    with pytest.raises(ValueError, match="not nnsight serialization"):
        loads(b"\x80\x04K\x01.")


def test_the_same_values_inside_a_remote_trace(gpt2_module, gpt2_tokenizer):
    from nnsight import LanguageModel

    model = LanguageModel(gpt2_module, tokenizer=gpt2_tokenizer)
    point = h.Point(1.0, 0.0)
    results = {}
    for flag in (False, "local"):
        with model.trace("Hello", remote=flag):
            scaled = h.tensor_fn(model.transformer.h[0].output) * point.norm * h.recursive(3)
            child = h.Child(2).double()
            scaled = (scaled * child).save()
        results[flag] = scaled
    assert torch.allclose(results[False], results["local"])
