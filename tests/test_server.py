"""The server's own endpoints, a bounded load test (200 jobs, 8 clients) and a bounded OpenAPI fuzz."""

from __future__ import annotations

import concurrent.futures
import textwrap
import time

import pytest

requests = pytest.importorskip("requests")
pytest.importorskip("fastapi")
torch = pytest.importorskip("torch")

from nnsight.remote.serialize import Encoder, decode_values  # noqa: E402
from test_remote_support import create_key, make_tiny_gpt2, start_server  # noqa: E402

MODEL = {"$t": "envoy", "path": "model"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    folder = make_tiny_gpt2(root / "tiny")
    data = root / "data"
    keys = [create_key(data, f"client{i}") for i in range(8)]
    srv = start_server([f"tiny-gpt2={folder}"], data, "--job-timeout", "20", "--rate-limit", "10000",
                       "--max-concurrent", "4", "--weights-every", "50")
    srv.keys = keys
    try:
        yield srv
    finally:
        srv.stop()


def test_health_models_openapi_status_page_metrics(server):
    health = requests.get(server.url + "/health", timeout=10).json()
    assert health["status"] == "ok" and health["models"] == {"tiny-gpt2": "ready"}
    models = requests.get(server.url + "/v1/models", timeout=10).json()
    assert models[0]["name"] == "tiny-gpt2" and models[0]["config"]["n_layer"] == 2
    tok = requests.get(server.url + "/v1/models/tiny-gpt2/tokenizer", timeout=10).json()
    assert "vocab.json" in tok["files"]
    spec = requests.get(server.url + "/openapi.json", timeout=10).json()
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/events", "/v1/jobs/{job_id}/result", "/v1/models",
            "/health", "/metrics"} <= set(spec["paths"])
    assert "JobRequest" in spec["components"]["schemas"]
    page = requests.get(server.url + "/", timeout=10).text
    assert "tiny-gpt2" in page and "Queued jobs" in page
    assert "nnsight_queue_depth" in requests.get(server.url + "/metrics", timeout=10).text


def test_events_stream_status_and_prints(server):
    h = {"X-API-Key": server.keys[0]}
    req = {"model": "tiny-gpt2", "kind": "trace", "source": "    print('hi', 1)\n    out = model.lm_head.output.save()\n",
           "body_lineno": 2, "inputs": ["Hello"], "variables": {"model": MODEL}}
    job = requests.post(server.url + "/v1/jobs", json=req, headers=h, timeout=10).json()["id"]
    with requests.get(f"{server.url}/v1/jobs/{job}/events", headers=h, stream=True, timeout=30) as r:
        text = "".join(line + "\n" for line in r.iter_lines(decode_unicode=True))
    assert "event: log" in text and '"hi 1\\n"' in text
    assert '"status": "running"' in text and '"status": "completed"' in text


def _one(server, key, i):
    """Submit a job whose answer depends on i; check this client gets its own values back."""
    h = {"X-API-Key": key}
    enc = Encoder()
    offset = {"$t": "tensor", "id": enc._tensor(torch.full((32,), float(i)), "offset")}
    # The MLP's output is a tensor under transformers 4 and 5 (a block's is a tuple only under 4).
    body = textwrap.indent("model.transformer.h[0].mlp.output[:, -1] = offset\nseen = model.transformer.h[0].mlp.output[:, -1].save()\n", "    ")
    req = {"model": "tiny-gpt2", "kind": "trace", "source": body, "body_lineno": 2, "inputs": [f"request {i}"],
           "variables": {"model": MODEL, "offset": offset}, "tensors": enc.blob()}
    for _ in range(200):  # 429 while this key already has 4 jobs: back off
        r = requests.post(server.url + "/v1/jobs", json=req, headers=h, timeout=30)
        if r.status_code != 429:
            break
        time.sleep(0.05)
    assert r.status_code == 202, r.text
    job = r.json()["id"]
    while True:
        state = requests.get(f"{server.url}/v1/jobs/{job}", headers=h, timeout=30).json()
        if state["status"] in ("completed", "error", "cancelled"):
            break
        time.sleep(0.02)
    assert state["status"] == "completed", state
    result = requests.get(f"{server.url}/v1/jobs/{job}/result", headers=h, timeout=30).json()
    seen = decode_values(result["values"], result["tensors"])["seen"]
    assert torch.equal(seen, torch.full((1, 32), float(i)))
    return i


def test_load_200_requests_from_8_clients(server):
    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(_one, server, server.keys[i % 8], i) for i in range(200)]
        done = sorted(f.result(timeout=300) for f in futures)
    elapsed = time.monotonic() - start
    assert done == list(range(200))
    print(f"\nload test: 200 jobs from 8 clients in {elapsed:.1f} s ({200 / elapsed:.1f} jobs/s)")
    assert server.alive()


def test_openapi_fuzz_has_no_server_errors(server):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    failures = []
    started = time.monotonic()

    for operation in schema.get_all_operations():
        op = operation.ok()

        @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=op.as_strategy())
        def check(case):
            if time.monotonic() - started > 60:
                return
            case.headers = {**(case.headers or {}), "X-API-Key": server.keys[7]}
            response = case.call(base_url=server.url, timeout=30)
            if response.status_code >= 500:
                failures.append((case.method, case.path, response.status_code, response.text[:300]))

        check()
    assert not failures, failures
    assert server.alive()


def _chromium():
    import shutil

    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="Debian's chromium package (CI installs it)")
def test_status_page_in_headless_chromium(server, tmp_path):
    import subprocess

    shot = tmp_path / "status.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([_chromium(), *flags, "--dump-dom", server.url + "/"], capture_output=True, text=True, timeout=90)
    assert "tiny-gpt2" in dom.stdout and "Queued jobs" in dom.stdout
    assert "def " not in dom.stdout  # no job contents on the public page
    subprocess.run([_chromium(), *flags, f"--screenshot={shot}", "--window-size=900,600", server.url + "/"],
                   capture_output=True, timeout=90)
    assert shot.exists() and shot.stat().st_size > 1000
