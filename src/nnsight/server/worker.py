"""The model worker: a separate process that loads one model and runs jobs in the sandbox.

    python -m nnsight.server.worker        (started by the server; talks over stdin/stdout)

Messages in:  {"type": "init", "spec": ..., "limits": {...}}, then {"type": "job", "id": ..., "request": {...}}
Messages out: {"type": "ready", "info": {...}}, {"type": "log", "id", "text"}, {"type": "running", "id"},
              {"type": "done", "id", "values", "tensors"}, {"type": "error", "id", "error"},
              {"type": "tainted", "id", "reason"} (then it exits: the server starts a fresh worker)

The worker holds no secrets (the server starts it with a minimal environment),
and gets OS limits once its model is loaded.
"""

from __future__ import annotations

import os
import signal
import zlib


def _limit(memory_mb: int, files: int = 256):
    try:
        import resource
    except ImportError:  # pragma: no cover (not POSIX)
        return
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writing a file fails instead of killing us
    for name, value in (("RLIMIT_CORE", 0), ("RLIMIT_FSIZE", 0), ("RLIMIT_NOFILE", files)):
        limit = getattr(resource, name, None)
        if limit is not None:
            try:
                resource.setrlimit(limit, (value, value))
            except (ValueError, OSError):
                pass
    if memory_mb and memory_mb > 0:
        try:
            soft, hard = resource.getrlimit(resource.RLIMIT_AS)
            wanted = memory_mb << 20
            resource.setrlimit(resource.RLIMIT_AS, (wanted, wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)))
        except (ValueError, OSError):
            pass


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

    def check(self) -> str | None:
        from ..tracing.interleaver import installed_slots

        self.jobs += 1
        if self._state() != self.state:
            return "the model's parameters, buffers, hooks or module attributes changed"
        for cls, attrs in self.classes.items():
            if dict(vars(cls)) != attrs:
                return f"the class {cls.__name__} changed"
        if self._torch_state() != self.torch_state:
            return "torch's global state changed"
        if installed_slots(self.model._module):
            return "a tracing hook was left on the model"
        if getattr(self.model, "_edits", None):
            return "persistent edits were left on the model"
        if self.weights_every and self.jobs % self.weights_every == 0 and self._crc() != self.crc:
            return "the model's weights changed"
        return None


def main():
    import faulthandler

    faulthandler.enable()  # a crash leaves a Python traceback in the server's log
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints go to stderr, never into the protocol stream
    inp = os.fdopen(os.dup(0), "rb")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)

    from .protocol import read_msg, write_msg

    init = read_msg(inp)
    limits = init.get("limits", {})

    import torch

    torch.set_num_threads(int(limits.get("threads", 1)))
    from ..sandbox.guards import Guards
    from ..sandbox.runner import describe_error, forget, run_request
    from . import models

    name, source = models.parse_spec(init["spec"])
    model, folder = models.load(source)
    info = models.describe(name, model, folder)
    guards = Guards(model)
    integrity = Integrity(model, int(limits.get("weights_every", 1)))
    import gc

    gc.collect()
    _limit(int(limits.get("memory_mb", 0)))
    write_msg(out, {"type": "ready", "info": info})

    while True:
        try:
            message = read_msg(inp)
        except EOFError:
            return
        if message["type"] != "job":
            continue
        job_id = str(message["id"])
        request = message["request"]
        write_msg(out, {"type": "running", "id": job_id})

        def emit(text, job_id=job_id):
            write_msg(out, {"type": "log", "id": job_id, "text": text})

        try:
            values, blob = run_request(
                model, guards, request, job_id, emit,
                max_print=int(limits.get("max_print", 65536)),
                max_tensor_bytes=limits.get("max_tensor_bytes"),
            )
            reply = {"type": "done", "id": job_id, "values": values, "tensors": blob}
        except BaseException as error:  # noqa: BLE001 - every failure of user code is reported
            if isinstance(error, (KeyboardInterrupt, SystemExit)):
                raise
            reply = {"type": "error", "id": job_id, "error": describe_error(error, job_id, request.get("filename") or "<remote>")}
            del error
        finally:
            forget(job_id)
        integrity.reset()
        gc.collect()
        problem = integrity.check()
        if problem is not None:
            write_msg(out, {"type": "tainted", "id": job_id, "reason": problem})
            os._exit(3)
        write_msg(out, reply)


if __name__ == "__main__":
    main()
