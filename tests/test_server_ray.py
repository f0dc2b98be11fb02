"""Ray mode (--ray): replicas as Ray actors on a local Ray instance (127.0.0.1, 2 CPUs), a killed replica replaced."""

from __future__ import annotations

import signal
import time

import pytest

pytest.importorskip("ray")
requests = pytest.importorskip("requests")
psutil = pytest.importorskip("psutil")
torch = pytest.importorskip("torch")

from nnsight.remote.serialize import decode_values  # noqa: E402
from conftest import served_tiny_gpt2  # noqa: E402

MODEL = {"$t": "envoy", "path": "model"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from served_tiny_gpt2(tmp_path_factory, "ray", ["--ray", "--ray-cpus", "2", "--replicas", "tiny=2",
                                "--job-timeout", "20", "--max-concurrent", "16"], timeout=240)


def submit(server, source, prompt="Hello"):
    req = {"model": "tiny", "kind": "trace", "source": source, "body_lineno": 2, "inputs": [prompt], "variables": {"model": MODEL}}
    r = requests.post(server.url + "/v1/jobs", json=req, headers={"X-API-Key": server.key}, timeout=10)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def wait(server, job, timeout=120):
    h = {"X-API-Key": server.key}
    deadline = time.monotonic() + timeout
    while True:
        state = requests.get(f"{server.url}/v1/jobs/{job}", headers=h, timeout=10).json()
        if state["status"] in ("completed", "error", "cancelled"):
            return state
        assert time.monotonic() < deadline, state
        time.sleep(0.05)


def result(server, job):
    body = requests.get(f"{server.url}/v1/jobs/{job}/result", headers={"X-API-Key": server.key}, timeout=10).json()
    return decode_values(body["values"], body["tensors"])


def replica_processes(server):
    return [p for p in psutil.Process(server.proc.pid).children(recursive=True)
            if "ModelReplica" in " ".join(p.cmdline() if p.is_running() else [])]


def test_replicas_serve_jobs_with_prints_and_errors(server):
    models = requests.get(server.url + "/v1/models", timeout=10).json()
    assert models[0]["status"] == "ready" and models[0]["replicas"] == 2
    jobs = [submit(server, f"    print('job', {i})\n    out = model.lm_head.output.save()\n") for i in range(6)]
    states = [wait(server, j) for j in jobs]
    assert [s["status"] for s in states] == ["completed"] * 6
    assert [s["stdout"] for s in states] == [f"job {i}\n" for i in range(6)]
    assert result(server, jobs[0])["out"].shape[:2] == (1, 1)
    bad = wait(server, submit(server, "    x = 1 / 0\n"))
    assert bad["status"] == "error" and bad["error"]["type"] == "ZeroDivisionError"
    assert len(replica_processes(server)) == 2


def test_a_killed_replica_fails_its_job_and_is_replaced(server):
    looping = submit(server, "    while True:\n        pass\n")
    h = {"X-API-Key": server.key}
    deadline = time.monotonic() + 60
    while requests.get(f"{server.url}/v1/jobs/{looping}", headers=h, timeout=10).json()["status"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    killed = replica_processes(server)
    assert len(killed) == 2
    for process in killed:  # the one running the job among them
        process.send_signal(signal.SIGKILL)
    state = wait(server, looping)
    assert state["status"] == "error" and "replica running the job died" in state["error"]["message"]
    ok = wait(server, submit(server, "    out = model.lm_head.output.save()\n"))
    assert ok["status"] == "completed"
    deadline = time.monotonic() + 120
    while len(replica_processes(server)) != 2:  # both replaced
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert {p.pid for p in replica_processes(server)}.isdisjoint({p.pid for p in killed})
    assert "nnsight_worker_restarts_total" in requests.get(server.url + "/metrics", timeout=10).text


def test_cancel_a_running_job_replaces_its_replica(server):
    h = {"X-API-Key": server.key}
    job = submit(server, "    while True:\n        pass\n")
    deadline = time.monotonic() + 60
    while requests.get(f"{server.url}/v1/jobs/{job}", headers=h, timeout=10).json()["status"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    before = {p.pid for p in replica_processes(server)}
    requests.delete(f"{server.url}/v1/jobs/{job}", headers=h, timeout=10)
    assert wait(server, job)["status"] == "cancelled"
    assert wait(server, submit(server, "    out = model.lm_head.output.save()\n"))["status"] == "completed"
    deadline = time.monotonic() + 120
    while len(replica_processes(server)) != 2:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert len({p.pid for p in replica_processes(server)} - before) == 1  # the cancelled one's replica was replaced
