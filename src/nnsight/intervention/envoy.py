"""``from nnsight.intervention.envoy import Envoy, eproperty``: the envoy class and its extension point."""

from ..tracing.envoy import Envoy
from ..tracing.eproperty import eproperty

__all__ = ["Envoy", "eproperty"]
