"""Worker supervisors: one thread of the server per served model, driving that model's worker process.

    supervisor = WorkerSupervisor("tiny", "/models/tiny", settings, job_queue, hub)
    supervisor.start()          # load now (or on the first request with settings.lazy)
    supervisor.state            # cold, loading, ready, failed
    supervisor.stop()

The supervisor takes jobs for its model from the ``JobQueue`` (a batch of up to
``settings.max_batch`` when co-batching is on, gathered for at most
``settings.batch_wait_ms``), sends them to its worker process (``worker_process``)
and reports back through the ``JobHub`` (``running``, ``log``, ``done``, ``error``).
A job that runs past its time limit, is cancelled while running alone, crashes the
process or leaves the model changed gets the process killed; a fresh one is started
while the server keeps serving. With a memory budget, a ``MemoryBudget`` shared by
the supervisors unloads the least recently used idle models before loading another.
"""

from __future__ import annotations

import os
import queue as queue_module
import subprocess
import sys
import tempfile
import threading
import time

from . import models
from .integrity import refusal
from .protocol import ProtocolError, read_msg, write_msg

_EOF = object()


def worker_env() -> dict:
    """The worker's whole environment: no API keys, tokens or other secrets of the server."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
        "PYTHONDONTWRITEBYTECODE": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HOME": tempfile.gettempdir(),
    }
    for name in ("NNSIGHT_CACHE", "LANG", "LC_ALL"):
        if name in os.environ:
            env[name] = os.environ[name]
    return env


class MemoryBudget:
    """Which models may be loaded together: at most ``budget_bytes`` of weights, least recently used unloaded first."""

    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self.lock = threading.Lock()
        self.supervisors = []

    def make_room(self, wanted: "WorkerSupervisor", size: int):
        """Unload idle models (oldest use first) until ``size`` more bytes fit; returns what was unloaded."""
        if self.budget <= 0:
            return []
        unloaded = []
        with self.lock:
            loaded = [s for s in self.supervisors if s is not wanted and s.state == "ready"]
            used = sum(s.weight_bytes for s in loaded)
            for other in sorted(loaded, key=lambda s: s.last_used):
                if used + size <= self.budget:
                    break
                if other.busy():
                    continue
                other.unload()
                used -= other.weight_bytes
                unloaded.append(other.name)
        return unloaded


class WorkerSupervisor:
    def __init__(self, name, spec, settings, job_queue, hub, stderr=None, budget=None):
        self.name = name
        self.spec = spec
        self.settings = settings
        self.limits = settings.limits()
        self.queue = job_queue
        self.hub = hub
        self.stderr = stderr
        self.budget = budget
        self.lazy = bool(settings.lazy)
        self.state = "cold" if self.lazy else "starting"
        # A cold model's config and tokenizer come from its folder, so clients can build it before it loads.
        self.info = models.describe_folder(name, spec) if self.lazy else None
        self.proc = None
        self.inbox = None
        self.restarts = 0
        self.current = set()  # job ids the worker is running now
        self.weight_bytes = 0
        self.last_used = time.monotonic()
        self.on_isolation = None  # called with the layers the worker reports
        self._stop = threading.Event()
        self._wanted = threading.Event()
        if not self.lazy:
            self._wanted.set()
        self._unload = threading.Event()
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._loop, name=f"nnsight-worker-{name}", daemon=True)

    # -- lifecycle ------------------------------------------------------------------

    def start(self):
        self.thread.start()

    def wanted(self):
        """A request needs this model: load it if it is cold."""
        self.last_used = time.monotonic()
        self._wanted.set()

    def wait_ready(self, timeout=None) -> bool:
        return self._ready.wait(timeout)

    def busy(self) -> bool:
        return bool(self.current) or self.queue.depth(self.name) > 0

    def unload(self):
        """Stop the worker process; the model goes back to cold until it is wanted again."""
        self._unload.set()

    def stop(self):
        self._stop.set()
        self._wanted.set()
        self._kill()

    def spawn(self):
        """Start the worker process and wait until its model is loaded (raises RuntimeError if it does not start)."""
        self.state = "loading"
        if self.budget is not None:
            unloaded = self.budget.make_room(self, _weights_on_disk(self.spec))
            for name in unloaded:
                self.hub.metrics.inc("nnsight_model_unloads_total", model=name)
        from .isolation import worker_command

        command = worker_command([sys.executable, "-m", "nnsight.server.worker_process"], self.limits)
        proc = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
            env=worker_env(), cwd=tempfile.gettempdir(), close_fds=True, start_new_session=True,
        )
        self.proc = proc
        self.inbox = queue_module.Queue()
        threading.Thread(target=self._read, args=(proc, self.inbox), daemon=True).start()
        write_msg(proc.stdin, {"type": "init", "spec": f"{self.name}={self.spec}", "limits": self.limits,
                               "data_dir": str(self.settings.data_dir)})
        message = self._next(timeout=self.limits.get("startup_timeout", 600))
        if not message or message.get("type") != "ready":
            self._kill()
            raise RuntimeError(f"the worker for {self.name!r} did not start (see the server log)")
        self.info = message["info"]
        self.weight_bytes = int(message.get("weight_bytes") or 0)
        if self.on_isolation is not None and isinstance(message.get("isolation"), dict):
            self.on_isolation({str(k): str(v) for k, v in message["isolation"].items()})
        self.state = "ready"
        self._ready.set()

    def _read(self, proc, inbox):
        cap = int(self.limits.get("max_result_bytes", 64 << 20) * 1.4) + (1 << 20)
        try:
            while True:
                inbox.put(read_msg(proc.stdout, cap))
        except (EOFError, OSError, ValueError, ProtocolError) as error:
            inbox.put((_EOF, error))

    def _next(self, timeout):
        try:
            message = self.inbox.get(timeout=timeout)
        except queue_module.Empty:
            return None
        if isinstance(message, tuple):
            return {"type": "eof", "error": message[1]}
        return message

    def _kill(self):
        proc = self.proc
        if proc is not None and proc.poll() is None:
            try:
                proc.kill()
            except OSError:
                pass
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:  # pragma: no cover
                pass

    def _restart(self, why):
        self._kill()
        self.restarts += 1
        self.hub.worker_restarted(self.name, why)

    # -- the supervisor loop -----------------------------------------------------------

    def _loop(self):
        failures = 0
        while not self._stop.is_set():
            if self._unload.is_set():
                self._unload.clear()
                if not self.busy():
                    self._kill()
                    self.proc = None
                    self.state = "cold"
                    self._ready.clear()
                    self._wanted.clear()
            if not self._wanted.is_set():
                if self.queue.depth(self.name):
                    self._wanted.set()
                else:
                    self._wanted.wait(0.5)
                    continue
            if self.proc is None or self.proc.poll() is not None or self.state != "ready":
                try:
                    self.spawn()
                    failures = 0
                except Exception as error:  # noqa: BLE001 - any start failure is reported and retried with backoff
                    failures += 1
                    self.state = "failed"
                    self.hub.worker_failed(self.name, str(error))
                    if self._stop.wait(min(30, 2 ** failures)):
                        return
                    continue
            job_id = self.queue.get(self.name, timeout=0.5)
            if job_id is None:
                continue
            self.last_used = time.monotonic()
            self.run_batch(self._gather(job_id))

    def _gather(self, first):
        return gather_batch(self.queue, self.hub, self.settings, self.name, first)

    def run_batch(self, job_ids):
        """Run these jobs (taken from the queue) on the worker, reporting each to the hub; returns when all ended."""
        jobs = []
        for job_id in job_ids:
            request = self.hub.take_request(job_id)
            if request is not None:  # None: cancelled while queued
                jobs.append({"id": job_id, "request": request})
        if not jobs:
            return
        self.hub.metrics.observe("nnsight_batch_size", len(jobs), model=self.name)
        pending = {job["id"] for job in jobs}
        self.current = set(pending)
        sent_at = time.monotonic()
        try:
            write_msg(self.proc.stdin, {"type": "batch", "jobs": jobs, "co_batch": self.settings.co_batch != "off"})
        except OSError:
            for job_id in pending:
                self.hub.failed(job_id, "RemoteError", "the model worker stopped before the job could start")
            self._restart("broken pipe")
            self.current = set()
            return
        del jobs
        timeout = float(self.limits.get("job_timeout", 60))
        deadline = time.monotonic() + timeout
        cancelled = set()
        try:
            while pending:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    for job_id in pending:
                        self.hub.failed(job_id, "TimeoutError",
                                        f"the job ran longer than the server's limit of {timeout} s and was stopped")
                    self._restart("time limit")
                    return
                for job_id in [j for j in pending if j not in cancelled and self.hub.cancel_requested(j)]:
                    cancelled.add(job_id)
                    self.hub.cancelled(job_id)
                if cancelled >= pending:  # every job still running was cancelled: stop the work
                    self._restart("cancelled while running")
                    return
                message = self._next(timeout=min(remaining, 0.2))
                if message is None:
                    continue
                kind = message.get("type")
                job_id = message.get("id")
                if kind == "eof":
                    code = self.proc.poll() if self.proc else None
                    if code is None:
                        time.sleep(0.2)
                        code = self.proc.poll()
                    why = self._why(code, message.get("error"))
                    for job_id in pending - cancelled:
                        self.hub.failed(job_id, "MemoryError" if "memory" in why else "RemoteError", f"the job {why}")
                    self._restart(why)
                    return
                if kind == "tainted":
                    info = refusal(str(message.get("reason")))
                    for job_id in pending - cancelled:
                        self.hub.failed(job_id, info["type"], info["message"])
                    self._restart("model changed")
                    return
                if kind == "group":
                    self.hub.metrics.observe("nnsight_forward_batch_size", int(message.get("size") or 0), model=self.name)
                    continue
                if job_id not in pending:
                    continue
                if kind == "running":
                    deadline = time.monotonic() + timeout  # each job (or co-batch) gets the full time limit
                    if job_id not in cancelled:
                        self.hub.running(job_id)
                elif kind == "log":
                    if job_id not in cancelled:
                        self.hub.log(job_id, str(message.get("text", "")))
                elif kind in ("done", "error"):
                    self._timing(message.get("timing"), sent_at)
                    pending.discard(job_id)
                    self.current.discard(job_id)
                    if job_id in cancelled:
                        continue  # cancelled while its batch-mates ran: the result is dropped
                    if kind == "done":
                        self.hub.done(job_id, message.get("values"), message.get("tensors"))
                    else:
                        self.hub.error(job_id, message.get("error"))
        finally:
            self.current = set()
            self.last_used = time.monotonic()

    def _timing(self, timing, sent_at):
        """Record where a job's time in the worker went (the worker's own report, as monotonic times)."""
        if not isinstance(timing, dict):
            return
        try:
            ipc = (float(timing["received"]) - sent_at) + (time.monotonic() - float(timing["sent"]))
            parts = {"ipc": ipc, "worker_wait": float(timing["waited"]), "run": float(timing["run"]),
                     "check": float(timing["check"])}
        except (KeyError, TypeError, ValueError):
            return
        for part, seconds in parts.items():
            self.hub.metrics.observe(f"nnsight_job_{part}_seconds", max(0.0, seconds), model=self.name)

    @staticmethod
    def _why(code, error):
        if isinstance(error, ProtocolError):
            return "produced a result over the server's size limit"
        if code is not None and code < 0:
            import signal

            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = str(-code)
            if name == "SIGKILL":
                return "was killed (out of memory?)"
            return f"crashed the model worker ({name})"
        if code == 3:
            return "changed the served model"
        return f"crashed the model worker (exit code {code}; out of memory?)"


def gather_batch(queue, hub, settings, model, first) -> list:
    """``first`` and the batch-mates queued for ``model`` within the batching window (co-batching)."""
    if settings.co_batch == "off" or settings.max_batch <= 1:
        return [first]
    more = settings.max_batch - 1
    # The window is for a burst in progress: with nothing else queued a lone request starts at once.
    if settings.batch_wait_ms > 0 and queue.depth(model) > 0:
        queue.wait(model, more, settings.batch_wait_ms / 1000)
    key = hub.key_of(first) if settings.co_batch == "per-key" else None
    return [first, *queue.take(model, more, key=key)]


def _weights_on_disk(spec) -> int:
    """Bytes of weight files in a model folder (0 when the spec is not a folder yet)."""
    from pathlib import Path

    folder = Path(spec)
    if not folder.is_dir():
        return 0
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf"))
