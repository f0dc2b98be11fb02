"""``from nnsight.util import WrapperModule``: a module around a function, so its values get an envoy.

    sae = WrapperModule(lambda hs: hs @ W)       # or WrapperModule() for the identity
    model = NNsight(net)
    with model.trace(x):
        out = model.sae(model.layer.output, hook=True)   # an ad-hoc call nnsight can hook
        ...

Options:
    fn    called as ``fn(*args, **kwargs)`` by ``forward``; without it the module returns its
          input (one argument) or the tuple of its arguments
"""

from __future__ import annotations

import torch


class WrapperModule(torch.nn.Module):
    """A ``torch.nn.Module`` whose forward calls ``fn`` (see module docstring)."""

    def __init__(self, fn=None):
        super().__init__()
        if fn is not None and not callable(fn):
            raise TypeError(f"WrapperModule wraps a callable, not {type(fn).__name__}")
        self.fn = fn

    def forward(self, *args, **kwargs):
        if self.fn is not None:
            return self.fn(*args, **kwargs)
        if kwargs:
            raise TypeError("WrapperModule() without a function passes positional arguments through, not keywords")
        return args[0] if len(args) == 1 else args


__all__ = ["WrapperModule"]
