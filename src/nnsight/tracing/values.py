"""``.output`` / ``.input`` / ``.inputs``: the values of whatever an envoy stands for.

    class OperationEnvoy(ValueAccess):      # a module envoy, an operation inside a forward
        def _mediator(self, what): ...      # the running invoke, or a clear error

Shared by module envoys (``envoy.py``) and operation envoys (``source.py``).
"""

from __future__ import annotations


class ValueAccess:
    """``.output`` / ``.input`` / ``.inputs`` of whatever ``self`` stands for (a module, an operation).

    Subclasses provide ``_mediator(what)``: the running invoke, or a clear error.
    """

    def _assign_lazily(self, kind, make_value):
        if kind in ("output", "input", "inputs"):
            self._mediator(kind).set(self, kind, make_value=make_value)
        else:
            setattr(self, kind, make_value())

    @property
    def output(self):
        """The output for this invoke (waits until the model has produced it)."""
        return self._mediator("output").get(self, "output")

    @output.setter
    def output(self, value):
        self._mediator("output").set(self, "output", value)

    @property
    def input(self):
        """The first positional argument of the call (or the first keyword argument)."""
        return self._mediator("input").get(self, "input")

    @input.setter
    def input(self, value):
        self._mediator("input").set(self, "input", value)

    @property
    def inputs(self):
        """Every argument of the call, as ``(args_tuple, kwargs_dict)``."""
        return self._mediator("inputs").get(self, "inputs")

    @inputs.setter
    def inputs(self, value):
        self._mediator("inputs").set(self, "inputs", value)
