"""The worker process: loads one model, then runs the jobs its supervisor sends, in the sandbox.

    python -m nnsight.server.worker_process     (started by the server; talks over stdin/stdout)

Messages in:  {"type": "init", "spec", "limits", "data_dir"}, then {"type": "batch", "jobs": [{"id", "request"}], "co_batch"}
Messages out: {"type": "ready", "info", "weight_bytes", "isolation"}, {"type": "group", "size"} (one forward), {"type": "running", "id"}, {"type": "log", "id", "text"},
              {"type": "done", "id", "values", "tensors"}, {"type": "error", "id", "error"},
              {"type": "tainted", "reason"} (then it exits: the supervisor starts a fresh worker)

The worker holds no secrets (the supervisor starts it with a minimal environment). Once
its model is loaded it drops what it does not need (``isolation.apply_isolation``:
network, the data dir, root, sockets, unbounded memory) and reports which layers hold.
A batch's co-batchable requests share one forward (``cobatch``); the rest run alone.
"""

from __future__ import annotations

import gc
import os
import signal
import time


def _limit_files(files: int = 256):
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writing a file fails instead of killing us
    for name, value in (("RLIMIT_CORE", 0), ("RLIMIT_FSIZE", 0), ("RLIMIT_NOFILE", files)):
        try:
            resource.setrlimit(getattr(resource, name), (value, value))
        except (ValueError, OSError):
            pass


def _die_with_parent():
    """Get SIGKILL when the supervisor dies: a job stuck in a loop never reads the pipe's end-of-file."""
    import ctypes
    import ctypes.util

    parent = os.getppid()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except OSError:  # pragma: no cover (not Linux): the supervisor's kill on timeout still applies
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


class Worker:
    """One loaded model and what running a job against it needs."""

    def __init__(self, out, limits, spec):
        import torch

        from . import models
        from .cobatch import CoBatchGuards
        from .integrity import Integrity

        self.out = out
        self.limits = limits
        torch.set_num_threads(int(limits.get("threads", 1)))
        name, source = models.parse_spec(spec)
        self.model, folder = models.load(source)
        self.info = models.describe(name, self.model, folder)
        self.weight_bytes = sum(t.numel() * t.element_size() for t in self.model.parameters())
        self.guards = CoBatchGuards(self.model)
        self.integrity = Integrity(self.model, int(limits.get("weights_every", 1)))
        self.max_batch = max(1, int(limits.get("max_batch", 64)))

    def send(self, message):
        from .protocol import write_msg

        write_msg(self.out, message)

    def _run_one(self, job, make_context=None):
        from ..sandbox.runner import run_request

        job_id = job["id"]

        def emit(text, job_id=job_id):
            self.send({"type": "log", "id": job_id, "text": text})

        return run_request(
            self.model, self.guards, job["request"], job_id, emit,
            max_print=int(self.limits.get("max_print", 65536)), max_tensor_bytes=self.limits.get("max_tensor_bytes"),
            make_context=make_context,
        )

    def _reply(self, job, outcome):
        from ..sandbox.runner import describe_error, forget

        from .cobatch import JobTimeout

        job_id = job["id"]
        if isinstance(outcome, JobTimeout):
            reply = {"type": "error", "id": job_id, "error": {"type": "TimeoutError", "message": str(outcome), "traceback": []}}
        elif isinstance(outcome, BaseException):
            reply = {"type": "error", "id": job_id,
                     "error": describe_error(outcome, job_id, job["request"].get("filename") or "<remote>")}
        else:
            values, blob = outcome
            reply = {"type": "done", "id": job_id, "values": values, "tensors": blob}
        forget(job_id)
        return reply

    def run_batch(self, jobs, co_batch, received):
        """Run one batch message's jobs; ``received`` is when it arrived (time.monotonic, for the IPC timing)."""
        from .cobatch import plan_batches, run_group

        groups = plan_batches(self.model, jobs, len(jobs)) if co_batch and len(jobs) > 1 else [[job] for job in jobs]
        for group in groups:
            started = time.monotonic()
            self.send({"type": "group", "size": len(group)})
            for job in group:
                self.send({"type": "running", "id": job["id"]})
            replies = []
            if len(group) == 1:
                job = group[0]
                try:
                    outcome = self._run_one(job)
                except Exception as error:  # noqa: BLE001 - every failure of user code is reported to its job
                    outcome = error
                replies.append(self._reply(job, outcome))
                del outcome
            else:
                timeout = float(self.limits.get("job_timeout") or 0)
                message = f"the job ran longer than the server's limit of {timeout} s and was stopped"
                # Stopped here at 80% of the limit, so batch-mates can finish before the supervisor's own limit.
                for job, outcome in run_group(self.model, group, self._run_one, 0.8 * timeout, message):
                    replies.append(self._reply(job, outcome))
                    del outcome
            ran = time.monotonic()
            self.integrity.reset()
            gc.collect()
            problem = self.integrity.check(len(group))
            if problem is not None:
                self.send({"type": "tainted", "reason": problem})
                os._exit(3)
            checked = time.monotonic()
            for reply in replies:
                reply["timing"] = {"received": received, "waited": started - received, "run": ran - started,
                                   "check": checked - ran, "sent": time.monotonic()}
                self.send(reply)


def main():
    import faulthandler

    faulthandler.enable()  # a crash leaves a Python traceback in the server's log
    _die_with_parent()
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints go to stderr, never into the protocol stream
    inp = os.fdopen(os.dup(0), "rb")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)

    from .isolation import apply_isolation
    from .protocol import read_msg

    init = read_msg(inp)
    limits = init.get("limits", {})
    worker = Worker(out, limits, init["spec"])
    gc.collect()
    # Everything alive now (torch, transformers, the model) stays for the worker's life; frozen,
    # the collection after each job scans only what jobs created (~0.1 ms instead of ~400 ms).
    gc.freeze()
    _limit_files()
    layers = apply_isolation(init.get("data_dir"), limits.get("memory_mb"), worker.weight_bytes,
                             enabled=bool(limits.get("isolate", True)))
    worker.send({"type": "ready", "info": worker.info, "weight_bytes": worker.weight_bytes, "isolation": layers})

    while True:
        try:
            message = read_msg(inp)
        except EOFError:
            return
        if message["type"] == "batch":
            worker.run_batch(list(message.get("jobs") or []), bool(message.get("co_batch")), time.monotonic())


if __name__ == "__main__":
    main()
