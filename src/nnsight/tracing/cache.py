"""``tracer.cache()``: record module values during a trace.

    with model.trace("Hello") as tracer:
        cache = tracer.cache()                       # modules=[...], include_inputs=True
    cache["model.transformer.h.0"].output            # by dotted path ("transformer.h.0" works too)
    cache.model.transformer.h[0].output              # by attribute, mirroring the envoy tree
    for path in cache: ...

Paths always start at the root, ``model``, so a model with a child named
``model`` (Llama) stays unambiguous: ``cache.model.model.layers[0].output``.
A module called several times (or over several generation steps) keeps every
call in order: ``entry.outputs`` / ``entry.calls``; ``entry.output`` is the value
of a module called once, and the list of values of one called several times.
Values are recorded after the trace's interventions, for this invoke's rows,
as detached tensors (``detach=False`` keeps the autograd graph) sharing memory
with the model's own.
"""

from __future__ import annotations

import torch

from .batching import narrow
from .errors import NNsightError


def _detach(value):
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (list, tuple)):
        items = [_detach(v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, dict):
        items = {k: _detach(v) for k, v in value.items()}
        return type(value)(**items) if hasattr(value, "__dataclass_fields__") else type(value)(items)
    return value


class CacheEntry:
    """Every recorded call of one module."""

    def __init__(self, path):
        self.path = path
        self.calls = []  # [{"output": ..., "inputs": (args, kwargs)}]

    def _one(self, key):
        values = [call.get(key) for call in self.calls]
        if not values:
            raise NNsightError(f"{self.path} did not run in this trace")
        return values[0] if len(values) == 1 else values

    @property
    def output(self):
        return self._one("output")

    @property
    def outputs(self):
        return [call.get("output") for call in self.calls]

    @property
    def inputs(self):
        if self.calls and "inputs" not in self.calls[0]:
            raise NNsightError("inputs were not recorded: use tracer.cache(include_inputs=True)")
        return self._one("inputs")

    @property
    def input(self):
        inputs = self.inputs
        args, kwargs = inputs if not isinstance(inputs, list) else inputs[0]
        return args[0] if args else next(iter(kwargs.values()), None)

    def __repr__(self):
        return f"CacheEntry({self.path!r}, calls={len(self.calls)})"


class CacheView:
    """``cache.model.transformer.h[0]``: walks the recorded paths like the envoy tree."""

    def __init__(self, cache, prefix):
        self._cache = cache
        self._prefix = prefix

    def _entry(self):
        entry = self._cache._entries.get(self._prefix)
        if entry is None:
            raise KeyError(f"{self._prefix} was not recorded in this cache")
        return entry

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        if name in ("output", "outputs", "inputs", "input", "calls"):
            return getattr(self._entry(), name)
        return CacheView(self._cache, f"{self._prefix}.{name}")

    def __getitem__(self, index):
        return CacheView(self._cache, f"{self._prefix}.{index}")

    def __repr__(self):
        return f"CacheView({self._prefix!r})"


class Cache:
    """Recorded values of one trace (see module docstring)."""

    def __init__(self, model, mediator, modules, include_inputs, include_output, detach):
        self._entries: dict[str, CacheEntry] = {}
        self._mediator = mediator
        self._include_inputs = include_inputs
        self._include_output = include_output
        self._detach = detach
        interleaver = mediator.interleaver
        envoys = model.modules() if modules is None else [model.get(m) if isinstance(m, str) else m for m in modules]
        for envoy in envoys:
            hook = interleaver.hook_for(envoy)
            hook.observers = (hook.observers or ()) + (self._record,)

    @classmethod
    def from_calls(cls, calls_by_path: dict) -> "Cache":
        """A finished cache from ``{path: [{"output": ..., "inputs": ...}, ...]}`` (a remote job's cache)."""
        cache = cls.__new__(cls)
        cache._entries = {}
        for path, calls in calls_by_path.items():
            entry = cache._entries[path] = CacheEntry(path)
            entry.calls = list(calls)
        return cache

    def _record(self, hook, path, args, kwargs, output):
        mediator = self._mediator
        il = mediator.interleaver
        call = {}
        keep = _detach if self._detach else (lambda v: v)
        if self._include_output:
            call["output"] = keep(narrow(output, mediator.rows, il.batch_size))
        if self._include_inputs:
            call["inputs"] = keep(narrow((tuple(args), dict(kwargs)), mediator.rows, il.batch_size))
        self._entries.setdefault(path, CacheEntry(path)).calls.append(call)

    def _key(self, key):
        if isinstance(key, str) and key != "model" and not key.startswith("model."):
            key = f"model.{key}"
        return key

    def __getitem__(self, key):
        entry = self._entries.get(self._key(key))
        if entry is None:
            raise KeyError(f"{key!r} was not recorded; recorded: {', '.join(list(self._entries)[:8])}...")
        return entry

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return CacheView(self, "model" if name == "model" else f"model.{name}")

    def __contains__(self, key):
        return self._key(key) in self._entries

    def __iter__(self):
        return iter(self._entries)

    def __len__(self):
        return len(self._entries)

    def keys(self):
        return self._entries.keys()

    def items(self):
        return self._entries.items()

    def values(self):
        return self._entries.values()

    def __repr__(self):
        return f"Cache({len(self._entries)} modules)"
