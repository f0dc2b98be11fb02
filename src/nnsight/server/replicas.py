"""Replicas on Ray: each served model's worker processes run inside Ray actors spread over a cluster.

    nnsight serve tiny=/models/tiny --ray                      # a local Ray instance on this host
    nnsight serve tiny=/models/tiny --ray 10.0.0.5:6379 --replicas tiny=4 --replica-gpus 1

``RaySupervisor`` has the interface of ``supervisor.WorkerSupervisor`` (start, stop, state,
info, current, restarts, wanted, busy): it takes jobs for its model from the server's queue
(queued fairly across API keys, gathered for co-batching as without Ray) and hands each batch
to a free ``ModelReplica`` actor. An actor runs a ``WorkerSupervisor`` of its own, so the worker
process, its sandbox, isolation layers, time limits and integrity checks are the same as
without Ray; the actor returns what happened to each job (running, printed text, result or
error) and the server applies it to its job hub. A replica that dies is replaced; the jobs it
was running are reported failed (they may have started, so they are not run again), jobs still
queued are not affected. Without ``--ray`` nothing here is imported.

Requests reach replicas as the server's own validated dicts; Ray's transport between the server
and its actors is trusted (user payloads are never unpickled: they are JSON, checked on arrival).
Printed text arrives with the job's end in Ray mode, not streamed while it runs. Cancelling a
running job stops its replica once every job of its batch is cancelled, and starts a new one.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time

from .metrics import Metrics
from .queue import JobQueue
from .supervisor import WorkerSupervisor, gather_batch


class _Recorder:
    """The job-hub interface a replica's supervisor reports to: it records, the server applies."""

    def __init__(self):
        self.metrics = Metrics()
        self.requests = {}
        self.events = []

    def take_request(self, job_id):
        return self.requests.pop(job_id, None)

    def key_of(self, job_id):
        return None

    def cancel_requested(self, job_id):
        return False

    def running(self, job_id):
        self.events.append(("running", job_id))

    def log(self, job_id, text):
        self.events.append(("log", job_id, text))

    def done(self, job_id, values, tensors):
        self.events.append(("done", job_id, values, tensors))

    def error(self, job_id, error):
        self.events.append(("error", job_id, error))

    def failed(self, job_id, type_name, message):
        self.events.append(("failed", job_id, type_name, message))

    def cancelled(self, job_id):
        self.events.append(("cancelled", job_id))

    def worker_restarted(self, name, why):
        self.events.append(("restarted", None, why))

    def worker_failed(self, name, why):
        self.events.append(("restarted", None, why))


class ModelReplica:
    """One replica of one model (a Ray actor; see ``actor_class``)."""

    def __init__(self, name, spec, settings):
        from .settings import Settings

        self.recorder = _Recorder()
        self.supervisor = WorkerSupervisor(name, spec, Settings(**settings), JobQueue([name], 1), self.recorder)
        self.isolation = {}
        self.supervisor.on_isolation = self.isolation.update
        self.supervisor.spawn()

    def ping(self) -> bool:
        return True

    def describe(self) -> dict:
        return {"info": self.supervisor.info, "weight_bytes": self.supervisor.weight_bytes,
                "isolation": dict(self.isolation), "pid": os.getpid()}

    def run_batch(self, jobs) -> list:
        """Run ``jobs`` ([{"id", "request"}]); returns the events of every job, in order."""
        supervisor = self.supervisor
        if supervisor.proc is None or supervisor.proc.poll() is not None or supervisor.state != "ready":
            supervisor.spawn()
        self.recorder.events = []
        self.recorder.requests = {job["id"]: job["request"] for job in jobs}
        supervisor.run_batch([job["id"] for job in jobs])
        return self.recorder.events


def actor_class(num_gpus=0.0, memory_gb=0.0):
    import ray

    options = {"num_cpus": 1, "max_restarts": 0, "scheduling_strategy": "SPREAD"}
    if num_gpus:
        options["num_gpus"] = num_gpus
    if memory_gb:
        options["memory"] = int(memory_gb * (1 << 30))
    return ray.remote(**options)(ModelReplica)


def connect(address="local", num_cpus=None):
    """Join the Ray cluster at ``address``, or (``"local"``) start an instance on 127.0.0.1 with the dashboard off."""
    import ray

    if ray.is_initialized():
        return
    if address and address != "local":
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)


class RaySupervisor:
    def __init__(self, name, spec, settings, job_queue, hub, replicas=1, num_gpus=0.0, memory_gb=0.0):
        self.name = name
        self.spec = spec
        self.settings = settings
        self.queue = job_queue
        self.hub = hub
        self.wanted_replicas = max(1, int(replicas))
        self.actor_cls = None
        self.num_gpus, self.memory_gb = num_gpus, memory_gb
        self.state = "starting"
        self.info = None
        self.weight_bytes = 0
        self.restarts = 0
        self.current = set()
        self.last_used = time.monotonic()
        self.on_isolation = None
        self.replicas = []  # actor handles, free or busy
        self.running = {}  # ObjectRef -> (actor, [job ids])
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name=f"nnsight-ray-{name}", daemon=True)

    def start(self):
        self.thread.start()

    def stop(self):
        import ray

        self._stop.set()
        for actor in self.replicas:
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001 - Ray raises several types for an actor already gone
                pass

    def wanted(self):
        self.last_used = time.monotonic()

    def busy(self):
        return bool(self.current) or self.queue.depth(self.name) > 0

    def unload(self):
        pass  # replicas stay loaded in Ray mode (no memory budget across a cluster yet)

    # -- replicas ---------------------------------------------------------------------

    def _new_replica(self):
        import ray

        if self.actor_cls is None:
            self.actor_cls = actor_class(self.num_gpus, self.memory_gb)
        settings = dataclasses.asdict(self.settings)
        settings["data_dir"] = str(settings["data_dir"])
        actor = self.actor_cls.remote(self.name, self.spec, settings)
        described = ray.get(actor.describe.remote(), timeout=600)
        self.info = described["info"]
        self.weight_bytes = described["weight_bytes"]
        if self.on_isolation is not None:
            self.on_isolation(described["isolation"])
        self.replicas.append(actor)
        return actor

    def _free(self):
        busy = {id(actor) for actor, _ in self.running.values()}
        return [actor for actor in self.replicas if id(actor) not in busy]

    # -- the dispatch loop ----------------------------------------------------------------

    def _loop(self):
        import ray

        while len(self.replicas) < self.wanted_replicas and not self._stop.is_set():
            try:
                self._new_replica()
            except Exception as error:  # noqa: BLE001 - reported, then the loop retries
                self.state = "failed"
                self.hub.worker_failed(self.name, str(error))
                if self._stop.wait(5):
                    return
        self.state = "ready"
        last_try = time.monotonic()
        while not self._stop.is_set():
            if len(self.replicas) < self.wanted_replicas and time.monotonic() - last_try > 5:
                last_try = time.monotonic()  # a replacement that failed to start: try again, every 5 s
                try:
                    self._new_replica()
                except Exception as error:  # noqa: BLE001 - reported; tried again
                    self.hub.worker_failed(self.name, str(error))
            free = self._free()
            if free:
                job_id = self.queue.get(self.name, timeout=0.05 if self.running else 0.5)
                if job_id is not None:
                    actor = self._alive(free)
                    if actor is None:  # every free replica had died: the job waits for a replacement
                        self._requeue(job_id)
                    else:
                        self._dispatch(actor, gather_batch(self.queue, self.hub, self.settings, self.name, job_id))
            if self.running:
                done, _ = ray.wait(list(self.running), num_returns=1, timeout=0 if free else 0.2)
                for ref in done:
                    self._collect(ref)
                self._cancel_running()

    def _alive(self, free):
        """The first of ``free`` that answers; dead ones are replaced (a job is never sent to a dead replica)."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        for actor in free:
            try:
                ray.get(actor.ping.remote(), timeout=30)
                return actor
            except (RayActorError, GetTimeoutError) as error:
                self._replace(actor, f"replica died ({type(error).__name__})")
        return None

    def _requeue(self, job_id):
        key = self.hub.key_of(job_id) or ""
        self.queue.put(self.name, job_id, key)

    def _replace(self, actor, why):
        import ray

        if actor in self.replicas:
            self.replicas.remove(actor)
        try:
            ray.kill(actor)
        except Exception:  # noqa: BLE001 - Ray raises several types for an actor already gone
            pass
        self.restarts += 1
        self.hub.worker_restarted(self.name, why)
        try:
            self._new_replica()
        except Exception as failure:  # noqa: BLE001 - reported; the next dispatch round tries again
            self.hub.worker_failed(self.name, str(failure))

    def _dispatch(self, actor, job_ids):
        jobs = []
        for job_id in job_ids:
            request = self.hub.take_request(job_id)
            if request is not None:
                jobs.append({"id": job_id, "request": request})
        if not jobs:
            return
        self.hub.metrics.observe("nnsight_batch_size", len(jobs), model=self.name)
        ids = [job["id"] for job in jobs]
        self.current.update(ids)
        for job_id in ids:
            self.hub.running(job_id)
        self.running[actor.run_batch.remote(jobs)] = (actor, ids)

    def _cancel_running(self):
        """A running batch whose every job was cancelled: stop its replica (as without Ray) and replace it."""
        for ref, (actor, ids) in list(self.running.items()):
            if ids and all(self.hub.cancel_requested(job_id) for job_id in ids):
                del self.running[ref]
                for job_id in ids:
                    self.hub.cancelled(job_id)
                self.current.difference_update(ids)
                self._replace(actor, "cancelled while running")

    def _collect(self, ref):
        import ray
        from ray.exceptions import RayActorError

        actor, ids = self.running.pop(ref)
        try:
            events = ray.get(ref)
        except RayActorError as error:
            for job_id in ids:
                self.hub.failed(job_id, "RemoteError", "the replica running the job died; the job was not completed")
            self.current.difference_update(ids)
            self._replace(actor, f"replica died ({type(error).__name__})")
            return
        for event in events:
            kind, job_id = event[0], event[1]
            if kind == "log":
                self.hub.log(job_id, event[2])
            elif kind == "done":
                self.hub.done(job_id, event[2], event[3])
            elif kind == "error":
                self.hub.error(job_id, event[2])
            elif kind == "failed":
                self.hub.failed(job_id, event[2], event[3])
            elif kind == "cancelled":
                self.hub.cancelled(job_id)
            elif kind == "restarted":
                self.restarts += 1
                self.hub.worker_restarted(self.name, event[2])
        self.current.difference_update(ids)
        self.last_used = time.monotonic()
