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

from .errors import NNsightError
from .interleaver import Interleaver, current_mediator


class GradHook:
    """A tensor hook that serves the gradient of one tensor to the backward block."""

    def __init__(self, tensor, interleaver, label):
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
        self.handle = tensor.register_hook(self)

    def __call__(self, grad):
        if not self.waiting:
            return None
        value, _ = self.interleaver.serve(self, "grad", 0, grad)
        return value if value is not grad else None


class BackwardInterleaver(Interleaver):
    def __init__(self):
        super().__init__(batch_size=None)
        self.grad_hooks = {}

    def grad_hook(self, tensor):
        hook = self.grad_hooks.get(id(tensor))
        if hook is None:
            label = f"tensor of shape {tuple(tensor.shape)}"
            hook = self.grad_hooks[id(tensor)] = GradHook(tensor, self, label)
        return hook

    def remove_hooks(self):
        super().remove_hooks()
        for hook in self.grad_hooks.values():
            hook.handle.remove()


def run_backward(tensor, body, args, kwargs):
    parent = current_mediator()
    if parent is None:
        raise NNsightError("`with tensor.backward():` works inside a trace")
    interleaver = BackwardInterleaver()
    interleaver.tracer = parent.interleaver.tracer
    mediator = interleaver.add(body)
    try:
        interleaver.run(lambda: tensor.backward(*args, **kwargs))
    finally:
        interleaver.cleanup()
    return mediator
