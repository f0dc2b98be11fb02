"""Protocol and library versions, checked on every request by both sides.

    headers = version_headers()              # sent by the client, returned by the server
    problem = mismatch(request_headers)      # on the server: None, or the error to answer with

A client and a server that speak different protocol versions get a clear error
naming both versions and which side to upgrade, never an opaque failure.
Requests without the header (curl, scripts) are served as the current protocol.
"""

from __future__ import annotations

PROTOCOL_HEADER = "X-NNsight-Protocol"
VERSION_HEADER = "X-NNsight-Version"


def _current():
    from .. import __version__
    from .schema import PROTOCOL_VERSION

    return PROTOCOL_VERSION, __version__


def version_headers() -> dict:
    protocol, version = _current()
    return {PROTOCOL_HEADER: str(protocol), VERSION_HEADER: version}


def describe(mine: str, theirs: str, side_mine: str, side_theirs: str, their_version: str | None) -> str:
    protocol, version = _current()
    try:
        newer_is_mine = int(mine) > int(theirs)
    except ValueError:
        newer_is_mine = False
    older = side_theirs if newer_is_mine else side_mine
    return (
        f"protocol version mismatch: the {side_mine} speaks protocol {mine} (nnsight {version}), the {side_theirs} "
        f"speaks protocol {theirs} (nnsight {their_version or 'unknown'}); upgrade the {older}'s nnsight"
    )


def mismatch(headers) -> dict | None:
    """The ``ErrorInfo`` a server answers a request with when its protocol differs (else None)."""
    sent = headers.get(PROTOCOL_HEADER)
    protocol, _ = _current()
    if sent is None or sent.strip() == str(protocol):
        return None
    message = describe(str(protocol), sent.strip()[:20], "server", "client", (headers.get(VERSION_HEADER) or "")[:40] or None)
    return {"type": "VersionMismatch", "message": message, "traceback": []}


def check_response(headers, host: str):
    """On the client: raise ``VersionMismatch`` if the server answered with another protocol version."""
    sent = headers.get(PROTOCOL_HEADER)
    protocol, _ = _current()
    if sent is not None and sent.strip() != str(protocol):
        from .wire import VersionMismatch

        raise VersionMismatch(describe(str(protocol), sent.strip()[:20], "client", f"server at {host}", headers.get(VERSION_HEADER)))


async def version_middleware(request, call_next):
    """Starlette/FastAPI middleware: refuse other protocol versions (426), label every answer with ours."""
    from starlette.responses import JSONResponse

    problem = mismatch(request.headers)
    if problem is not None:
        response = JSONResponse(status_code=426, content={"detail": problem["message"], "error": problem})
    else:
        response = await call_next(request)
    response.headers.update(version_headers())
    return response
