"""The service's own endpoints: ``GET /health``, ``GET /metrics`` (Prometheus text), ``GET /`` (status page).

    GET /health    ServerHealth: ok/degraded, each model's state, queue length, uptime, the workers' isolation layers
    GET /metrics   queue depth, running jobs, batch sizes, queue wait, sandbox-check time, job durations, counters
    GET /v1/env    ServerEnv: the server's Python version and installed packages (``nnsight.compare()``)
    GET /          a small HTML page (no job contents)
"""

from __future__ import annotations

import html
import time

from fastapi import APIRouter, Depends
from fastapi.responses import HTMLResponse, PlainTextResponse
from pydantic import BaseModel, Field

from ...remote.schema import Health
from ..auth import api_key
from ..state import ServerState, server_state

router = APIRouter(tags=["service"])


class ServerHealth(Health):
    isolation: dict[str, str] = Field(
        default_factory=dict,
        description="defence-in-depth layers of the worker processes: layer -> 'active' or why it is not",
    )
    co_batch: str = Field(default="any", description="co-batching mode (any, per-key, off)")


@router.get("/health", response_model=ServerHealth)
def health(state: ServerState = Depends(server_state)):
    states = {name: w.state for name, w in state.workers.items()}
    ok = all(s in ("ready", "cold") for s in states.values())
    return ServerHealth(status="ok" if ok else "degraded", models=states, queue=len(state.queue),
                        uptime_s=time.time() - state.started, isolation=state.isolation,
                        co_batch=state.settings.co_batch)


class ServerEnv(BaseModel):
    python_version: str = Field(description="sys.version of the server")
    packages: dict[str, str] = Field(description="import name -> installed version (the server's own modules left out)")


@router.get("/v1/env", response_model=ServerEnv)
def environment(key_id: str = Depends(api_key)):
    from ...ndif import get_local_env

    env = get_local_env()
    return ServerEnv(python_version=env["python_version"],
                     packages={name: v for name, v in env["packages"].items() if v != "local"})


@router.get("/metrics", response_class=PlainTextResponse)
def prometheus(state: ServerState = Depends(server_state)):
    state.hub.sweep()
    sizes = state.hub.sizes()
    gauges = [
        *(("nnsight_queue_depth", {"model": n}, state.queue.depth(n)) for n in state.workers),
        ("nnsight_jobs_running", {}, len(state.hub.running_jobs)),
        *(("nnsight_worker_up", {"model": n}, int(w.state == "ready")) for n, w in state.workers.items()),
        ("nnsight_uptime_seconds", {}, round(time.time() - state.started, 1)),
        ("nnsight_jobs_retained", {}, sizes["finished"]),
        ("nnsight_max_batch", {}, state.settings.max_batch),
        ("nnsight_batch_wait_seconds", {}, state.settings.batch_wait_ms / 1000),
    ]
    return state.metrics.render(gauges)


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def status_page(state: ServerState = Depends(server_state)):
    rows = "".join(
        f"<tr><td>{html.escape(n)}</td><td>{html.escape(w.state)}</td><td>{state.queue.depth(n)}</td>"
        f"<td>{len(w.current)}</td><td>{w.restarts}</td></tr>"
        for n, w in state.workers.items()
    )
    up = time.time() - state.started
    layers = ", ".join(f"{html.escape(k)}: {html.escape(v)}" for k, v in state.isolation.items()) or "none reported yet"
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>nnsight server</title>"
        "<style>body{font-family:sans-serif;margin:2em}td,th{padding:4px 12px;text-align:left}</style></head><body>"
        "<h1>nnsight server</h1>"
        f"<p>Up for {int(up // 3600)} h {int(up % 3600 // 60)} min. Queued jobs: {len(state.queue)}. "
        f"Running jobs: {len(state.hub.running_jobs)}. Co-batching: {html.escape(state.settings.co_batch)} "
        f"(up to {state.settings.max_batch} requests).</p>"
        "<table><tr><th>model</th><th>status</th><th>queued</th><th>running</th><th>restarts</th></tr>"
        f"{rows}</table><p>Worker isolation: {layers}</p>"
        "<p>API description: <a href='/openapi.json'>/openapi.json</a></p></body></html>"
    )
