"""``with model.session():`` groups traces so values flow from one to the next.

    with model.session() as session:
        with model.trace("Hello"):
            hs1 = model.transformer.h[0].output[0].save()
        with model.trace("World"):
            model.transformer.h[0].output[0][:] = hs1
            hs2 = model.transformer.h[0].output[0].save()
    # hs1 and hs2 are bound here

The session's body is captured as one unit (the unit a remote request carries)
and runs in order; each trace inside it binds its saved values into the
session's scope, and everything saved anywhere is bound after the session.
"""

from __future__ import annotations

from .tracer import BlockContext


class Session(BlockContext):
    def __init__(self, model):
        super().__init__()
        self.model = model
        self._body = None

    def implicit_invoke(self, body):
        self._body = body

    def _execute(self, scope):
        if self._body is not None:
            self._body()
