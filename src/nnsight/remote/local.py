"""``remote="local"``: the whole remote path in this process, without a server.

    with model.trace("Hello", remote="local"):
        hs = model.transformer.h[0].output.save()

The block is encoded as a ``JobRequest`` exactly as for a server, the request goes
through JSON and the schema, is checked and run by the sandbox against this
(local) model, the model is checked as the server's worker checks it after every job
(``server.integrity``: parameters, buffers, hooks, module attributes, torch's switches,
the weights' checksum), and the saved values come back through the same encoding. So
what runs here is what a server would accept, and the values (or the error) are what it
would return.
"""

from __future__ import annotations

import gc
import json
import sys
import uuid


class LocalJob:
    """A job run at once in this process; ``wait()`` returns its saved values or raises its error."""

    def __init__(self, model, request: dict):
        from ..sandbox.guards import Guards
        from ..sandbox.runner import describe_error, forget, run_request
        from ..server.integrity import Integrity, refusal
        from .client import raise_remote
        from .schema import JobRequest, JobResult
        from .compression import CHUNK
        from .serialize import decode_with_tensors
        from .stream import ResultReader

        self.id = uuid.uuid4().hex
        wire = json.loads(json.dumps(request))  # what a server receives: JSON, validated by the schema
        wire = JobRequest.model_validate(wire).model_dump()
        filename = wire.get("filename") or "<remote>"

        def emit(text):
            sys.stdout.write(text)

        integrity = Integrity(model, weights_every=1)
        try:
            tree, blob = run_request(model, Guards(model), wire, self.id, emit)
            outcome = None
        except Exception as error:  # the user's error, reported as a server reports it (unless the model changed)
            outcome = describe_error(error, self.id, filename)
            del error
        finally:
            forget(self.id)
        integrity.reset()  # as the worker does: gradients a job left are dropped, then the model is checked
        gc.collect()
        problem = integrity.check()
        if problem is not None:  # the server fails the job this way (and replaces its worker)
            outcome = refusal(problem, reloaded=False)
        if outcome is not None:
            raise_remote(json.loads(json.dumps(outcome)), filename)
        # the result read back as a client reads a download: the same JSON, chunk by chunk
        data = json.dumps({"id": self.id, "values": tree, "tensors": blob}).encode()
        del tree, blob
        reader = ResultReader()
        for start in range(0, len(data), CHUNK):
            reader.feed(data[start:start + CHUNK])
        del data
        body, tensors = reader.finish()
        result = JobResult.model_validate(body)
        from ..tracing.cache import Cache

        self._values = decode_with_tensors(result.values, tensors, cache=lambda calls: Cache.from_calls(model, calls))

    def wait(self, timeout=None) -> dict:
        return self._values

    def result(self) -> dict:
        return self._values

    def status(self) -> dict:
        return {"id": self.id, "status": "completed"}
