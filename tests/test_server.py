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
from conftest import served_tiny_gpt2  # noqa: E402

MODEL = {"$t": "envoy", "path": "model"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from served_tiny_gpt2(tmp_path_factory, "server", ["--job-timeout", "20", "--rate-limit", "10000",
                                "--max-concurrent", "4", "--weights-every", "50"], keys=8, models=["tiny-gpt2"])


def test_health_models_openapi_status_page_metrics(server):
    health = requests.get(server.url + "/health", timeout=10).json()
    assert health["status"] == "ok" and health["models"] == {"tiny-gpt2": "ready"}
    assert set(health["isolation"]) == {"network", "data_dir", "user", "seccomp", "memory"}
    assert all(v.startswith(("active", "not available (")) for v in health["isolation"].values()), health["isolation"]
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
    assert state["status"] == "completed", state.get("error")
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
    metrics = requests.get(server.url + "/metrics", timeout=10).text
    sizes = {line.split("{")[0]: float(line.split()[-1]) for line in metrics.splitlines()
             if line.startswith("nnsight_forward_batch_size")}
    assert sizes["nnsight_forward_batch_size_count"] < 200  # co-batched: fewer forwards than jobs, each job its own values
    assert sizes["nnsight_forward_batch_size_max"] > 1


def _metric(server, name):
    text = requests.get(server.url + "/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.split("{")[0].split(" ")[0] == name)


def test_generate_requests_co_batch_over_http_with_solo_results(server, tmp_path):
    from nnsight import LanguageModel
    from remote_support import make_tiny_gpt2

    h = {"X-API-Key": server.keys[1]}
    settings = {"max_new_tokens": 3, "min_new_tokens": 3}
    body = "    steps = []\n    for step in tracer.iter[:]:\n        steps.append(model.lm_head.output[:, -1])\n" \
           "    steps = torch.stack(steps).save()\n    tokens = tracer.result.save()\n"
    prompts = ["The cat sat on", "A dog ran to", "One bird flew by"]  # the same token width
    # A job that keeps the worker busy, so the generates queue behind it and are taken as one batch.
    busy = {"model": "tiny-gpt2", "kind": "trace", "source": "    n = 0\n    for i in range(400000):\n        n += 1\n",
            "body_lineno": 2, "inputs": ["Hello"], "variables": {"model": MODEL}}
    before = _metric(server, "nnsight_forward_batch_size_count"), _metric(server, "nnsight_forward_batch_size_sum")
    jobs = [requests.post(server.url + "/v1/jobs", json=busy, headers=h, timeout=10).json()["id"]]
    for prompt in prompts:
        req = {"model": "tiny-gpt2", "kind": "generate", "source": body, "body_lineno": 2, "inputs": [prompt], "kwargs": settings,
               "as_name": "tracer", "variables": {"model": MODEL, "torch": {"$t": "module", "name": "torch"}}}
        jobs.append(requests.post(server.url + "/v1/jobs", json=req, headers=h, timeout=10).json()["id"])
    results = []
    for job in jobs:
        while requests.get(f"{server.url}/v1/jobs/{job}", headers=h, timeout=10).json()["status"] not in ("completed", "error"):
            time.sleep(0.02)
        body_ = requests.get(f"{server.url}/v1/jobs/{job}/result", headers=h, timeout=10).json()
        results.append(decode_values(body_["values"], body_["tensors"]))
    after = _metric(server, "nnsight_forward_batch_size_count"), _metric(server, "nnsight_forward_batch_size_sum")
    assert (after[0] - before[0], after[1] - before[1]) == (2, 4)  # the busy job alone, then one generate of three
    local = LanguageModel(str(make_tiny_gpt2(tmp_path / "tiny")))
    for prompt, got in zip(prompts, results[1:]):
        with local.generate(prompt, **settings) as tracer:
            steps = []
            for step in tracer.iter[:]:
                steps.append(local.lm_head.output[:, -1])
            steps = torch.stack(steps).save()
            tokens = tracer.result.save()
        assert torch.equal(got["tokens"], tokens)
        torch.testing.assert_close(got["steps"], steps, rtol=1e-5, atol=1e-5)


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
