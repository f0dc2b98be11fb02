"""Gradients inside a trace: ``with loss.backward():`` runs its body alongside the backward pass.

    with model.trace("Hello"):
        hs = model.transformer.h[-1].output[0]
        hs.requires_grad_(True)
        loss = model.lm_head.output.sum()
        with loss.backward():          # retain_graph=..., gradient=... pass through
            grad = hs.grad.save()      # waits for hs's gradient
            hs.grad = grad * 2         # replaces what flows further back

Inside the block ``t.grad`` is compiled into a request for ``t``'s gradient
(a tensor hook on ``t``), so reads follow the backward order: later layers
first. A plain ``loss.backward()`` anywhere else is untouched; nothing is patched.
"""

from __future__ import annotations

from .batching import merge, narrow
from .errors import NNsightError
from .interleaver import Interleaver, current_mediator


class GradHook:
    """A tensor hook that serves the gradient of one tensor to the backward block.

    For an invoke's rows of a batched tensor (``rows``), the hook sits on the batch
    tensor the model actually used, and hands over (and takes back) those rows.
    """

    def __init__(self, tensor, interleaver, label, rows=None, batch_size=None):
        if not tensor.requires_grad:
            raise NNsightError(
                f"{label} does not require grad, so it has no gradient: call .requires_grad_(True) on it "
                "before computing the loss"
            )
        self.interleaver = interleaver
        self.path = label
        self.waiting = 0
        self.waiting_input = 0
        self.step = None  # read by error messages, like a ModuleHook's
        self.count = 0
        self.rows = rows
        self.batch_size = batch_size
        self.handle = tensor.register_hook(self)

    def __call__(self, grad):
        if not self.waiting:
            return None
        if self.rows is None:
            value, _ = self.interleaver.serve(self, "grad", 0, grad)
            return value if value is not grad else None
        view = narrow(grad, self.rows, self.batch_size)
        value, _ = self.interleaver.serve(self, "grad", 0, view)
        return None if value is view else merge(grad, view, value, self.rows, self.batch_size)


class BackwardInterleaver(Interleaver):
    def __init__(self, parent):
        super().__init__(batch_size=None)
        self.parent = parent  # the invoke whose code opened the backward block
        self.grad_hooks = {}

    def grad_hook(self, tensor):
        hook = self.grad_hooks.get(id(tensor))
        if hook is None:
            label = f"tensor of shape {tuple(tensor.shape)}"
            known = self.parent.views.get(id(tensor))
            if known is not None and known[0] is tensor:
                parent_il = self.parent.interleaver
                hook = GradHook(known[1], self, label, self.parent.rows, parent_il.batch_size)
            else:
                hook = GradHook(tensor, self, label)
            self.grad_hooks[id(tensor)] = hook
        return hook

    def remove_hooks(self):
        super().remove_hooks()
        for hook in self.grad_hooks.values():
            hook.handle.remove()


def run_backward(tensor, body, args, kwargs):
    parent = current_mediator()
    if parent is None:
        raise NNsightError("`with tensor.backward():` works inside a trace")
    interleaver = BackwardInterleaver(parent)
    interleaver.tracer = parent.interleaver.tracer
    mediator = interleaver.add(body)
    try:
        interleaver.run(lambda: tensor.backward(*args, **kwargs))
    finally:
        interleaver.cleanup()
    return mediator
