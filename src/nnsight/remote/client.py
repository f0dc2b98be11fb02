"""The client side of ``remote=True``: send a ``with`` block as one request, bind what it saved.

    with model.trace("Hello", remote=True):
        hs = model.model.layers[0].output.save()
    # hs is bound here, as after a local run

On entering the block, its source is found the way the tracing engine finds it
(linecache) and the body is skipped; on leaving, the body's text, its first line
number, the values it reads from the caller's scope and the sources of plain
functions it calls are sent as one ``JobRequest``. Status and printed text stream
back as server-sent events; the saved values are bound in the caller's scope.
"""

from __future__ import annotations

import ast
import builtins
import inspect
import json
import sys
import textwrap
import threading
import time
import types

from ..tracing.envoy import Envoy
from ..sandbox.errors import SandboxError
from ..tracing.tracer import BlockContext
from .schema import PROTOCOL_VERSION, TERMINAL, JobResult
from .serialize import UnsupportedValue, decode_with_tensors
from .stream import ResultReader
from . import compression
from .byvalue import ByValue
from .versions import check_response, version_headers
from .wire import IMPORTABLE_MODULES, RemoteError, error_class


class JobError(RemoteError):
    """The server could not take or run the job (authentication, limits, crash, cancel)."""


def raise_remote(info: dict, filename=None):
    """Raise the exception a server reported, at the user's own line when it has one."""
    cls = error_class(str(info.get("type", "")))
    message = str(info.get("message", ""))
    frames = info.get("traceback") or []
    if frames:
        where = "".join(f"\n  remote: {f['filename']}, line {f['lineno']}, in {f['name']}: {f.get('line', '')}" for f in frames)
        message += where
    try:
        error = cls(message)
    except Exception:  # pragma: no cover
        error = RemoteError(message)
    if frames and filename and frames[-1]["filename"] == filename:
        lineno = int(frames[-1]["lineno"])
        code = compile("\n" * (lineno - 1) + "raise __nnsight_remote_error__", filename, "exec")
        exec(code, {"__nnsight_remote_error__": error})
    raise error


# -- HTTP ---------------------------------------------------------------------------


def _config():
    from ..config import CONFIG

    return CONFIG


def _headers():
    key = _config().API.APIKEY
    headers = {"Accept": "application/json", **version_headers()}
    if key:
        headers["X-API-Key"] = key
    return headers


def _url(path):
    host = _config().API.HOST.rstrip("/")
    if "://" not in host:
        host = "http://" + host
    return host + path


def _check(response, filename=None):
    check_response(response.headers, server_host())
    if response.status_code < 400:
        return response
    try:
        body = response.json()
    except ValueError:
        body = {"detail": response.text[:500]}
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        raise_remote(body["error"], filename)
    detail = body.get("detail") if isinstance(body, dict) else body
    raise JobError(f"the server answered {response.status_code}: {detail}")


def _session():
    import requests

    return requests


def server_host() -> str:
    return _url("")


def unreachable_errors() -> tuple:
    """What a request raises when no server answers at ``CONFIG.API.HOST``."""
    import requests

    return (requests.ConnectionError, requests.Timeout)


def fetch_status() -> tuple[dict, list]:
    """``(GET /health, GET /v1/models)`` of the server."""
    http = _session()
    timeout = _config().API.TIMEOUT
    health = _check(http.get(_url("/health"), headers=_headers(), timeout=timeout)).json()
    models = _check(http.get(_url("/v1/models"), headers=_headers(), timeout=timeout)).json()
    return health, models


def fetch_env() -> dict:
    """``GET /v1/env``: the server's Python version and packages."""
    http = _session()
    return _check(http.get(_url("/v1/env"), headers=_headers(), timeout=_config().API.TIMEOUT)).json()


def _connection_errors() -> tuple:
    """Failures of the connection itself (after which polling may still work), not errors the server reported."""
    import requests

    return (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)


def fetch_model(name: str):
    """``(config, tokenizer)`` of a served model, for building it on the meta device."""
    import tempfile

    import transformers

    http = _session()
    timeout = _config().API.TIMEOUT
    info = _check(http.get(_url(f"/v1/models/{name}"), headers=_headers(), timeout=timeout)).json()
    config_dict = dict(info["config"])
    model_type = config_dict.pop("model_type", None)
    if not model_type:
        raise JobError(f"the server's config for {name!r} has no model_type")
    config = transformers.AutoConfig.for_model(model_type, **config_dict)
    tokenizer = None
    files = _check(http.get(_url(f"/v1/models/{name}/tokenizer"), headers=_headers(), timeout=timeout)).json()["files"]
    if files:
        folder = tempfile.mkdtemp(prefix="nnsight-remote-tokenizer-")
        import os

        for fname, text in files.items():
            if fname != os.path.basename(fname) or fname.startswith("."):
                continue
            with open(os.path.join(folder, fname), "w", encoding="utf-8") as f:
                f.write(text)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    return config, tokenizer


class RemoteJob:
    """A submitted job: ``status()``, ``wait()`` (the saved values), ``cancel()``."""

    def __init__(self, job_id, filename="<remote>", log=True, model=None):
        self.id = job_id
        self.model = model  # for tracer.cache() results, whose lookups follow the model's envoys
        self.filename = filename
        self.log = log
        self.stdout_seen = 0
        self._values = None

    def __repr__(self):
        return f"RemoteJob({self.id!r})"

    def status(self) -> dict:
        http = _session()
        return _check(http.get(_url(f"/v1/jobs/{self.id}"), headers=_headers(), timeout=_config().API.TIMEOUT)).json()

    def cancel(self) -> dict:
        http = _session()
        return _check(http.delete(_url(f"/v1/jobs/{self.id}"), headers=_headers(), timeout=_config().API.TIMEOUT)).json()

    def _say(self, status, position=None):
        if self.log and _config().APP.REMOTE_LOGGING:
            extra = f" (position {position})" if position is not None and status == "queued" else ""
            print(f"[nnsight remote {self.id[:8]}] {status}{extra}", file=sys.stderr, flush=True)

    def _finish(self, status, error):
        if status == "completed":
            return self.result()
        if status == "error":
            raise_remote(error or {"type": "RemoteError", "message": "the job failed"}, self.filename)
        raise JobError(f"the job was {status}")

    def wait(self, timeout=None) -> dict:
        """Follow the job until it ends (printing its output); returns its saved values."""
        if self._values is not None:
            return self._values
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            final = self._stream(deadline)
        except _connection_errors():  # the event stream broke (not an error the server reported): poll instead
            final = None
        if final is None:
            final = self._poll(deadline)
        return self._finish(*final)

    def _stream(self, deadline):
        http = _session()
        with http.get(_url(f"/v1/jobs/{self.id}/events"), headers=_headers(), stream=True,
                      timeout=(_config().API.TIMEOUT, 30)) as response:
            _check(response, self.filename)
            kind = None
            for raw in response.iter_lines(decode_unicode=True):
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"job {self.id} did not finish in time")
                if raw is None:
                    continue
                if raw.startswith("event:"):
                    kind = raw[6:].strip()
                elif raw.startswith("data:"):
                    data = json.loads(raw[5:])
                    if kind == "log":
                        text = str(data.get("text", ""))
                        self.stdout_seen += len(text)
                        sys.stdout.write(text)
                        sys.stdout.flush()
                    elif kind == "status":
                        status = data.get("status")
                        self._say(status, data.get("position"))
                        if status in TERMINAL:
                            return status, data.get("error")
        return None

    def _poll(self, deadline):
        while True:
            state = self.status()
            out = state.get("stdout", "")
            if len(out) > self.stdout_seen:
                sys.stdout.write(out[self.stdout_seen:])
                self.stdout_seen = len(out)
            if state["status"] in TERMINAL:
                self._say(state["status"])
                return state["status"], state.get("error")
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {self.id} did not finish in time")
            time.sleep(0.2)

    def _cache_of(self, calls):
        from ..tracing.cache import Cache

        if self.model is None:
            raise ValueError("a tracer.cache() result can only be decoded with its model (RemoteJob(model=...))")
        return Cache.from_calls(self.model, calls)

    def result(self) -> dict:
        """The saved values (downloaded once, zstd-compressed when large, with a progress bar, decoded as they arrive)."""
        if self._values is None:
            http = _session()
            headers = {**_headers(), **compression.request_headers()}
            with http.get(_url(f"/v1/jobs/{self.id}/result"), headers=headers, stream=True,
                          timeout=_config().API.TIMEOUT) as response:
                _check(response, self.filename)
                reader = ResultReader()  # the tensors are decoded as they arrive: one copy in memory
                for part in compression.chunks(response, f"job {self.id[:8]}", show_progress=self.log and _config().APP.REMOTE_LOGGING):
                    reader.feed(part)
            body, tensors = reader.finish()
            result = JobResult.model_validate(body)
            self._values = decode_with_tensors(result.values, tensors, cache=self._cache_of)
        return self._values


# -- the with-block ---------------------------------------------------------------------


class RemoteBlock(BlockContext):
    """``with model.trace/generate/session(..., remote=True) as tracer:`` (see module docstring).

    The block is captured and skipped like a local one; running it means sending it as
    a job. After a non-blocking block (``blocking=False``), ``tracer.job`` is the ``RemoteJob``.
    """

    def __init__(self, model, kind, inputs=(), kwargs=None, blocking=True, local=False):
        super().__init__()
        name = getattr(model, "_remote_name", None) or ("local" if local else None)
        if not name:
            raise NotImplementedError(
                "remote execution needs a model the server serves by name: LanguageModel('name') "
                "(or LanguageModel('name', remote=True) to build it from the server's config)"
            )
        self.model = model
        self.model_name = name
        self.kind = kind
        self.inputs = inputs
        self.kwargs = kwargs or {}
        self.blocking = blocking
        self.local = local
        self.job = None

    def _entered(self):
        node = self._block.node
        if len(node.items) != 1:
            raise SyntaxError(f"{self._block.filename}:{node.lineno}: a remote block must be a single `with model.trace(...)` item")
        target = node.items[0].optional_vars
        if target is not None and not isinstance(target, ast.Name):
            raise SyntaxError(f"{self._block.filename}:{node.lineno}: `as` must name one variable in a remote block")
        return self

    def _run_block(self, frame) -> dict:
        request = self._request(frame)
        self.job = self._submit(request)
        if not self.blocking:
            return {}
        values = self.job.wait()
        as_name = self._block.node.items[0].optional_vars
        values.pop(as_name.id if as_name is not None else None, None)
        return values

    # -- building the request ---------------------------------------------------------

    def _request(self, frame) -> dict:
        block = self._block
        node = block.node
        first = block.body_lineno
        body = block.body_source()
        root = self.model._root

        def envoy_path(value):
            if isinstance(value, Envoy):
                if value._root is not root:
                    raise UnsupportedValue("an envoy of another model cannot be sent")
                return value._path
            return None

        by_value = ByValue()
        encoder = by_value.encoder(envoy_path=envoy_path)
        inputs = [encoder.encode(v, f"input {i}") for i, v in enumerate(self.inputs)]
        kwargs = {k: encoder.encode(v, f"keyword argument {k!r}") for k, v in self.kwargs.items()}
        use = block.names
        variables = {}
        scope_locals = frame.f_locals
        as_target = node.items[0].optional_vars
        for name in sorted(use.loaded):
            if as_target is not None and name == as_target.id:
                continue  # bound to the server's own tracer there
            if name in scope_locals:
                value = scope_locals[name]
            elif name in frame.f_globals:
                value = frame.f_globals[name]
            else:
                continue  # a builtin, or a name the block binds itself
            try:
                variables[name] = encoder.encode(value, f"variable {name!r}")
            except UnsupportedValue as error:
                if name in use.assigned:
                    continue  # the block binds it before use; the caller's value is not needed
                raise UnsupportedValue(f"cannot send variable {name!r} to the server: {error}") from None
        for name, value in by_value.globals.items():
            variables.setdefault(name, value)
        as_name = node.items[0].optional_vars
        return {
            "protocol": PROTOCOL_VERSION,
            "model": self.model_name,
            "kind": self.kind,
            "source": body,
            "body_lineno": first,
            "filename": block.filename,
            "as_name": as_name.id if as_name is not None else None,
            "inputs": inputs,
            "kwargs": kwargs,
            "variables": variables,
            "functions": by_value.definitions(),
            "tensors": encoder.blob(),
        }

    def _submit(self, request):
        if self.local:
            from .local import LocalJob

            return LocalJob(self.model, request)
        http = _session()
        response = http.post(_url("/v1/jobs"), json=request, headers=_headers(), timeout=_config().API.TIMEOUT)
        status = _check(response, self._block.filename).json()
        return RemoteJob(status["id"], self._block.filename, model=self.model)


class _Executing(threading.local):
    """Whether remote code is running in this thread (set by the sandbox runner, see ``executing_remote_code``)."""

    depth = 0


_executing = _Executing()


class executing_remote_code:
    """``with executing_remote_code():`` marks this thread as running code sent for remote execution.

    Inside it, ``remote=True`` is refused (the code already runs where the model is).
    """

    def __enter__(self):
        _executing.depth += 1
        return self

    def __exit__(self, *exc):
        _executing.depth -= 1
        return False


def remote_block(model, kind, inputs=(), kwargs=None, blocking=True, where=True) -> RemoteBlock:
    """The block context of ``remote=True`` (a server) or ``remote="local"`` (the whole remote path, in-process)."""
    if _executing.depth:
        raise SandboxError("remote=True inside remote code is not allowed")
    if where not in (True, "local"):
        raise ValueError(f"remote= takes True (the server in CONFIG.API.HOST) or \"local\", not {where!r}")
    return RemoteBlock(model, kind, inputs, kwargs, blocking, local=where == "local")
