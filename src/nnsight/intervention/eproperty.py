"""``from nnsight.intervention.eproperty import eproperty`` (0.8.1's module name)."""

from ..tracing.eproperty import eproperty, requires_input, requires_output

__all__ = ["eproperty", "requires_output", "requires_input"]
