"""``with model.edit() as edited:`` records interventions that every later trace applies first.

    with model.edit() as model_edited:
        model.transformer.h[0].output[0][:] = 0
    with model_edited.trace("Hello"):       # h[0] is zeroed here
        out = model_edited.transformer.h[0].output[0].save()
    with model.trace("Hello"):              # the original is untouched
        ...

``with model.edit() as (tracer, edited):`` (nnsight 0.8.1's form) binds the edit's tracer too.

Options of ``model.edit(inplace=False)``:
    inplace   edit ``model`` itself instead of returning an edited copy
``model.clear_edits()`` removes every edit. The edit's code is captured once,
with the values it refers to at that moment (a steering vector, say), and runs
as an extra invoke over the whole batch before the trace's own invokes.
"""

from __future__ import annotations

import ast

from .errors import NNsightError
from .tracer import BlockContext


class EditTracer(BlockContext):
    def __init__(self, model, inplace=False):
        super().__init__()
        self.model = model
        self.target = model if inplace else model._copy_for_edit()
        self.inplace = inplace

    def _entered(self):
        # nnsight 0.8.1 binds ``(tracer, edited)``; scripts unpack it with ``as (tracer, edited)``.
        # A two-name target gets that pair, a single name the edited model.
        target = self._block.node.items[0].optional_vars
        if isinstance(target, (ast.Tuple, ast.List)) and len(target.elts) == 2:
            return self, self.target
        return self.target

    def implicit_invoke(self, body):
        self.target._edits = [*self.target._edits, body]

    def _execute(self, scope):
        if self._block.compiled().shared_names:
            raise NNsightError("model.edit() blocks take no tracer.invoke(...): write the edit directly in the block")
