"""The app in-process (no worker processes): routers, the API-key dependency, the source check's error handling."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
requests = pytest.importorskip("requests")
uvicorn = pytest.importorskip("uvicorn")

import threading  # noqa: E402
import time  # noqa: E402

from nnsight.sandbox import policy  # noqa: E402
from nnsight.sandbox.errors import SandboxError  # noqa: E402
from nnsight.server.app import create_app  # noqa: E402
from nnsight.server.settings import Settings  # noqa: E402
from nnsight.server.store import KeyStore  # noqa: E402
from remote_support import free_port  # noqa: E402

REQUEST = {"model": "m", "kind": "trace", "source": "    x = 1\n", "body_lineno": 2, "inputs": ["hi"]}


class Client:
    """The app served by uvicorn in a thread of this process, on 127.0.0.1."""

    def __init__(self, app, key):
        self.url = f"http://127.0.0.1:{free_port()}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=int(self.url.rsplit(":", 1)[1]),
                                                    log_level="error", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.key = {"X-API-Key": key}
        self.state = app.state.server

    def __getattr__(self, method):
        return lambda path, **kw: requests.request(method.upper(), self.url + path, timeout=10, **kw)


@pytest.fixture
def client(tmp_path):
    app = create_app(Settings(models=["m=/nonexistent"], data_dir=tmp_path, lazy=True), start_workers=False)
    _, key = KeyStore(tmp_path / "nnsight.db").create("t")
    c = Client(app, key)
    c.thread.start()
    deadline = time.monotonic() + 20
    while not c.server.started:
        assert time.monotonic() < deadline, "the in-process server did not start"
        time.sleep(0.02)
    try:
        yield c
    finally:
        c.server.should_exit = True
        c.thread.join(10)


def test_job_routes_need_a_valid_key(client):
    assert client.post("/v1/jobs", json=REQUEST).status_code == 401
    assert client.get("/v1/jobs/abc", headers={"X-API-Key": "nns_wrong"}).status_code == 401
    assert client.get("/v1/jobs/abc", headers={"Authorization": "Bearer " + client.key["X-API-Key"]}).status_code == 404


def test_refused_code_is_a_400_sandbox_error(client):
    r = client.post("/v1/jobs", json={**REQUEST, "source": "    import os\n"}, headers=client.key)
    assert r.status_code == 400 and r.json()["error"]["type"] == "SandboxError" and "'os'" in r.json()["detail"]


def test_an_unexpected_failure_of_the_check_is_not_reported_as_refused_code(client, monkeypatch):
    def broken(text, filename="<remote>"):
        raise RuntimeError("the checker itself broke")

    monkeypatch.setattr(policy, "check_source", broken)
    r = client.post("/v1/jobs", json=REQUEST, headers=client.key)
    assert r.status_code == 500  # a server fault, never a 400 blaming the user's code
    monkeypatch.setattr(policy, "check_source", lambda text, filename="<remote>": (_ for _ in ()).throw(SandboxError("no")))
    assert client.post("/v1/jobs", json=REQUEST, headers=client.key).status_code == 400


def test_lazy_model_is_cold_until_wanted_and_queues_its_jobs(client):
    models = client.get("/v1/models").json()
    assert models == [{"name": "m", "kind": "language", "config": {}, "status": "cold", "replicas": 1}]
    assert client.get("/health").json()["models"] == {"m": "cold"}
    r = client.post("/v1/jobs", json=REQUEST, headers=client.key)
    assert r.status_code == 202 and r.json()["status"] == "queued" and r.json()["position"] == 0
    assert client.state.workers["m"]._wanted.is_set()
    assert client.get("/v1/models/m").status_code == 503  # no folder to read the config from: known once loaded


def test_openapi_lists_every_router(client):
    paths = set(client.get("/openapi.json").json()["paths"])
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/events", "/v1/jobs/{job_id}/result",
            "/v1/models", "/v1/models/{name}", "/v1/models/{name}/tokenizer", "/health", "/metrics"} <= paths
    metrics = client.get("/metrics").text
    assert "nnsight_max_batch 8" in metrics and "nnsight_queue_depth{model=\"m\"} 0" in metrics
