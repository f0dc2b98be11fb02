"""``with model.scan(input):`` runs the model without computing anything, for shapes and dtypes.

    with model.scan("Hello"):
        dim = model.transformer.h[0].output[0].shape[-1]
    print(dim)   # 768

A model whose weights are not loaded (on the meta device) runs on meta inputs;
a loaded one runs under a FakeTensorMode. Either way no real memory is used and
no weights are read. Every name the block binds is bound after it (nothing
real is computed, so there is nothing to save), and an assignment whose shape
does not match what the model produces raises a clear error at once.
"""

from __future__ import annotations

import contextlib

import torch

from .tracer import Tracer


def _to_meta(value):
    if isinstance(value, torch.Tensor):
        return value.to("meta")
    if isinstance(value, (list, tuple)):
        return type(value)(_to_meta(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_meta(v) for k, v in value.items()}
    return value


class ScanTracer(Tracer):
    def _keeps(self, value):
        return True

    def _run(self, interleaver, args, kwargs):
        interleaver.scanning = True
        if self._run_kwargs:
            kwargs = {**kwargs, **self._run_kwargs}
        args, kwargs = self.model._scan_inputs(args, kwargs)
        module = self.model._module
        on_meta = any(p.is_meta for p in module.parameters()) or any(b.is_meta for b in module.buffers())
        if on_meta:
            args, kwargs = _to_meta(args), _to_meta(kwargs)
            mode = contextlib.nullcontext()
        else:
            from torch._subclasses.fake_tensor import FakeTensorMode

            mode = FakeTensorMode(allow_non_fake_inputs=True)
        with mode:
            return interleaver.run(lambda: self.model._run(args, kwargs))
