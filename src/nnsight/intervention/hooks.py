"""``from nnsight.intervention.hooks import requires_output``: marks for ``eproperty`` stubs."""

from ..tracing.eproperty import requires_input, requires_inputs, requires_output

__all__ = ["requires_output", "requires_input", "requires_inputs"]
