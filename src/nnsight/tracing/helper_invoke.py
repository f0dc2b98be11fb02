"""Invokes opened in a helper function the trace block calls.

    def add(tracer, prompt):
        with tracer.invoke(prompt):             # captured here, in add's own frame
            outs.append(model.lm_head.output.save())

    with model.trace() as tracer:
        add(tracer, "Hello")
        add(tracer, "World")                    # one batched forward, two invokes

The trace block's compiler rewrites only the invokes written in the block itself. An
invoke in a helper captures its own ``with`` statement the way a trace does (find the
source, skip the body, compile it with the helper's locals as they are when the ``with``
ends) and registers the compiled body as one more invoke of the running trace. Its
saved names reach the trace's caller, as in nnsight 0.8.1 (the helper has returned by
the time the model runs, so they cannot be bound in the helper).
"""

from __future__ import annotations

from .capture import capture, read_scope
from .interleaver import LoopEnd

# The function the trace compiler puts around a block's eager code: an invoke entered from
# it was rewritten by that compiler and gets its body through ``set_body``.
BLOCK_FUNCTION = "__nnsight_block__"


class HelperInvoke:
    """The capture of one helper invoke (``start`` in ``__enter__``, ``finish`` in ``__exit__``).

    It is also the runtime the compiled body calls back into: the body compiles as a block
    without invokes, so it hands itself over through ``implicit_invoke``; gradients and
    loops go to the tracer, as in the trace's own code.
    """

    LoopEnd = LoopEnd

    def __init__(self, invoker, frame, save, assign):
        self.invoker = invoker
        self._save = save  # what the compiled body calls for `.save()` and for assignments
        self._assign = assign
        self.tracer = invoker.tracer
        self.frame = frame
        self.block = capture(frame)
        self.skipper = self.block.skip(frame)

    def finish(self, exc_type) -> bool:
        """Register the body (True), or False where the ``with`` ended by an error of its own."""
        skipper, self.skipper = self.skipper, None
        if skipper is not None:
            skipper.restore()
        frame, self.frame = self.frame, None
        if not self.block.skipped(exc_type):
            return False
        self.block.compiled().run(frame, self, self._save, self._assign)
        return True

    # -- what the compiled body calls --------------------------------------------

    def implicit_invoke(self, body):
        tracer = self.tracer

        def run():
            try:
                body()
            finally:  # the body is its own scope: its saved names go to the trace's caller
                tracer.publish_saved(read_scope(body))

        self.invoker.set_body(run)

    def publish(self, names):
        self.tracer.publish(names)

    def backward(self, *args, **kwargs):
        return self.tracer.backward(*args, **kwargs)

    def grad(self, tensor):
        return self.tracer.grad(tensor)

    def set_grad(self, tensor, make_value):
        return self.tracer.set_grad(tensor, make_value)
