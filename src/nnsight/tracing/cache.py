"""``tracer.cache()``: record module values during a trace.

    with model.trace("Hello") as tracer:
        cache = tracer.cache()                       # every module's output
    cache["model.transformer.h.0"].output            # by dotted path ("transformer.h.0" works too)
    cache.model.transformer.h[0].output              # by attribute, mirroring the envoy tree
    cache.transformer.h[0].output                    # the short form, without "model"
    for path in cache: ...

Options of ``tracer.cache(...)`` (the defaults are nnsight 0.8.1's):
    modules          envoys or dotted paths to record (default: every module)
    device           where recorded tensors go (default CPU; None leaves them where they are)
    dtype            cast recorded floating-point tensors to this dtype (default: unchanged)
    non_blocking     the device copy may overlap the model's work (default True; no effect on CPU)
    detach           store detached tensors, so no autograd graph is kept alive (default True)
    include_output   record each call's output (default True)
    include_inputs   record each call's ``(args, kwargs)`` (default False)

Keys are real module paths from the root, ``model``, so a model with a child named
``model`` (Llama) stays unambiguous: ``cache.model.model.layers[0].output``. Lookups go
through the envoy tree, so ``rename=`` aliases work there too. A module called several
times (once per generation step, or several times in one forward) keeps every call in
order: ``len(cache[path])`` is the number of calls, and ``.output`` / ``.inputs`` /
``.input`` are the value of a module called once and the list of values of one called
several times (``.outputs`` / ``.calls`` always give lists). Values are recorded after
the trace's interventions, for this invoke's rows.
"""

from __future__ import annotations

import torch

from .batching import narrow
from .errors import NNsightError


def _convert(value, device, dtype, detach, non_blocking=True):
    if isinstance(value, torch.Tensor):
        if detach:
            value = value.detach()
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        if device is not None:
            value = value.to(device, non_blocking=non_blocking)
        return value
    if isinstance(value, (list, tuple)):
        items = [_convert(v, device, dtype, detach, non_blocking) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, dict):
        items = {k: _convert(v, device, dtype, detach, non_blocking) for k, v in value.items()}
        return type(value)(**items) if hasattr(value, "__dataclass_fields__") else type(value)(items)
    return value


class Call:
    """One recorded call of a module: ``.output``, ``.inputs`` (``(args, kwargs)``), ``.input``."""

    __slots__ = ("output", "inputs")

    def __init__(self, output=None, inputs=None):
        self.output = output
        self.inputs = inputs

    @property
    def input(self):
        if self.inputs is None:
            return None
        args, kwargs = self.inputs
        values = list(args) + list(kwargs.values())
        return values[0] if values else None

    def get(self, what):  # dict-style access, kept for older callers
        return getattr(self, what)

    def __repr__(self):
        return f"Call(output={'recorded' if self.output is not None else None}, inputs={'recorded' if self.inputs is not None else None})"


class CacheView:
    """``cache.model.transformer.h[0]``: one module of the cache, reached like its envoy."""

    def __init__(self, cache, envoy):
        object.__setattr__(self, "_cache", cache)
        object.__setattr__(self, "_envoy", envoy)

    @property
    def path(self) -> str:
        return self._envoy._path

    @property
    def calls(self) -> list:
        """Every recorded call, in order."""
        calls = self._cache._entries.get(self.path)
        if calls is None:
            raise KeyError(f"{self.path} was not recorded in this cache" + self._cache._hint())
        return calls

    def _one(self, what):
        values = [getattr(call, what) for call in self.calls]
        return values[0] if len(values) == 1 else values

    @property
    def output(self):
        return self._one("output")

    @property
    def outputs(self) -> list:
        return [call.output for call in self.calls]

    @property
    def inputs(self):
        return self._one("inputs")

    @property
    def input(self):
        return self._one("input")

    def __len__(self):
        return len(self.calls)

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return CacheView(self._cache, getattr(self._envoy, name))

    def __getitem__(self, key):
        if isinstance(key, str):
            return CacheView(self._cache, self._envoy.get(key))
        return CacheView(self._cache, self._envoy[key])

    def keys(self) -> list:
        """The recorded paths at or below this module."""
        prefix = self.path
        return [k for k in self._cache._entries if k == prefix or k.startswith(prefix + ".")]

    def __repr__(self):
        return f"CacheView({self.path!r}, calls={len(self._cache._entries.get(self.path, ()))})"


CacheEntry = CacheView  # the name earlier versions of this module used


class Cache:
    """Recorded values of one trace (see module docstring)."""

    def __init__(self, model, mediator, modules=None, include_inputs=False, include_output=True, detach=True,
                 device=torch.device("cpu"), dtype=None, non_blocking=True):
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise TypeError(f"tracer.cache(dtype=...) must be a torch.dtype, not {dtype!r}")
        self._model = model
        self._entries: dict[str, list[Call]] = {}
        self._mediator = mediator
        self._include_inputs = include_inputs
        self._include_output = include_output
        self._detach = detach
        self._device = torch.device(device) if device is not None else None
        self._dtype = dtype
        self._non_blocking = bool(non_blocking)
        interleaver = mediator.interleaver
        if modules is None:
            envoys = model.modules()
        else:
            envoys = [self._resolve(m) if isinstance(m, str) else m for m in modules]
        for envoy in envoys:
            hook = interleaver.hook_for(envoy)
            hook.observers = (hook.observers or ()) + (self._record,)

    @classmethod
    def from_calls(cls, model, calls_by_path: dict) -> "Cache":
        """A finished cache of ``model`` from ``{path: [(output, inputs), ...]}`` (a remote job's cache)."""
        cache = cls.__new__(cls)
        cache._model = model
        cache._entries = {path: [Call(output, inputs) for output, inputs in calls] for path, calls in calls_by_path.items()}
        return cache

    def _record(self, hook, path, args, kwargs, output):
        mediator = self._mediator
        il = mediator.interleaver
        call = Call()
        convert = self._device, self._dtype, self._detach, self._non_blocking
        if self._include_output:
            call.output = _convert(narrow(output, mediator.rows, il.batch_size), *convert)
        if self._include_inputs:
            call.inputs = _convert(narrow((tuple(args), dict(kwargs)), mediator.rows, il.batch_size), *convert)
        self._entries.setdefault(path, []).append(call)

    def _resolve(self, key: str):
        """The envoy a key names: a dotted path from the root, with or without ``model.``, aliases allowed."""
        if key == "model":
            return self._model
        try:
            return self._model.get(key)  # with or without the leading "model."
        except (AttributeError, IndexError):
            raise KeyError(f"{key!r} names no module of this model" + self._hint()) from None

    def _hint(self):
        shown = ", ".join(list(self._entries)[:6])
        return f"; recorded: {shown}{', ...' if len(self._entries) > 6 else ''}" if shown else "; nothing was recorded"

    def __getitem__(self, key):
        if key in self._entries:  # a real path, as recorded
            return CacheView(self, self._model._at(tuple(key.split(".")[1:])))
        view = CacheView(self, self._resolve(key))
        if view.path not in self._entries:
            raise KeyError(f"{key!r} was not recorded" + self._hint())
        return view

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        if name == "model":
            return CacheView(self, self._model)
        return CacheView(self, getattr(self._model, name))  # the short form: cache.transformer.h[0]

    def __contains__(self, key):
        if key in self._entries:
            return True
        try:
            return self._resolve(key)._path in self._entries
        except KeyError:
            return False

    def __iter__(self):
        return iter(self._entries)

    def __len__(self):
        return len(self._entries)

    def keys(self):
        return self._entries.keys()

    def items(self):
        return [(k, self[k]) for k in self._entries]

    def values(self):
        return [self[k] for k in self._entries]

    def __repr__(self):
        return f"Cache({len(self._entries)} modules)"
