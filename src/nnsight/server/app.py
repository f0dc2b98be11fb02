"""The HTTP server: FastAPI app, job hub, authentication, limits, metrics and status page.

    app = create_app(Settings(models=["smollm2-135m"], data_dir="/srv/nnsight"))
    uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints (OpenAPI at /openapi.json):
    POST   /v1/jobs                  submit a JobRequest (API key)      -> 202 JobStatus
    GET    /v1/jobs/{id}             status, printed text, error (API key)
    GET    /v1/jobs/{id}/events      the same as server-sent events until the job ends (API key)
    GET    /v1/jobs/{id}/result      saved values (API key)
    DELETE /v1/jobs/{id}             cancel (API key)
    GET    /v1/models                served models with their configs
    GET    /v1/models/{name}         one model
    GET    /v1/models/{name}/tokenizer   its tokenizer files
    GET    /health, GET /metrics (Prometheus text), GET / (status page)
"""

from __future__ import annotations

import asyncio
import collections
import html
import json
import os
import secrets
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse

from ..remote.schema import (
    TERMINAL, ApiError, ErrorInfo, Health, JobRequest, JobResult, JobStatus, ModelInfo, TokenizerFiles,
)
from ..remote.serialize import tensor_bytes
from .models import parse_spec
from .queue import JobQueue
from .store import JobStore, KeyStore
from .workers import ModelWorker


def default_data_dir() -> Path:
    return Path(os.environ.get("NNSIGHT_SERVER_DIR") or Path.home() / ".local" / "share" / "nnsight-server")


@dataclass
class Settings:
    models: list = field(default_factory=list)
    data_dir: Path = field(default_factory=default_data_dir)
    job_timeout: float = 60.0  # seconds of run time per job
    memory_mb: int = 0  # address-space limit of a worker process (0: none)
    max_body_bytes: int = 32 << 20  # a request body
    max_tensor_bytes: int = 16 << 20  # the tensors of one request
    max_result_bytes: int = 64 << 20  # the saved values of one job
    max_print: int = 65536  # characters of print output per job
    rate_limit: int = 120  # job submissions per key per minute
    max_concurrent: int = 4  # queued + running jobs per key
    max_queue: int = 256
    threads: int = 1  # torch threads per worker
    weights_every: int = 1  # check the weights' checksum every N jobs (0: never)
    result_ttl: float = 24 * 3600.0  # seconds a result is kept

    def limits(self) -> dict:
        return {
            "job_timeout": self.job_timeout, "memory_mb": self.memory_mb, "max_tensor_bytes": self.max_tensor_bytes,
            "max_result_bytes": self.max_result_bytes, "max_print": self.max_print, "threads": self.threads,
            "weights_every": self.weights_every,
        }


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.counters = collections.Counter()
        self.duration_sum = 0.0
        self.duration_count = 0

    def inc(self, name, **labels):
        with self.lock:
            self.counters[(name, tuple(sorted(labels.items())))] += 1

    def observe(self, seconds):
        with self.lock:
            self.duration_sum += seconds
            self.duration_count += 1


class JobHub:
    """Job state in memory (events for streaming) and in the JobStore; what workers report to."""

    def __init__(self, settings: Settings, jobs: JobStore, queue: JobQueue, metrics: Metrics):
        self.settings = settings
        self.jobs = jobs
        self.queue = queue
        self.metrics = metrics
        self.lock = threading.Lock()
        self.requests = {}  # job id -> request dict, until a worker takes it
        self.events = {}  # job id -> list of (kind, dict)
        self.active = collections.Counter()  # key id -> queued or running jobs
        self.owner = {}  # job id -> key id (active jobs)
        self.cancels = set()
        self.running_jobs = set()
        self.started = {}
        self.results_dir = Path(settings.data_dir) / "results"
        self.results_dir.mkdir(parents=True, exist_ok=True)

    def _event(self, job_id, kind, **data):
        with self.lock:
            log = self.events.setdefault(job_id, [])
            log.append((kind, data))

    def submit(self, job_id, key_id, model, request) -> int:
        self.jobs.create(job_id, key_id, model)
        self._event(job_id, "status", status="received")
        with self.lock:
            self.requests[job_id] = request
            self.active[key_id] += 1
            self.owner[job_id] = key_id
        try:
            position = self.queue.put(model, job_id)
        except OverflowError:
            self._finish(job_id, "error", {"type": "RemoteError", "message": "the server's queue is full; try again later", "traceback": []})
            raise
        self.jobs.update(job_id, status="queued")
        self._event(job_id, "status", status="queued", position=position)
        self.metrics.inc("nnsight_jobs_submitted_total")
        return position

    def take_request(self, job_id):
        with self.lock:
            request = self.requests.pop(job_id, None)
        return request

    def running(self, job_id):
        self.jobs.update(job_id, status="running")
        with self.lock:
            self.running_jobs.add(job_id)
            self.started[job_id] = time.monotonic()
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
        path = self.results_dir / f"{job_id}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"id": job_id, "values": values, "tensors": tensors}))
        os.replace(tmp, path)
        self.jobs.update(job_id, result_path=path)
        self._finish(job_id, "completed", None)

    def error(self, job_id, error):
        try:
            info = ErrorInfo.model_validate(error).model_dump()
        except Exception:
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
            self.requests.pop(job_id, None)
            self.running_jobs.discard(job_id)
            self.cancels.discard(job_id)
            started = self.started.pop(job_id, None)
        if started is not None:
            self.metrics.observe(time.monotonic() - started)
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

    def worker_restarted(self, name, why):
        self.metrics.inc("nnsight_worker_restarts_total", model=name)
        print(f"nnsight serve: restarted the worker for {name} ({why})", file=sys.stderr, flush=True)

    def worker_failed(self, name, why):
        self.metrics.inc("nnsight_worker_start_failures_total", model=name)
        print(f"nnsight serve: the worker for {name} failed to start: {why}", file=sys.stderr, flush=True)

    def events_since(self, job_id, index):
        with self.lock:
            log = self.events.get(job_id, [])
            return log[index:]

    def active_for(self, key_id):
        with self.lock:
            return self.active[key_id]


class RateLimiter:
    def __init__(self, per_minute):
        self.per_minute = per_minute
        self.hits = collections.defaultdict(collections.deque)
        self.lock = threading.Lock()

    def allow(self, key_id) -> bool:
        now = time.monotonic()
        with self.lock:
            hits = self.hits[key_id]
            while hits and now - hits[0] > 60:
                hits.popleft()
            if len(hits) >= self.per_minute:
                return False
            hits.append(now)
            return True


class BodyLimit:
    """ASGI middleware: refuse request bodies over ``limit`` bytes (413), counted as they arrive."""

    def __init__(self, app, limit):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.limit
                except ValueError:
                    too_big = True
                if too_big:
                    return await _too_large(send, self.limit)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await _too_large(send, self.limit)


class _TooLarge(Exception):
    pass


async def _too_large(send, limit):
    body = json.dumps({"detail": f"request body over the server's limit of {limit} bytes"}).encode()
    await send({"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


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
    limiter = RateLimiter(settings.rate_limit)
    workers = {name: ModelWorker(name, spec, settings.limits(), job_queue, hub) for name, spec in specs}
    started = time.time()

    async def lifespan(app):
        if start_workers:
            for worker in workers.values():
                worker.start()
        yield
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
    from fastapi.exceptions import RequestValidationError

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, exc):
        # The default handler echoes the input back (and fails on binary bodies); name the problem only.
        problems = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", ""))[:500], "type": str(e.get("type", ""))}
                    for e in exc.errors()[:20]]
        return JSONResponse(status_code=422, content={"detail": problems})

    app.state.settings = settings
    app.state.hub = hub
    app.state.workers = workers
    app.state.keys = keys

    def api_key(x_api_key: str | None = Header(default=None), authorization: str | None = Header(default=None)) -> str:
        key = x_api_key
        if key is None and authorization and authorization.lower().startswith("bearer "):
            key = authorization[7:].strip()
        key_id = keys.authenticate(key)
        if key_id is None:
            raise HTTPException(401, "invalid or missing API key (send it in the X-API-Key header)")
        return key_id

    def own_job(job_id: str, key_id: str) -> dict:
        job = jobs.get(job_id) if len(job_id) <= 64 else None
        if job is None or not secrets.compare_digest(job["key_id"], key_id):
            raise HTTPException(404, "no such job")  # the same answer for another key's job
        return job

    def status_of(job) -> JobStatus:
        return JobStatus(
            id=job["id"], model=job["model"], status=job["status"], position=job_queue.position(job["id"]),
            created=job["created"], updated=job["updated"], error=job["error"], stdout=job["stdout"],
        )

    errors = {401: {"model": ApiError}, 404: {"model": ApiError}, 413: {"model": ApiError}, 429: {"model": ApiError}}

    @app.post("/v1/jobs", status_code=202, response_model=JobStatus, responses={**errors, 400: {"model": ApiError}, 503: {"model": ApiError}})
    def submit(request: JobRequest, key_id: str = Depends(api_key)):
        """Submit one block. Static checks run now: code the sandbox refuses is answered with 400 at once."""
        if request.model not in workers:
            raise HTTPException(404, f"model {request.model!r} is not served here; served: {', '.join(workers)}")
        if tensor_bytes(request.tensors) > settings.max_tensor_bytes:
            raise HTTPException(413, f"tensors over the server's limit of {settings.max_tensor_bytes} bytes")
        try:
            _static_check(request)
        except Exception as error:  # SandboxError
            info = {"type": "SandboxError", "message": str(error), "traceback": []}
            return JSONResponse(status_code=400, content={"detail": str(error), "error": info})
        if not limiter.allow(key_id):
            raise HTTPException(429, f"rate limit: at most {settings.rate_limit} jobs per minute per key")
        if hub.active_for(key_id) >= settings.max_concurrent:
            raise HTTPException(429, f"at most {settings.max_concurrent} queued or running jobs per key")
        if workers[request.model].state == "failed":
            raise HTTPException(503, f"the worker for {request.model!r} is not running")
        job_id = secrets.token_hex(16)
        try:
            hub.submit(job_id, key_id, request.model, request.model_dump())
        except OverflowError:
            raise HTTPException(503, "the server's queue is full; try again later") from None
        return status_of(jobs.get(job_id))

    @app.get("/v1/jobs/{job_id}", response_model=JobStatus, responses=errors)
    def job_status(job_id: str, key_id: str = Depends(api_key)):
        return status_of(own_job(job_id, key_id))

    @app.get("/v1/jobs/{job_id}/events", responses={**errors, 200: {"content": {"text/event-stream": {}}}})
    async def job_events(job_id: str, key_id: str = Depends(api_key)):
        """Server-sent events: `status` (JobEvent with status/position/error) and `log` (printed text)."""
        job = await asyncio.to_thread(own_job, job_id, key_id)

        async def stream():
            index = 0
            last_position = None
            if job["status"] in TERMINAL and not hub.events_since(job_id, 0):
                yield _sse("status", {"status": job["status"], "error": job["error"]})
                return
            deadline = time.monotonic() + settings.job_timeout + 3600
            while time.monotonic() < deadline:
                new = hub.events_since(job_id, index)
                index += len(new)
                for kind, data in new:
                    yield _sse(kind, data)
                    if kind == "status" and data.get("status") in TERMINAL:
                        return
                position = job_queue.position(job_id)
                if position is not None and position != last_position:
                    last_position = position
                    yield _sse("status", {"status": "queued", "position": position})
                if not new:
                    await asyncio.sleep(0.05)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})

    @app.get("/v1/jobs/{job_id}/result", response_model=JobResult, responses={**errors, 409: {"model": ApiError}})
    def job_result(job_id: str, http_request: Request, key_id: str = Depends(api_key)):
        job = own_job(job_id, key_id)
        if job["status"] != "completed" or not job["result_path"]:
            raise HTTPException(409, f"the job is {job['status']}; results exist once it has completed")
        path = Path(job["result_path"])
        if path.parent != hub.results_dir or not path.is_file():
            raise HTTPException(404, "the result is no longer stored")
        from ..remote.compression import compress_body  # zstd when large and accepted

        body, extra = compress_body(path.read_bytes(), http_request.headers.get("accept-encoding"))
        return Response(body, media_type="application/json", headers=extra)

    @app.delete("/v1/jobs/{job_id}", response_model=JobStatus, responses=errors)
    def cancel(job_id: str, key_id: str = Depends(api_key)):
        own_job(job_id, key_id)
        hub.cancel(job_id)
        return status_of(jobs.get(job_id))

    def model_info(name):
        worker = workers.get(name)
        if worker is None:
            raise HTTPException(404, f"model {name!r} is not served here")
        if not worker.wait_ready(timeout=0) and worker.info is None:
            raise HTTPException(503, f"model {name!r} is still loading")
        return worker.info

    @app.get("/v1/models", response_model=list[ModelInfo])
    def list_models():
        return [ModelInfo(**{k: v for k, v in w.info.items() if k != "tokenizer"}) for w in workers.values() if w.info]

    @app.get("/v1/models/{name}", response_model=ModelInfo, responses={404: {"model": ApiError}, 503: {"model": ApiError}})
    def get_model(name: str):
        info = model_info(name)
        return ModelInfo(**{k: v for k, v in info.items() if k != "tokenizer"})

    @app.get("/v1/models/{name}/tokenizer", response_model=TokenizerFiles, responses={404: {"model": ApiError}, 503: {"model": ApiError}})
    def get_tokenizer(name: str):
        return TokenizerFiles(files=model_info(name).get("tokenizer", {}))

    @app.get("/health", response_model=Health)
    def health():
        states = {name: w.state for name, w in workers.items()}
        ok = all(s == "ready" for s in states.values())
        return Health(status="ok" if ok else "degraded", models=states, queue=len(job_queue), uptime_s=time.time() - started)

    @app.get("/metrics", response_class=PlainTextResponse)
    def prometheus():
        lines = [
            "# TYPE nnsight_queue_depth gauge",
            *(f'nnsight_queue_depth{{model="{n}"}} {job_queue.depth(n)}' for n in workers),
            "# TYPE nnsight_jobs_running gauge",
            f"nnsight_jobs_running {len(hub.running_jobs)}",
            "# TYPE nnsight_worker_up gauge",
            *(f'nnsight_worker_up{{model="{n}"}} {int(w.state == "ready")}' for n, w in workers.items()),
            "# TYPE nnsight_uptime_seconds gauge",
            f"nnsight_uptime_seconds {time.time() - started:.1f}",
            "# TYPE nnsight_job_duration_seconds summary",
            f"nnsight_job_duration_seconds_sum {metrics.duration_sum:.6f}",
            f"nnsight_job_duration_seconds_count {metrics.duration_count}",
        ]
        with metrics.lock:
            seen = set()
            for (name, labels), value in sorted(metrics.counters.items()):
                if name not in seen:
                    seen.add(name)
                    lines.append(f"# TYPE {name} counter")
                label = ",".join(f'{k}="{v}"' for k, v in labels)
                lines.append(f"{name}{{{label}}} {value}" if label else f"{name} {value}")
        return "\n".join(lines) + "\n"

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def status_page():
        rows = "".join(
            f"<tr><td>{html.escape(n)}</td><td>{html.escape(w.state)}</td><td>{job_queue.depth(n)}</td>"
            f"<td>{int(w.current is not None)}</td><td>{w.restarts}</td></tr>"
            for n, w in workers.items()
        )
        up = time.time() - started
        return (
            "<!doctype html><html><head><meta charset='utf-8'><title>nnsight server</title>"
            "<style>body{font-family:sans-serif;margin:2em}td,th{padding:4px 12px;text-align:left}</style></head><body>"
            "<h1>nnsight server</h1>"
            f"<p>Up for {int(up // 3600)} h {int(up % 3600 // 60)} min. Queued jobs: {len(job_queue)}. "
            f"Running jobs: {len(hub.running_jobs)}.</p>"
            "<table><tr><th>model</th><th>worker</th><th>queued</th><th>running</th><th>restarts</th></tr>"
            f"{rows}</table><p>API description: <a href='/openapi.json'>/openapi.json</a></p></body></html>"
        )

    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    from ..remote.versions import version_middleware

    app.middleware("http")(version_middleware)  # protocol check on every request (remote/versions.py)
    return app


def _sse(kind, data) -> str:
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n"


def _static_check(request: JobRequest):
    from ..sandbox.policy import check_source

    check_source("\n" * (request.body_lineno - 2) + "if True:\n" + request.source, request.filename)
    for fn in request.functions:
        check_source("\n" * (fn.lineno - 1) + fn.source, fn.filename)
