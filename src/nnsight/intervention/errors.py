"""``from nnsight.intervention.errors import ...``: the errors a trace raises."""

from ..tracing.errors import MissedValueError, NNsightError, NotInTraceError, OutOfOrderError

MissedProviderError = MissedValueError  # 0.8.1's name for a value the model never produced

__all__ = ["NNsightError", "OutOfOrderError", "MissedValueError", "MissedProviderError", "NotInTraceError"]
