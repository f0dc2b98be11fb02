"""What a job must leave unchanged in the served model, checked in the worker after every job (or co-batch).

    integrity = Integrity(model, weights_every=1)
    ...run a job...
    integrity.reset()                 # drop gradients the job left
    problem = integrity.check()       # None, or what changed (the worker then exits and is replaced)
    refusal(problem)                  # the ErrorInfo every job of that run is failed with

Checked: parameters/buffers (identity, storage, shape, dtype, version counter), hooks and
attributes of every module, the module classes, torch's global switches, tracing hooks
left installed, persistent edits, and every ``weights_every`` jobs a CRC of the weights.
"""

from __future__ import annotations

import zlib


class Integrity:
    """What a job must leave unchanged in the served model; checked after every job."""

    def __init__(self, model, weights_every: int):
        import torch

        self.model = model
        self.module = model._module
        self.weights_every = weights_every
        self.jobs = 0
        self.tensors = [(n, t) for n, t in list(self.module.named_parameters()) + list(self.module.named_buffers())]
        self.state = self._state()
        self.classes = {type(m): dict(vars(type(m))) for m in self.module.modules()}
        self.torch_state = self._torch_state()
        self.crc = self._crc() if weights_every else None
        self.torch = torch
        # what was already there (none on a server; remote="local" may check a model traced or edited before)
        self.slots = self._slots()
        self.edits = len(getattr(model, "_edits", None) or ())

    def _slots(self):
        from ..tracing.interleaver import installed_slots

        return installed_slots(self.module)

    def _state(self):
        out = []
        for name, t in self.tensors:
            out.append((name, id(t), t.data_ptr(), tuple(t.shape), t.dtype, t.requires_grad, t._version))
        for name, m in self.module.named_modules():
            hooks = sum(len(getattr(m, attr, {}) or {}) for attr in (
                "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
                "_load_state_dict_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs"))
            out.append((name, id(m), type(m), "forward" in m.__dict__, hooks, tuple(sorted(m.__dict__)), m.training))
        return out

    @staticmethod
    def _torch_state():
        import torch

        return (torch.is_grad_enabled(), torch.get_default_dtype(), torch.get_num_threads(), torch.is_inference_mode_enabled())

    def _crc(self):
        crc = 0
        for _, t in self.tensors:
            if t.device.type == "cpu":
                crc = zlib.crc32(memoryview(t.detach().contiguous().numpy()).cast("B"), crc)
            else:  # pragma: no cover (GPU)
                crc = zlib.crc32(str(float(t.detach().double().abs().sum())).encode(), crc)
        return crc

    def reset(self):
        for _, t in self.tensors:
            t.grad = None

    def check(self, jobs: int = 1) -> str | None:
        """What changed, or None; ``jobs``: how many jobs ran since the last check (a co-batch runs several)."""
        before = self.jobs
        self.jobs += jobs
        if self._state() != self.state:
            return "the model's parameters, buffers, hooks or module attributes changed"
        for cls, attrs in self.classes.items():
            if dict(vars(cls)) != attrs:
                return f"the class {cls.__name__} changed"
        if self._torch_state() != self.torch_state:
            return "torch's global state changed"
        if self._slots() > self.slots:
            return "a tracing hook was left on the model"
        if len(getattr(self.model, "_edits", None) or ()) > self.edits:
            return "persistent edits were left on the model"
        due = self.weights_every and self.jobs // self.weights_every > before // self.weights_every
        if due and self._crc() != self.crc:
            return "the model's weights changed"
        return None


def refusal(problem: str, reloaded: bool = True) -> dict:
    """The ``ErrorInfo`` (a dict) of a job after which ``check`` found ``problem``.

    reloaded: whether the model is reloaded (the server replaces its worker); ``remote="local"`` cannot.
    """
    after = "the model reloaded" if reloaded else 'the model keeps the change (remote="local" cannot reload it: build it again)'
    return {"type": "SandboxError", "message": f"the job changed the served model ({problem}); it was refused and {after}",
            "traceback": []}
