"""``/v1/jobs``: submit a block, follow it (status, server-sent events), fetch its result, cancel it.

    POST   /v1/jobs                  submit a JobRequest           -> 202 JobStatus
    GET    /v1/jobs/{id}             status, printed text, error
    GET    /v1/jobs/{id}/events      the same as server-sent events until the job ends
    GET    /v1/jobs/{id}/result      saved values
    DELETE /v1/jobs/{id}             cancel

Every route needs an API key; another key's job answers 404, as a job that does not exist.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from pathlib import Path

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ...remote.compression import compress_body
from ...remote.schema import TERMINAL, ApiError, JobRequest, JobResult, JobStatus
from ...remote.serialize import tensor_bytes
from ...sandbox.errors import SandboxError
from ..auth import api_key
from ..state import ServerState, server_state

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
ERRORS = {401: {"model": ApiError}, 404: {"model": ApiError}, 413: {"model": ApiError}, 429: {"model": ApiError}}


def own_job(state: ServerState, job_id: str, key_id: str) -> dict:
    job = state.jobs.get(job_id) if len(job_id) <= 64 else None
    if job is None or not secrets.compare_digest(job["key_id"], key_id):
        # The same answer for another key's job; finished jobs are kept for result_ttl seconds.
        raise HTTPException(404, f"no such job (finished jobs are kept for {state.settings.result_ttl:g} s)")
    return job


def status_of(state: ServerState, job) -> JobStatus:
    return JobStatus(
        id=job["id"], model=job["model"], status=job["status"], position=state.queue.position(job["id"]),
        created=job["created"], updated=job["updated"], error=job["error"], stdout=job["stdout"],
    )


def static_check(request: JobRequest):
    """The sandbox's source check of everything the request would run (raises SandboxError)."""
    from ...sandbox.policy import check_source

    check_source("\n" * (request.body_lineno - 2) + "if True:\n" + request.source, request.filename)
    for fn in request.functions:
        check_source("\n" * (fn.lineno - 1) + fn.source, fn.filename)


@router.post("", status_code=202, response_model=JobStatus,
             responses={**ERRORS, 400: {"model": ApiError}, 503: {"model": ApiError}})
def submit(request: JobRequest, key_id: str = Depends(api_key), state: ServerState = Depends(server_state)):
    """Submit one block. Static checks run now: code the sandbox refuses is answered with 400 at once."""
    settings, workers = state.settings, state.workers
    if request.model not in workers:
        raise HTTPException(404, f"model {request.model!r} is not served here; served: {', '.join(workers)}")
    if tensor_bytes(request.tensors) > settings.max_tensor_bytes:
        raise HTTPException(413, f"tensors over the server's limit of {settings.max_tensor_bytes} bytes")
    started = time.perf_counter()
    try:
        static_check(request)
    except SandboxError as error:
        info = {"type": "SandboxError", "message": str(error), "traceback": []}
        return JSONResponse(status_code=400, content={"detail": str(error), "error": info})
    finally:
        state.metrics.observe("nnsight_sandbox_check_seconds", time.perf_counter() - started)
    if not state.limiter.allow(key_id):
        raise HTTPException(429, f"rate limit: at most {settings.rate_limit} jobs per minute per key")
    if state.hub.active_for(key_id) >= settings.max_concurrent:
        raise HTTPException(429, f"at most {settings.max_concurrent} queued or running jobs per key")
    worker = workers[request.model]
    if worker.state == "failed":
        raise HTTPException(503, f"the worker for {request.model!r} is not running")
    job_id = secrets.token_hex(16)
    try:
        state.hub.submit(job_id, key_id, request.model, request.model_dump())
    except OverflowError:
        raise HTTPException(503, "the server's queue is full; try again later") from None
    worker.wanted()  # a lazily served model starts loading with its first request
    return status_of(state, state.jobs.get(job_id))


@router.get("/{job_id}", response_model=JobStatus, responses=ERRORS)
def job_status(job_id: str, key_id: str = Depends(api_key), state: ServerState = Depends(server_state)):
    return status_of(state, own_job(state, job_id, key_id))


@router.get("/{job_id}/events", responses={**ERRORS, 200: {"content": {"text/event-stream": {}}}})
async def job_events(job_id: str, key_id: str = Depends(api_key), state: ServerState = Depends(server_state)):
    """Server-sent events: `status` (JobEvent with status/position/error) and `log` (printed text)."""
    job = await asyncio.to_thread(own_job, state, job_id, key_id)
    hub, queue = state.hub, state.queue

    async def stream():
        if job["status"] in TERMINAL and not hub.events_since(job_id, 0):
            yield _sse("status", {"status": job["status"], "error": job["error"]})
            return
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        def wake_up():
            try:
                loop.call_soon_threadsafe(wake.set)
            except RuntimeError:  # the event loop has closed (server shutdown): nobody is listening
                pass

        stop_listening = hub.listen(job_id, wake_up)
        try:
            index = 0
            last_position = None
            last_model_state = None
            deadline = time.monotonic() + state.settings.job_timeout + 3600
            while time.monotonic() < deadline:
                wake.clear()
                new = hub.events_since(job_id, index)
                index += len(new)
                for kind, data in new:
                    yield _sse(kind, data)
                    if kind == "status" and data.get("status") in TERMINAL:
                        return
                position = queue.position(job_id)
                if position is not None and position != last_position:
                    last_position = position
                    yield _sse("status", {"status": "queued", "position": position})
                worker = state.workers.get(job["model"])
                model_state = worker.state if worker is not None and position is not None else None
                if model_state in ("cold", "loading") and model_state != last_model_state:
                    last_model_state = model_state
                    yield _sse("status", {"status": "queued", "position": position, "text": f"model {model_state}"})
                if not new:
                    try:  # woken by the next event; the timeout only refreshes the queue position
                        await asyncio.wait_for(wake.wait(), 0.5)
                    except asyncio.TimeoutError:
                        pass
        finally:
            stop_listening()

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})


@router.get("/{job_id}/result", response_model=JobResult, responses={**ERRORS, 409: {"model": ApiError}})
def job_result(
    job_id: str, http_request: Request, key_id: str = Depends(api_key), state: ServerState = Depends(server_state)
):
    job = own_job(state, job_id, key_id)
    if job["status"] != "completed" or not job["result_path"]:
        raise HTTPException(409, f"the job is {job['status']}; results exist once it has completed")
    path = Path(job["result_path"])
    if path.parent != state.hub.results_dir or not path.is_file():
        raise HTTPException(404, "the result is no longer stored")
    body, extra = compress_body(path.read_bytes(), http_request.headers.get("accept-encoding"))  # zstd when large
    return Response(body, media_type="application/json", headers=extra)


@router.delete("/{job_id}", response_model=JobStatus, responses=ERRORS)
def cancel(job_id: str, key_id: str = Depends(api_key), state: ServerState = Depends(server_state)):
    own_job(state, job_id, key_id)
    state.hub.cancel(job_id)
    return status_of(state, state.jobs.get(job_id))


def _sse(kind, data) -> str:
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n"
