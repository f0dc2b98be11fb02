"""nnsight.intervention.serialization: dumps/loads round trips of values and the user's own code (no pickle)."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

pytest.importorskip("RestrictedPython")

import serialization_helpers as h  # noqa: E402
from remote_corpus import drive  # noqa: E402
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


def test_async_functions_and_async_generators_round_trip():
    import inspect

    back = rt(h.async_fn)
    assert inspect.iscoroutinefunction(back) and drive(back(7)) == drive(h.async_fn(7)) == 7
    scaled = rt(h.async_scaled)
    t = torch.arange(3.0)
    assert torch.equal(drive(scaled(t, k=3)), drive(h.async_scaled(t, k=3)))
    assert inspect.isasyncgenfunction(rt(h.async_gen))
    assert drive(rt(h.async_collect)(4)) == drive(h.async_collect(4)) == asyncio.run(h.async_collect(4))


def test_coroutines_expose_only_send_throw_close_to_remote_code():
    from nnsight.sandbox.guards import Guards

    guards = Guards(torch.nn.Module())
    coroutine = h.async_fn(1)
    assert guards.getattr(coroutine, "send") == coroutine.send
    for name in ("cr_frame", "cr_code", "cr_await"):
        with pytest.raises(SandboxError, match="only aclose, asend"):
            guards.getattr(coroutine, name)
    coroutine.close()
    agen = h.async_gen(1)
    with pytest.raises(SandboxError, match="not available"):
        guards.getattr(agen, "ag_frame")
    step = guards.getattr(agen, "asend")(None)
    with pytest.raises(SandboxError, match="not available"):
        guards.getattr(step, "gi_frame")
    step.close()


def test_annotations_equal_the_local_ones():
    import annotated_helpers as a

    assert h.plain.__annotations__ == {"k": "int"}  # a `from __future__ import annotations` file: strings
    assert rt(h.plain).__annotations__ == h.plain.__annotations__
    assert rt(h.async_scaled).__annotations__ == h.async_scaled.__annotations__
    back = rt(a.annotated)
    assert back.__annotations__ == a.annotated.__annotations__  # evaluated on the rebuilding side, in the sandbox
    assert back.__annotations__["t"] == torch.Tensor and back.__annotations__["names"] == list[int] | None
    assert back.__doc__ == a.annotated.__doc__ and back.__defaults__ == a.annotated.__defaults__
    t = torch.ones(2)
    assert torch.equal(back(t, 3), a.annotated(t, 3))
    holder = rt(a.Holder)
    assert holder.__annotations__ == {"value": torch.Tensor, "extra": "typing.Any"}
    assert rt(a.Holder.get).__annotations__ == {"return": torch.Tensor}
    uses, Pair = rt([a.uses_class, a.Pair])  # a class sent by value: the annotation is the rebuilt class
    assert uses.__annotations__ == {"p": Pair, "scale": float, "return": Pair}


def test_annotations_reading_names_the_server_lacks_travel_as_text():
    import annotated_helpers as a

    back = rt(a.unsendable)
    assert back.__annotations__ == {"t": "typing.Optional[torch.Tensor]", "k": "typing.Any", "return": "dict[str, typing.Any]"}
    assert torch.equal(back(torch.ones(2), 2), a.unsendable(torch.ones(2), 2))


def test_rewritten_annotations_keep_the_users_line_numbers():
    import traceback

    import annotated_helpers as a

    lines = []
    for fn in (a.multiline, rt(a.multiline)):
        with pytest.raises(ZeroDivisionError) as caught:
            fn({}, None)
        lines.append(traceback.extract_tb(caught.value.__traceback__)[-1].lineno)
    assert lines[0] == lines[1]
