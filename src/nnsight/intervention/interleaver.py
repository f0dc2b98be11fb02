"""``from nnsight.intervention.interleaver import Mediator``: one invoke's side of the interleaving.

``Mediator.OutOfOrderError`` and ``Mediator.MissedProviderError`` are the errors scripts
written for nnsight 0.8.1 catch (our ``OutOfOrderError`` and ``MissedValueError``).
"""

from ..tracing.interleaver import Interleaver, Mediator

__all__ = ["Mediator", "Interleaver"]
