"""Model workers: one OS process per served model, supervised by a thread of the server.

``ModelWorker`` takes jobs for its model from the ``JobQueue``, sends each to its
worker process and reports back through the ``JobHub`` interface (``running``,
``log``, ``done``, ``failed``). A job that runs past its time limit, is cancelled
while running, crashes the process or leaves the model changed gets the process
killed; a fresh one is started while the server keeps serving.

To serve with Ray actors instead, implement the same three methods
(``start``, ``stop``, ``state``) with an actor per model replica, and to co-batch,
take several jobs from the queue in ``_run_one`` and send them as one message.
"""

from __future__ import annotations

import os
import queue as queue_module
import subprocess
import sys
import tempfile
import threading
import time

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


class ModelWorker:
    def __init__(self, name, spec, limits, job_queue, hub, stderr=None):
        self.name = name
        self.spec = spec
        self.limits = limits
        self.queue = job_queue
        self.hub = hub
        self.stderr = stderr
        self.state = "starting"
        self.info = None
        self.proc = None
        self.inbox = None
        self.restarts = 0
        self.current = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._loop, name=f"nnsight-worker-{name}", daemon=True)

    # -- lifecycle ------------------------------------------------------------------

    def start(self):
        self.thread.start()

    def wait_ready(self, timeout=None) -> bool:
        return self._ready.wait(timeout)

    def stop(self):
        self._stop.set()
        self._kill()

    def _spawn(self):
        self.state = "starting"
        proc = subprocess.Popen(
            [sys.executable, "-m", "nnsight.server.worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
            env=worker_env(), cwd=tempfile.gettempdir(), close_fds=True, start_new_session=True,
        )
        self.proc = proc
        self.inbox = queue_module.Queue()
        threading.Thread(target=self._read, args=(proc, self.inbox), daemon=True).start()
        write_msg(proc.stdin, {"type": "init", "spec": f"{self.name}={self.spec}", "limits": self.limits})
        message = self._next(timeout=self.limits.get("startup_timeout", 600))
        if not message or message.get("type") != "ready":
            self._kill()
            raise RuntimeError(f"the worker for {self.name!r} did not start (see the server log)")
        self.info = message["info"]
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
            if self.proc is None or self.proc.poll() is not None or self.state != "ready":
                try:
                    self._spawn()
                    failures = 0
                except Exception as error:  # noqa: BLE001
                    failures += 1
                    self.state = "failed"
                    self.hub.worker_failed(self.name, str(error))
                    if self._stop.wait(min(30, 2 ** failures)):
                        return
                    continue
            job_id = self.queue.get(self.name, timeout=0.5)
            if job_id is None:
                continue
            self._run_one(job_id)

    def _run_one(self, job_id):
        request = self.hub.take_request(job_id)
        if request is None:  # cancelled while queued
            return
        self.current = job_id
        try:
            write_msg(self.proc.stdin, {"type": "job", "id": job_id, "request": request})
        except OSError:
            self.hub.failed(job_id, "RemoteError", "the model worker stopped before the job could start")
            self._restart("broken pipe")
            self.current = None
            return
        del request
        deadline = time.monotonic() + float(self.limits.get("job_timeout", 60))
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self.hub.failed(job_id, "TimeoutError",
                                    f"the job ran longer than the server's limit of {self.limits.get('job_timeout')} s and was stopped")
                    self._restart("time limit")
                    return
                if self.hub.cancel_requested(job_id):
                    self.hub.cancelled(job_id)
                    self._restart("cancelled while running")
                    return
                message = self._next(timeout=min(remaining, 0.2))
                if message is None:
                    continue
                kind = message.get("type")
                if message.get("id") not in (None, job_id) and kind != "eof":
                    continue
                if kind == "running":
                    self.hub.running(job_id)
                elif kind == "log":
                    self.hub.log(job_id, str(message.get("text", "")))
                elif kind == "done":
                    self.hub.done(job_id, message.get("values"), message.get("tensors"))
                    return
                elif kind == "error":
                    self.hub.error(job_id, message.get("error"))
                    return
                elif kind == "tainted":
                    self.hub.failed(job_id, "SandboxError",
                                    f"the job changed the served model ({message.get('reason')}); it was refused and the model reloaded")
                    self._restart("model changed")
                    return
                elif kind == "eof":
                    code = self.proc.poll() if self.proc else None
                    if code is None:
                        time.sleep(0.2)
                        code = self.proc.poll()
                    why = self._why(code, message.get("error"))
                    self.hub.failed(job_id, "MemoryError" if "memory" in why else "RemoteError", f"the job {why}")
                    self._restart(why)
                    return
        finally:
            self.current = None

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
