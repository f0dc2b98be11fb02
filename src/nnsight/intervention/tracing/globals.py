"""``from nnsight.intervention.tracing.globals import Object``: the type hint for values read in a trace.

Values inside a trace are the model's real objects (tensors, mostly), so ``Object`` is
``torch.Tensor``: ``Union[torch.Tensor, Object]`` annotations and ``isinstance`` checks
written for nnsight 0.8.1 keep working.
"""

import torch

from ...tracing.tracer import save

Object = torch.Tensor

__all__ = ["Object", "save"]
