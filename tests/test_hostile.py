"""Hostile requests against a real `nnsight serve` subprocess: each is refused with a clear error,
and the server keeps serving with the model unchanged (checked at the end of the module).

Tests marked ``every_mode`` (and the marked cases of the tables) also run against the shared
Ray-mode server (conftest ``ray_server``), the rest against worker processes only."""

from __future__ import annotations

import base64
import pickle
import textwrap
import time

import pytest

requests = pytest.importorskip("requests")
pytest.importorskip("fastapi")
pytest.importorskip("RestrictedPython")

from remote_support import create_key, make_tiny_gpt2, start_server  # noqa: E402

MODEL = {"$t": "envoy", "path": "model"}
TORCH = {"$t": "module", "name": "torch"}
PROBE = "hs = model.transformer.h[0].output[0].save()\nlogits = model.lm_head.output.save()\n"


EVERY_MODE = pytest.mark.every_mode


@pytest.fixture(scope="module")
def server(server_mode, tmp_path_factory, request):
    if server_mode == "ray":
        yield request.getfixturevalue("ray_server")
        return
    root = tmp_path_factory.mktemp("hostile")
    folder = make_tiny_gpt2(root / "tiny")
    data = root / "data"
    keys = {name: create_key(data, name) for name in ("alice", "bob", "revoked")}
    srv = start_server([f"tiny-gpt2={folder}"], data, "--job-timeout", "3", "--memory-mb", "6000",
                       "--max-body-mb", "2", "--max-tensor-mb", "1", "--max-concurrent", "4", "--rate-limit", "1000")
    srv.keys = keys
    try:
        yield srv
    finally:
        srv.stop()


def request(source, variables=None, **extra):
    body = textwrap.indent(textwrap.dedent(source).strip("\n") + "\n", "    ")
    req = {"model": "tiny-gpt2", "kind": "trace", "source": body, "body_lineno": 2, "filename": "hostile.py",
           "inputs": ["Hello world"], "variables": {"model": MODEL, "torch": TORCH, **(variables or {})}}
    req.update(extra)
    return req


def post(server, req, key="alice"):
    headers = {"X-API-Key": server.keys[key]} if key else {}
    return requests.post(server.url + "/v1/jobs", json=req, headers=headers, timeout=30)


def wait(server, job_id, key="alice", timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = requests.get(f"{server.url}/v1/jobs/{job_id}", headers={"X-API-Key": server.keys[key]}, timeout=30).json()
        if state["status"] in ("completed", "error", "cancelled"):
            return state
        time.sleep(0.05)
    raise AssertionError("job did not finish")


def outcome(server, req, key="alice"):
    """(error type, message) of a request refused statically (400) or when it ran."""
    r = post(server, req, key)
    if r.status_code == 400:
        err = r.json()["error"]
        return err["type"], err["message"]
    assert r.status_code == 202, r.text
    state = wait(server, r.json()["id"], key)
    assert state["status"] == "error", f"not refused: {state}"
    return state["error"]["type"], state["error"]["message"]


def refused(server, source, match, variables=None, kind="SandboxError", **extra):
    etype, message = outcome(server, request(source, variables, **extra))
    assert etype == kind, (etype, message)
    assert match in message, message
    assert server.alive()


def run_ok(server, source=PROBE, key="alice"):
    r = post(server, request(source), key)
    assert r.status_code == 202, r.text
    state = wait(server, r.json()["id"], key)
    assert state["status"] == "completed", state
    return requests.get(f"{server.url}/v1/jobs/{r.json()['id']}/result", headers={"X-API-Key": server.keys[key]}, timeout=30).json()


@pytest.fixture(scope="module")
def baseline(server):
    return run_ok(server)


# -- the sandbox's static checks (400 before anything runs) ------------------------------

STATIC = [
    pytest.param("subclass walking", "x = ().__class__.__bases__[0].__subclasses__()", "'__subclasses__'", marks=EVERY_MODE),
    ("mro walking", "x = [].__class__.__mro__", "'__mro__'"),
    ("function globals", "def f():\n    pass\ng = f.__globals__", "'__globals__'"),
    ("code object", "def f():\n    pass\nc = f.__code__", "'__code__'"),
    ("builtins via name", "b = __builtins__", "'__builtins__'"),
    ("dunder import", "os = __import__('os')", "'__import__'"),
    pytest.param("import os", "import os", "import of 'os' is not allowed", marks=EVERY_MODE),
    ("fork bomb", "from os import fork\nwhile True:\n    fork()", "import from 'os' is not allowed"),
    ("subprocess", "import subprocess\nsubprocess.run(['sh'])", "import of 'subprocess'"),
    ("pickle module", "import pickle", "import of 'pickle'"),
    ("numpy load", "import numpy\nnumpy.load('x.npy', allow_pickle=True)", "import of 'numpy'"),
    ("torch private C", "from torch import _C", "'_C'"),
    ("torch multiprocessing", "import torch.multiprocessing", "import of 'torch.multiprocessing'"),
    ("socket", "import socket", "import of 'socket'"),
    ("eval", "eval('1 + 1')", "'eval' is not available"),
    ("exec", "exec('x = 1')", "'exec' is not available"),
    ("open", "open('/etc/passwd').read()", "'open' is not available"),
    pytest.param("getattr", "getattr(model, '_module')", "'getattr' is not available", marks=EVERY_MODE),
    ("setattr", "setattr(model, 'x', 1)", "'setattr' is not available"),
    ("type", "t = type(model)", "'type' is not available"),
    ("vars", "v = vars(model)", "'vars' is not available"),
    ("globals", "g = globals()", "'globals' is not available"),
    ("compile", "c = compile('1', 'f', 'eval')", "'compile' is not available"),
    ("breakpoint", "breakpoint()", "'breakpoint' is not available"),
    ("format string attribute walk", "s = '{0.__class__}'.format(model)", "format"),
    ("traceback frames", "try:\n    1 / 0\nexcept Exception as e:\n    tb = e.__traceback__", "'__traceback__'"),
    ("descriptor class", "class D:\n    def __get__(self, obj, owner):\n        return 1", "'__get__'"),
    ("metaclass", "class A(metaclass=M):\n    pass", "metaclass="),
    ("class rebinding a guard", "class A:\n    _getattr_ = 1", "'_getattr_'"),
    ("global statement", "global model", "'global' is not allowed"),
    ("async with", "async def f(x):\n    async with x:\n        pass", "'async with' is not allowed"),
    ("out= writes into weights", "w = model.lm_head.weight\ntorch.add(w, 1, out=w)", "out= is not allowed"),
    ("reserved keyword", "torch.zeros(1, __x__=1)", "keyword '__x__'"),
    ("reserved argument name", "def f(_write_):\n    return _write_", "argument '_write_'"),
    ("rebinding a guard", "_getattr_ = lambda o, n: o", "'_getattr_'"),
    ("syntax error", "x = = 1", "syntax error"),
    ("NUL byte", "x = 1\x00", "NUL"),
]


def _ids(table):
    return [case.values[0] if hasattr(case, "values") else case[0] for case in table]


@pytest.mark.parametrize("what, source, match", STATIC, ids=_ids(STATIC))
def test_static_refusals(server, baseline, what, source, match):
    r = post(server, request(source))
    assert r.status_code == 400, (r.status_code, r.text)
    err = r.json()["error"]
    assert err["type"] == "SandboxError" and match in err["message"], err
    assert "hostile.py" in err["message"] or "syntax" in err["message"] or "NUL" in err["message"]


# -- refused while running (the runtime guards) -------------------------------------------

RUNTIME = [
    pytest.param("torch.load", "t = torch.load('/etc/passwd')", "torch.load is not available", marks=EVERY_MODE),
    ("torch.save", "torch.save(model.lm_head.weight, '/tmp/x')", "torch.save is not available"),
    ("torch.hub", "torch.hub.load('a', 'b')", "torch.hub is not available"),
    ("cpp extension", "torch.utils.cpp_extension.load_inline('x', '')", "torch.utils is not available"),
    ("torch.ops", "torch.ops.aten.add", "torch.ops is not available"),
    ("torch.jit", "torch.jit.script", "torch.jit is not available"),
    ("torch.from_file", "t = torch.from_file('/etc/passwd', size=10)", "torch.from_file is not available"),
    ("torch.compile", "torch.compile", "torch.compile is not available"),
    ("TorchScript import", "torch.import_ir_module", "torch.import_ir_module is not available"),
    pytest.param("uninitialized memory", "t = torch.empty(1000)", "torch.empty is not available", marks=EVERY_MODE),
    ("uninitialized via Tensor()", "t = torch.Tensor(1000)", "uninitialized memory"),
    ("uninitialized via new_empty", "t = torch.zeros(1).new_empty(1000)", "tensor.new_empty is not available"),
    ("global torch state", "torch.set_grad_enabled(False)", "torch.set_grad_enabled is not available"),
    ("global RNG state", "torch.manual_seed(0)", "torch.manual_seed is not available"),
    pytest.param("write weights by index", "w = model.lm_head.weight\nw[0] = 1", "read-only", marks=EVERY_MODE),
    ("write weights via .data", "model.lm_head.weight.data.zero_()", "tensor.data on the model's own weights"),
    pytest.param("write weights in place", "model.transformer.h[0].mlp.c_fc.weight.add_(1)", "tensor.add_ on the model's own weights", marks=EVERY_MODE),
    ("write weights through a view", "v = model.lm_head.weight.T\nv[0] = 5", "read-only"),
    ("write weights through detach", "d = model.lm_head.weight.detach()\nd.mul_(0)", "tensor.mul_ on the model's own weights"),
    ("in-place functional on weights", "import torch.nn.functional as F\nF.relu(model.lm_head.weight, inplace=True)", "inplace=True"),
    ("hook on weights", "model.lm_head.weight.register_hook(print)", "tensor.register_hook on the model's own weights"),
    pytest.param("replace a module's forward", "def f(x):\n    return x\nmodel.lm_head.forward = f", "setting attributes of model.lm_head", marks=EVERY_MODE),
    ("replace Linear.forward", "torch.nn.Linear.forward = None", "changing a type object is not allowed"),
    ("module attribute write", "model.transformer.h[0].attn.embed_dim = 5", "setting attributes"),
    pytest.param("module methods", "model.lm_head.register_forward_hook(print)", "methods of modules other than calling them are blocked", marks=EVERY_MODE),
    ("load_state_dict", "model.load_state_dict({})", "load_state_dict is not available"),
    ("raw module by item path", "m = model['_module']", "invalid module path"),
    ("raw module by get", "m = model.get('transformer._modules')", "invalid module path"),
    ("tensor storage", "s = model.lm_head.weight.untyped_storage()", "tensor.untyped_storage is not available"),
    ("tensor numpy", "a = torch.zeros(2).numpy()", "tensor.numpy is not available"),
    ("generator frames", "def g():\n    yield 1\nit = g()\nf = it.gi_frame", "\"gi_frame\" is a restricted name"),
    ("coroutine frames", "async def g():\n    return 1\nc = g()\nf = c.cr_frame", "\"cr_frame\" is a restricted name"),
    ("coroutine internals", "async def g():\n    return 1\nc = g()\nf = c.cr_running", "coroutine.cr_running is not available"),
    ("async generator frames", "async def g():\n    yield 1\nf = g().ag_frame", "\"ag_frame\" is a restricted name"),
    ("function attributes", "def f():\n    pass\nc = f.func_globals", "function object is not allowed"),
    pytest.param("tracer internals", "m = tracer.model", "tracer.model is not available", marks=EVERY_MODE),
    ("exception traceback method", "try:\n    1 / 0\nexcept Exception as e:\n    e.with_traceback(None)", "exception.with_traceback"),
    ("persistent edits", "e = model.edit()", "edit is not available"),
    ("move the model", "model.to('meta')", "to is not available"),
    pytest.param("nested remote", "with model.trace('x', remote=True):\n    pass", "remote=True inside remote code", marks=EVERY_MODE),
    ("tokenizer mutation", "model.tokenizer.add_tokens(['zzz'])", "tokenizer.add_tokens is not available"),
    ("class attribute via isinstance type", "n = torch.Tensor.add_", "reading .add_ of a _TensorTypeMeta object is not allowed"),
]


@pytest.mark.parametrize("what, source, match", RUNTIME, ids=_ids(RUNTIME))
def test_runtime_refusals(server, baseline, what, source, match):
    refused(server, source, match, as_name="tracer")


@EVERY_MODE
def test_exception_reports_the_users_line(server):
    req = request("x = 1\ny = model.transformer.h[0].output[0]\nz = undefined_name")
    etype, message = outcome(server, req)
    assert etype == "NameError" and "undefined_name" in message
    r = post(server, req)
    state = wait(server, r.json()["id"])
    assert state["error"]["traceback"][-1]["lineno"] == 4 and state["error"]["traceback"][-1]["filename"] == "hostile.py"


# -- malformed and oversized payloads ----------------------------------------------------


@EVERY_MODE
def test_pickle_payload_as_tensors_is_rejected(server):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    blob = base64.b64encode(pickle.dumps(Evil())).decode()
    etype, message = outcome(server, request("y = x", {"x": {"$t": "tensor", "id": "t0"}}, tensors=blob))
    assert etype == "ValueError" and "not a valid safetensors blob" in message


def test_pickle_payload_as_body_is_rejected(server):
    r = requests.post(server.url + "/v1/jobs", data=pickle.dumps({"model": "tiny-gpt2"}),
                      headers={"X-API-Key": server.keys["alice"], "Content-Type": "application/octet-stream"}, timeout=30)
    assert r.status_code == 422


def test_unknown_value_tag(server):
    etype, message = outcome(server, request("y = x", {"x": {"$t": "pickle", "data": "gASV"}}))
    assert etype == "ValueError" and "unknown value tag 'pickle'" in message


@EVERY_MODE
def test_huge_body_is_refused(server):
    r = post(server, request("x = 1", {"junk": "a" * (3 << 20)}))
    assert r.status_code == 413 and "limit" in r.json()["detail"]


def test_huge_uploaded_tensor_is_refused(server):
    import io

    import torch
    from safetensors.torch import save

    blob = base64.b64encode(save({"t0": torch.zeros(400_000)})).decode()  # 1.6 MB > 1 MB
    r = post(server, request("y = x", {"x": {"$t": "tensor", "id": "t0"}}, tensors=blob))
    assert r.status_code == 413 and "limit" in r.json()["detail"]
    del io


def test_huge_tensor_allocation_fails_cleanly(server):
    etype, message = outcome(server, request("t = torch.ones(2 ** 34)"))
    # Usually a clean RuntimeError from torch's allocator under the worker's RLIMIT_AS; after many jobs on
    # one worker it has also ended in SIGSEGV (known issue, see the report): then the crash must be contained.
    assert etype in ("RuntimeError", "MemoryError") or (etype == "RemoteError" and "crashed the model worker" in message), (etype, message)
    run_ok(server)


def test_deep_nesting_is_refused(server):
    etype, message = outcome(server, request("x = " + "[" * 500 + "]" * 500))
    assert etype == "SandboxError"


# -- keys and job visibility -----------------------------------------------------------


def test_missing_key(server):
    r = post(server, request("x = 1"), key=None)
    assert r.status_code == 401 and "API key" in r.json()["detail"]


def test_forged_key(server):
    r = requests.post(server.url + "/v1/jobs", json=request("x = 1"), headers={"X-API-Key": "nns_" + "A" * 43}, timeout=30)
    assert r.status_code == 401


def test_revoked_key(server):
    import subprocess

    from remote_support import NNSIGHT, env_for

    assert post(server, request(PROBE), key="revoked").status_code == 202
    listing = subprocess.run(NNSIGHT + ["serve", "keys", "list", "--data-dir", str(server.data_dir)],
                             capture_output=True, text=True, env=env_for(server.data_dir), check=True).stdout
    key_id = next(line.split()[0] for line in listing.splitlines() if " revoked " in f" {line.split()[1]} ")
    subprocess.run(NNSIGHT + ["serve", "keys", "revoke", key_id, "--data-dir", str(server.data_dir)],
                   capture_output=True, env=env_for(server.data_dir), check=True)
    assert post(server, request(PROBE), key="revoked").status_code == 401


@EVERY_MODE
def test_another_keys_job_is_invisible(server):
    r = post(server, request(PROBE), key="alice")
    job = r.json()["id"]
    wait(server, job, "alice")
    bob = {"X-API-Key": server.keys["bob"]}
    for method, path in (("get", ""), ("get", "/result"), ("get", "/events"), ("delete", "")):
        resp = getattr(requests, method)(f"{server.url}/v1/jobs/{job}{path}", headers=bob, timeout=30)
        assert resp.status_code == 404, (method, path, resp.status_code)
    assert requests.get(f"{server.url}/v1/jobs/{job}/result", headers={"X-API-Key": server.keys["alice"]}, timeout=30).status_code == 200


def test_guessed_job_ids_and_path_tricks(server):
    h = {"X-API-Key": server.keys["alice"]}
    for job in ("0" * 32, "..%2F..%2Fnnsight.db", "x" * 1000, "%00"):
        assert requests.get(f"{server.url}/v1/jobs/{job}/result", headers=h, timeout=30).status_code == 404


# -- time limits, concurrency limits; the server keeps serving -------------------------------


def test_infinite_loop_is_stopped_and_concurrency_is_limited(server):
    r = post(server, request("while True:\n    pass"), key="bob")
    assert r.status_code == 202
    loop = r.json()["id"]
    queued = [post(server, request(PROBE), key="bob") for _ in range(3)]
    assert all(q.status_code == 202 for q in queued)
    over = post(server, request(PROBE), key="bob")
    assert over.status_code == 429 and "at most 4" in over.json()["detail"]
    state = wait(server, loop, "bob", timeout=60)
    assert state["error"]["type"] == "TimeoutError" and "limit of 3.0 s" in state["error"]["message"]
    for q in queued:  # queued behind the loop; they run on the restarted worker
        assert wait(server, q.json()["id"], "bob", timeout=120)["status"] == "completed"


def test_cancel_a_running_job(server):
    r = post(server, request("while True:\n    pass"))
    job = r.json()["id"]
    deadline = time.monotonic() + 60
    while requests.get(f"{server.url}/v1/jobs/{job}", headers={"X-API-Key": server.keys["alice"]}, timeout=30).json()["status"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    requests.delete(f"{server.url}/v1/jobs/{job}", headers={"X-API-Key": server.keys["alice"]}, timeout=30)
    assert wait(server, job)["status"] == "cancelled"


@EVERY_MODE
def test_zz_server_still_serves_and_model_unchanged(server, server_mode, baseline):
    after = run_ok(server)
    assert after["tensors"] == baseline["tensors"]
    health = requests.get(server.url + "/health", timeout=30).json()
    assert health["status"] == "ok"
    if server_mode == "workers":  # the looping job (not in the Ray subset) restarted the worker
        metrics = requests.get(server.url + "/metrics", timeout=30).text
        assert "nnsight_worker_restarts_total" in metrics
