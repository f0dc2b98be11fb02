"""``from nnsight.intervention.interleaver import Mediator, OutOfOrderError``: one invoke's side of the interleaving.

``OutOfOrderError`` (also ``Mediator.OutOfOrderError``) and ``Mediator.MissedProviderError``
are the errors scripts written for nnsight 0.8.1 catch (our ``OutOfOrderError`` and
``MissedValueError``).
"""

from ..tracing.errors import OutOfOrderError
from ..tracing.interleaver import Interleaver, Mediator

__all__ = ["Mediator", "Interleaver", "OutOfOrderError"]
