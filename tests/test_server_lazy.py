"""Models loaded on demand (--lazy): cold until the first request, least recently used unloaded over --memory-budget-gb."""

from __future__ import annotations

import time

import pytest

requests = pytest.importorskip("requests")
pytest.importorskip("fastapi")
torch = pytest.importorskip("torch")

from nnsight.remote.serialize import decode_values  # noqa: E402
from conftest import served_tiny_gpt2  # noqa: E402

MODEL = {"$t": "envoy", "path": "model"}
BODY = "    logits = model.lm_head.output.save()\n"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # ~6.5 MB of weights each: a budget of 10 MB holds one of the two
    yield from served_tiny_gpt2(tmp_path_factory, "lazy", ["--lazy", "--memory-budget-gb", "0.01", "--job-timeout", "60"],
                                models=["a", "b"])


def statuses(server):
    return {m["name"]: m["status"] for m in requests.get(server.url + "/v1/models", timeout=10).json()}


def run(server, model):
    h = {"X-API-Key": server.key}
    req = {"model": model, "kind": "trace", "source": BODY, "body_lineno": 2, "inputs": ["Hello"], "variables": {"model": MODEL}}
    r = requests.post(server.url + "/v1/jobs", json=req, headers=h, timeout=10)
    assert r.status_code == 202, r.text
    job = r.json()["id"]
    seen = []
    with requests.get(f"{server.url}/v1/jobs/{job}/events", headers=h, stream=True, timeout=120) as events:
        for line in events.iter_lines(decode_unicode=True):
            if line.startswith("data:"):
                seen.append(line)
                if any(f'"status": "{s}"' in line for s in ("completed", "error", "cancelled")):
                    break
    result = requests.get(f"{server.url}/v1/jobs/{job}/result", headers=h, timeout=10)
    assert result.status_code == 200, (seen, result.text)
    body = result.json()
    return decode_values(body["values"], body["tensors"])["logits"], "\n".join(seen)


def wait_for(server, wanted, timeout=30):
    deadline = time.monotonic() + timeout
    while statuses(server) != wanted:
        assert time.monotonic() < deadline, statuses(server)
        time.sleep(0.1)


def test_models_start_cold_and_load_on_first_request(server):
    assert statuses(server) == {"a": "cold", "b": "cold"}
    cold = requests.get(server.url + "/v1/models/a", timeout=10).json()  # known from the folder, not loaded
    assert cold["status"] == "cold" and cold["config"]["n_layer"] == 2
    assert "vocab.json" in requests.get(server.url + "/v1/models/a/tokenizer", timeout=10).json()["files"]
    assert statuses(server) == {"a": "cold", "b": "cold"}
    assert requests.get(server.url + "/health", timeout=10).json()["status"] == "ok"
    logits, events = run(server, "a")
    assert logits.shape[:2] == (1, 1)
    assert "model cold" in events or "model loading" in events  # the wait was streamed with its reason
    assert statuses(server) == {"a": "ready", "b": "cold"}


def test_the_least_recently_used_model_is_unloaded_over_the_budget(server):
    first, _ = run(server, "a")
    other, _ = run(server, "b")
    wait_for(server, {"a": "cold", "b": "ready"})
    again, _ = run(server, "a")  # reloaded on demand, same weights, same answer
    assert torch.equal(again, first)
    wait_for(server, {"a": "ready", "b": "cold"})
    metrics = requests.get(server.url + "/metrics", timeout=10).text
    assert 'nnsight_model_unloads_total{model="a"} 1' in metrics and 'nnsight_model_unloads_total{model="b"} 1' in metrics
