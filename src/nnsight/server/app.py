"""The HTTP server, assembled: stores, queue, job hub, worker supervisors, routers and middleware.

    app = create_app(Settings(models=["smollm2-135m"], data_dir="/srv/nnsight"))
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes live in ``routers/`` (jobs, models, service); API keys are the ``auth.api_key``
dependency; job state is ``hub.JobHub``; each served model has a ``supervisor.WorkerSupervisor``
that runs its jobs in a worker process (``worker_process``). OpenAPI at /openapi.json.

create_app options:
    settings        a ``Settings`` (see settings.py)
    start_workers   start the worker processes with the app (False: routes only, for tests)
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from ..remote.versions import version_middleware
from .auth import RateLimiter
from .hub import JobHub
from .metrics import Metrics
from .middleware import BodyLimit
from .models import parse_spec
from .queue import JobQueue
from .routers import jobs as jobs_router
from .routers import models as models_router
from .routers import service as service_router
from .settings import Settings, default_data_dir  # noqa: F401 (the public names of the server's settings)
from .state import ServerState
from .store import JobStore, KeyStore
from .supervisor import MemoryBudget, WorkerSupervisor


def create_app(settings: Settings, start_workers: bool = True) -> FastAPI:
    data_dir = Path(settings.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    keys = KeyStore(data_dir / "nnsight.db")
    jobs = JobStore(data_dir / "nnsight.db")
    jobs.fail_unfinished()
    specs = [parse_spec(spec) for spec in settings.models]
    names = [name for name, _ in specs]
    if len(set(names)) != len(names):
        raise ValueError("two served models have the same name")
    job_queue = JobQueue(names, settings.max_queue)
    metrics = Metrics()
    hub = JobHub(settings, jobs, job_queue, metrics)
    hub.adopt_finished(jobs.finished_jobs(), time.time())
    budget = MemoryBudget(int(settings.memory_budget_gb * (1 << 30))) if settings.memory_budget_gb > 0 else None
    unknown = set(settings.replicas) - set(names)
    if unknown:
        raise ValueError(f"--replicas names models that are not served: {', '.join(sorted(unknown))}")
    if settings.ray is not None:
        from .replicas import RaySupervisor, connect

        connect(settings.ray, settings.ray_cpus)
        workers = {name: RaySupervisor(name, spec, settings, job_queue, hub, settings.replicas.get(name, 1),
                                       settings.replica_gpus, settings.replica_memory_gb) for name, spec in specs}
    else:
        workers = {name: WorkerSupervisor(name, spec, settings, job_queue, hub, budget=budget) for name, spec in specs}
    if budget is not None:
        budget.supervisors.extend(workers.values())
    state = ServerState(settings=settings, keys=keys, jobs=jobs, queue=job_queue, hub=hub, metrics=metrics,
                        limiter=RateLimiter(settings.rate_limit), workers=workers, started=time.time())
    for worker in workers.values():
        worker.on_isolation = state.isolation.update
    janitor_stop = threading.Event()

    def janitor():
        # Retention is also swept on every submit; this covers an idle server.
        while not janitor_stop.wait(min(60.0, max(0.5, settings.result_ttl / 4))):
            hub.sweep()

    async def lifespan(app):
        threading.Thread(target=janitor, name="nnsight-janitor", daemon=True).start()
        if start_workers:
            for worker in workers.values():
                worker.start()
        yield
        janitor_stop.set()
        job_queue.close()
        for worker in workers.values():
            worker.stop()

    app = FastAPI(
        title="nnsight remote execution",
        version="1",
        description="Run nnsight trace, generate and session blocks on models served here. "
        "Job endpoints need an API key in the `X-API-Key` header (or `Authorization: Bearer`).",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.server = state
    app.state.keys = keys  # what auth.api_key checks against

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, exc):
        # The default handler echoes the input back (and fails on binary bodies); name the problem only.
        problems = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", ""))[:500], "type": str(e.get("type", ""))}
                    for e in exc.errors()[:20]]
        return JSONResponse(status_code=422, content={"detail": problems})

    app.include_router(jobs_router.router)
    app.include_router(models_router.router)
    app.include_router(service_router.router)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.middleware("http")(version_middleware)  # protocol and library versions on every request
    return app
