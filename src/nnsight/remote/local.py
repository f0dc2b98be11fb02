"""``remote="local"``: the whole remote path in this process, without a server.

    with model.trace("Hello", remote="local"):
        hs = model.transformer.h[0].output.save()

The block is encoded as a ``JobRequest`` exactly as for a server, the request goes
through JSON and the schema, is checked and run by the sandbox against this
(local) model, and the saved values come back through the same encoding. So what
runs here is what a server would accept, and the values are what it would return.
"""

from __future__ import annotations

import json
import sys
import uuid


class LocalJob:
    """A job run at once in this process; ``wait()`` returns its saved values or raises its error."""

    def __init__(self, model, request: dict):
        from ..sandbox.guards import Guards
        from ..sandbox.runner import describe_error, forget, run_request
        from .client import raise_remote
        from .schema import JobRequest, JobResult
        from .serialize import decode_values

        self.id = uuid.uuid4().hex
        wire = json.loads(json.dumps(request))  # what a server receives: JSON, validated by the schema
        wire = JobRequest.model_validate(wire).model_dump()
        filename = wire.get("filename") or "<remote>"

        def emit(text):
            sys.stdout.write(text)

        try:
            tree, blob = run_request(model, Guards(model), wire, self.id, emit)
        except Exception as error:  # the user's error, reported as a server reports it
            info = describe_error(error, self.id, filename)
            del error
            raise_remote(json.loads(json.dumps(info)), filename)
        finally:
            forget(self.id)
        result = JobResult.model_validate(json.loads(json.dumps({"id": self.id, "values": tree, "tensors": blob})))
        from ..tracing.cache import Cache

        self._values = decode_values(result.values, result.tensors, cache=lambda calls: Cache.from_calls(model, calls))

    def wait(self, timeout=None) -> dict:
        return self._values

    def result(self) -> dict:
        return self._values

    def status(self) -> dict:
        return {"id": self.id, "status": "completed"}
