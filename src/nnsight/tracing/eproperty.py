"""``eproperty``: user-defined values on envoys that wait for the module, like ``.output`` does.

    from nnsight import Envoy
    from nnsight.intervention.envoy import eproperty

    class Heads(Envoy):
        n_heads = 4

        @eproperty(key="output")
        def heads(self, value):                   # the attention output, per head
            hs = value[0]                         # GPT-2 attention returns (output, weights)
            b, s, h = hs.shape
            return hs.view(b, s, self.n_heads, h // self.n_heads).transpose(1, 2)

    model = NNsight(net, envoys={GPT2Attention: Heads})
    with model.trace(x):
        model.transformer.h[0].attn.heads[:, 1] = 0       # a view: the edit reaches the model

Options of ``eproperty(key=None, description=None)``:
    key           which value of the module it is a view of: "output" (the output as the
                  module returns it, tuples included) or "input" / "inputs" (the call's
                  ``(args, kwargs)``); default: the stub's name, or what ``requires_output`` /
                  ``requires_input`` on the stub says
    description   a short label for the envoy's listing
The decorated function is the *preprocess*: ``(self, value) -> what the user reads``
(a stub taking only ``self``, as older nnsight versions wrote them, reads the raw value).
    @prop.postprocess   ``(self, value) -> raw``: what an assignment ``envoy.prop = v`` puts back
    @prop.transform     ``(self, view, raw) -> raw``: writes an edited *copy* back into the model;
                        it runs when the block next waits for the model (or ends), edited or not,
                        so it must give the raw value back unchanged for an unedited view
A preprocess that returns a view of the tensor (``view``, ``transpose``, slicing) needs no
transform: in-place edits of a view reach the model's own tensor.
"""

from __future__ import annotations

import inspect

from .errors import NotInTraceError
from .interleaver import current_mediator

_POINTS = {"output": "output", "input": "inputs", "inputs": "inputs"}


def requires_output(fn):
    """Mark an eproperty stub as a view of the module's output (the nnsight 0.5 spelling)."""
    fn.__nnsight_point__ = "output"
    return fn


def requires_input(fn):
    """Mark an eproperty stub as a view of the module's call arguments ``(args, kwargs)``."""
    fn.__nnsight_point__ = "inputs"
    return fn


requires_inputs = requires_input


class eproperty(property):
    """A hookable value on an ``Envoy`` subclass (see module docstring)."""

    def __init__(self, key=None, description=None):
        super().__init__()
        self.name = None
        self.key = None
        self.description = description
        self._preprocess = None
        self._postprocess = None
        self._transform = None
        self._point = None
        if callable(key):  # bare @eproperty
            self(key)
        else:
            self.key = key

    def __call__(self, fn):
        self.name = fn.__name__
        self.__doc__ = fn.__doc__
        point = getattr(fn, "__nnsight_point__", None)
        try:
            takes_value = len(inspect.signature(fn).parameters) >= 2
        except (TypeError, ValueError):
            takes_value = True
        self._preprocess = fn if takes_value else None
        key = self.key or self.name
        self._point = point or _POINTS.get(key)
        if self._point is None:
            raise ValueError(
                f"eproperty {self.name!r}: key {key!r} names no value of a module; use key='output' or "
                "key='input', or mark the function with requires_output / requires_input"
            )
        return self

    def postprocess(self, fn):
        self._postprocess = fn
        return self

    def preprocess(self, fn):
        self._preprocess = fn
        return self

    def transform(self, fn):
        self._transform = fn
        return self

    def __set_name__(self, owner, name):
        if self.name is None:
            self.name = name

    def _mediator(self, obj):
        mediator = current_mediator()
        if mediator is None:
            raise NotInTraceError(
                f"{getattr(obj, '_display', type(obj).__name__)}.{self.name} was accessed outside of a trace: "
                "like .output, it exists only while the model runs"
            )
        return mediator

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        mediator = self._mediator(obj)
        key = (self, id(obj))
        if self._transform is not None:
            # Read again before the copy went back: the same copy, so both edits count.
            view = mediator.pending_view(key)
            if view is not None:
                return view
        raw = mediator.get(obj, self._point)
        value = self._preprocess(obj, raw) if self._preprocess is not None else raw
        if self._transform is not None:
            transform = self._transform
            mediator.write_back(obj, self._point, lambda: transform(obj, value, raw), key, value)
        return value

    def __set__(self, obj, value):
        if self._postprocess is not None:
            value = self._postprocess(obj, value)
        self._mediator(obj).set(obj, self._point, value)

    def __str__(self):
        return f"({self.name}): {self.description or ''}".rstrip(": ")
