"""``with model.scan(input):`` runs the model without computing anything, for shapes and dtypes.

    with model.scan("Hello"):
        dim = model.transformer.h[0].output[0].shape[-1]
    print(dim)   # 768

Everything runs under a FakeTensorMode; weights that are not loaded (meta
tensors) are stood in for by fake CPU tensors for the duration. No real memory
is used and no weights are read. Every name the block binds is bound after it (nothing
real is computed, so there is nothing to save), and an assignment whose shape
does not match what the model produces raises a clear error at once.
"""

from __future__ import annotations

import torch

from .tracer import Tracer


class ScanTracer(Tracer):
    def _keeps(self, value):
        return True

    def _run(self, interleaver, args, kwargs):
        interleaver.scanning = True
        if self._run_kwargs:
            kwargs = {**kwargs, **self._run_kwargs}
        args, kwargs = self.model._scan_inputs(args, kwargs)
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode(allow_non_fake_inputs=True):
            swapped = _fake_meta_tensors(self.model._module)
            try:
                return interleaver.run(lambda: self.model._run(args, kwargs))
            finally:
                for table, name, original in swapped:
                    table[name] = original


def _fake_meta_tensors(module):
    """Stand fake CPU tensors in for meta ones (weights not loaded), so every op runs as on CPU."""
    swapped = []
    for sub in module.modules():
        for table in (sub._parameters, sub._buffers):
            for name, tensor in list(table.items()):
                if tensor is not None and tensor.is_meta:
                    fake = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu")
                    if isinstance(tensor, torch.nn.Parameter):
                        fake = torch.nn.Parameter(fake, requires_grad=tensor.requires_grad)
                    table[name] = fake
                    swapped.append((table, name, tensor))
    return swapped
