"""Everything one running server holds, handed to routes as a dependency.

    @router.get("/health")
    def health(state: ServerState = Depends(server_state)): ...

``create_app`` builds one ``ServerState`` and stores it in ``app.state.server``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import Request


@dataclass
class ServerState:
    settings: object
    keys: object  # KeyStore
    jobs: object  # JobStore
    queue: object  # JobQueue
    hub: object  # JobHub
    metrics: object  # Metrics
    limiter: object  # RateLimiter
    workers: dict  # model name -> WorkerSupervisor
    started: float
    isolation: dict = field(default_factory=dict)  # defence-in-depth layers the workers run with


def server_state(request: Request) -> ServerState:
    return request.app.state.server
