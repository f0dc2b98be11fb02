"""Job state: what routers ask about jobs and what worker supervisors report to.

    hub = JobHub(settings, JobStore(db), JobQueue(["tiny"], 256), Metrics())
    hub.submit(job_id, key_id, "tiny", request_dict)   # queued
    hub.running(job_id); hub.log(job_id, "hi\n"); hub.done(job_id, values, tensors)
    hub.events_since(job_id, 0)                         # [("status", {...}), ("log", {...}), ...]
    hub.sweep()                                         # drop jobs finished more than result_ttl ago

Events live in memory for streaming; status, printed text and the result path live in
the ``JobStore`` and a results folder. Everything of a finished job (events, database
row, result file) is dropped ``settings.result_ttl`` seconds after it finished, so the
server's memory and disk stay flat however many jobs it runs.
"""

from __future__ import annotations

import collections
import json
import os
import sys
import threading
import time
from pathlib import Path

from ..remote.schema import ErrorInfo
from ..remote.serialize import tensor_bytes


class JobHub:
    def __init__(self, settings, jobs, queue, metrics, clock=time.monotonic):
        self.settings = settings
        self.jobs = jobs
        self.queue = queue
        self.metrics = metrics
        self.clock = clock
        self.lock = threading.Lock()
        self.requests = {}  # job id -> request dict, until a worker takes it
        self.events = {}  # job id -> list of (kind, dict)
        self.active = collections.Counter()  # key id -> queued or running jobs
        self.owner = {}  # job id -> key id (active jobs)
        self.cancels = set()
        self.running_jobs = set()
        self.started = {}  # job id -> clock when it started running
        self.queued_at = {}  # job id -> clock when it was queued
        self.finished = collections.OrderedDict()  # job id -> clock when it finished (oldest first)
        self.listeners = {}  # job id -> set of callables woken on each event
        self.results_dir = Path(settings.data_dir) / "results"
        self.results_dir.mkdir(parents=True, exist_ok=True)

    # -- events --------------------------------------------------------------

    def _event(self, job_id, kind, **data):
        with self.lock:
            self.events.setdefault(job_id, []).append((kind, data))
            listeners = list(self.listeners.get(job_id, ()))
        for wake in listeners:
            wake()

    def listen(self, job_id, wake):
        """Call ``wake()`` (from any thread) on each new event of ``job_id``; returns a function that stops it."""
        with self.lock:
            self.listeners.setdefault(job_id, set()).add(wake)

        def stop():
            with self.lock:
                waiting = self.listeners.get(job_id)
                if waiting is not None:
                    waiting.discard(wake)
                    if not waiting:
                        del self.listeners[job_id]

        return stop

    def events_since(self, job_id, index):
        with self.lock:
            return self.events.get(job_id, [])[index:]

    # -- the job's life ------------------------------------------------------

    def submit(self, job_id, key_id, model, request) -> int:
        self.sweep()
        self.jobs.create(job_id, key_id, model)
        self._event(job_id, "status", status="received")
        with self.lock:
            self.requests[job_id] = request
            self.active[key_id] += 1
            self.owner[job_id] = key_id
            self.queued_at[job_id] = self.clock()
        try:
            position = self.queue.put(model, job_id, key_id)
        except OverflowError:
            self._finish(job_id, "error", {"type": "RemoteError", "message": "the server's queue is full; try again later", "traceback": []})
            raise
        self.jobs.update(job_id, status="queued")
        self._event(job_id, "status", status="queued", position=position)
        self.metrics.inc("nnsight_jobs_submitted_total")
        return position

    def key_of(self, job_id):
        with self.lock:
            return self.owner.get(job_id)

    def take_request(self, job_id):
        with self.lock:
            request = self.requests.pop(job_id, None)
            queued = self.queued_at.pop(job_id, None)
        if request is not None and queued is not None:
            self.metrics.observe("nnsight_queue_wait_seconds", self.clock() - queued)
        return request

    def running(self, job_id):
        self.jobs.update(job_id, status="running")
        with self.lock:
            self.running_jobs.add(job_id)
            self.started[job_id] = self.clock()
        self._event(job_id, "status", status="running")

    def log(self, job_id, text):
        self.jobs.update(job_id, stdout_append=text)
        self._event(job_id, "log", text=text)

    def done(self, job_id, values, tensors):
        if not isinstance(values, dict) or not (tensors is None or isinstance(tensors, str)):
            return self.failed(job_id, "RemoteError", "the model worker sent a malformed result")
        if tensor_bytes(tensors) > self.settings.max_result_bytes:
            return self.failed(job_id, "RemoteError",
                               f"the saved values are over the server's limit of {self.settings.max_result_bytes} bytes")
        started = time.perf_counter()
        path = self.results_dir / f"{job_id}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"id": job_id, "values": values, "tensors": tensors}))
        os.replace(tmp, path)
        self.metrics.observe("nnsight_result_store_seconds", time.perf_counter() - started)
        self.jobs.update(job_id, result_path=path)
        self._finish(job_id, "completed", None)

    def error(self, job_id, error):
        try:
            info = ErrorInfo.model_validate(error).model_dump()
        except ValueError:  # pydantic's ValidationError: the worker's report is not an ErrorInfo
            info = {"type": "RemoteError", "message": "the job failed (malformed error report)", "traceback": []}
        self._finish(job_id, "error", info)

    def failed(self, job_id, type_name, message):
        self._finish(job_id, "error", {"type": type_name, "message": message, "traceback": []})

    def cancelled(self, job_id):
        self._finish(job_id, "cancelled", None)

    def _finish(self, job_id, status, error):
        self.jobs.update(job_id, status=status, error=error)
        with self.lock:
            key_id = self.owner.pop(job_id, None)
            if key_id is not None:
                self.active[key_id] -= 1
                if not self.active[key_id]:
                    del self.active[key_id]
            self.requests.pop(job_id, None)
            self.queued_at.pop(job_id, None)
            self.running_jobs.discard(job_id)
            self.cancels.discard(job_id)
            started = self.started.pop(job_id, None)
            self.finished[job_id] = self.clock()
        if started is not None:
            self.metrics.observe("nnsight_job_duration_seconds", self.clock() - started)
        self.metrics.inc("nnsight_jobs_finished_total", status=status)
        self._event(job_id, "status", status=status, error=error)

    def cancel(self, job_id) -> str:
        if self.queue.remove(job_id):
            self.cancelled(job_id)
            return "cancelled"
        with self.lock:
            if job_id in self.running_jobs or job_id in self.requests:
                self.cancels.add(job_id)
                return "cancelling"
        return "finished"

    def cancel_requested(self, job_id):
        with self.lock:
            return job_id in self.cancels

    def active_for(self, key_id):
        with self.lock:
            return self.active.get(key_id, 0)

    # -- retention -------------------------------------------------------------

    def sweep(self, now=None) -> int:
        """Drop every job that finished more than ``result_ttl`` seconds ago; returns how many."""
        now = self.clock() if now is None else now
        expired = []
        with self.lock:
            while self.finished:
                job_id, when = next(iter(self.finished.items()))
                if now - when < self.settings.result_ttl:
                    break
                self.finished.popitem(last=False)
                self.events.pop(job_id, None)
                expired.append(job_id)
        for job_id in expired:
            try:
                (self.results_dir / f"{job_id}.json").unlink()
            except FileNotFoundError:
                pass
        if expired:
            self.jobs.delete(expired)
            self.metrics.inc("nnsight_jobs_expired_total", len(expired))
        return len(expired)

    def adopt_finished(self, finished, wall_now):
        """Retention for jobs a previous server process finished: ``finished`` is ``[(id, wall time)]``, oldest first."""
        now = self.clock()
        with self.lock:
            for job_id, when in finished:
                self.finished[job_id] = now - max(0.0, wall_now - when)
        self.sweep()

    def sizes(self) -> dict:
        """How many entries each in-memory table holds (for tests and /metrics)."""
        with self.lock:
            return {"events": len(self.events), "requests": len(self.requests), "finished": len(self.finished),
                    "owners": len(self.owner), "active_keys": len(self.active), "listeners": len(self.listeners)}

    # -- worker reports --------------------------------------------------------

    def worker_restarted(self, name, why):
        self.metrics.inc("nnsight_worker_restarts_total", model=name)
        print(f"nnsight serve: restarted the worker for {name} ({why})", file=sys.stderr, flush=True)

    def worker_failed(self, name, why):
        self.metrics.inc("nnsight_worker_start_failures_total", model=name)
        print(f"nnsight serve: the worker for {name} failed to start: {why}", file=sys.stderr, flush=True)
