"""API keys as a FastAPI dependency, and the per-key submission rate limit.

    @router.get("/v1/jobs/{job_id}")
    def job_status(job_id: str, key_id: str = Depends(api_key)): ...

``api_key`` reads ``X-API-Key`` (or ``Authorization: Bearer KEY``), checks it against
the ``KeyStore`` in ``app.state.keys`` and gives the route the key's id, or answers 401.
"""

from __future__ import annotations

import collections
import threading
import time

from fastapi import Header, HTTPException, Request


def api_key(request: Request, x_api_key: str | None = Header(default=None),
            authorization: str | None = Header(default=None)) -> str:
    key = x_api_key
    if key is None and authorization and authorization.lower().startswith("bearer "):
        key = authorization[7:].strip()
    key_id = request.app.state.keys.authenticate(key)
    if key_id is None:
        raise HTTPException(401, "invalid or missing API key (send it in the X-API-Key header)")
    return key_id


class RateLimiter:
    """At most ``per_minute`` hits per key in any 60 s window; keys without recent hits take no memory."""

    def __init__(self, per_minute, clock=time.monotonic):
        self.per_minute = per_minute
        self.clock = clock
        self.hits = {}
        self.lock = threading.Lock()

    def allow(self, key_id) -> bool:
        now = self.clock()
        with self.lock:
            for key in [k for k, hits in self.hits.items() if not hits or now - hits[-1] > 60]:
                del self.hits[key]  # idle keys are forgotten, so the table stays small
            hits = self.hits.setdefault(key_id, collections.deque())
            while hits and now - hits[0] > 60:
                hits.popleft()
            if len(hits) >= self.per_minute:
                return False
            hits.append(now)
            return True
