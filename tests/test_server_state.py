"""Server-side state stays bounded: jobs are dropped after --result-ttl; the queue is fair across keys."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")

from nnsight.server.auth import RateLimiter  # noqa: E402
from nnsight.server.hub import JobHub  # noqa: E402
from nnsight.server.metrics import Metrics  # noqa: E402
from nnsight.server.queue import JobQueue  # noqa: E402
from nnsight.server.settings import Settings  # noqa: E402
from nnsight.server.store import JobStore  # noqa: E402


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def make_hub(tmp_path, ttl=60.0):
    settings = Settings(models=["m"], data_dir=tmp_path, result_ttl=ttl)
    clock = Clock()
    jobs = JobStore(tmp_path / "db.sqlite")
    return JobHub(settings, jobs, JobQueue(["m"], 10_000), Metrics(), clock=clock), jobs, clock


def run_job(hub, job_id, key="k"):
    hub.submit(job_id, key, "m", {"source": "x"})
    assert hub.queue.get("m", timeout=0) == job_id
    assert hub.take_request(job_id) == {"source": "x"}
    hub.running(job_id)
    hub.log(job_id, "printed\n")
    hub.done(job_id, {"a": 1}, None)


def test_finished_jobs_are_dropped_after_the_retention_time(tmp_path):
    hub, jobs, clock = make_hub(tmp_path, ttl=60)
    run_job(hub, "j1")
    assert jobs.get("j1")["status"] == "completed" and (hub.results_dir / "j1.json").is_file()
    clock.now += 59
    assert hub.sweep() == 0 and jobs.get("j1") is not None and hub.events_since("j1", 0)
    clock.now += 2
    assert hub.sweep() == 1
    assert jobs.get("j1") is None and not (hub.results_dir / "j1.json").exists() and hub.events_since("j1", 0) == []


def test_memory_stays_flat_over_many_jobs(tmp_path):
    hub, jobs, clock = make_hub(tmp_path, ttl=10)
    for i in range(2000):
        run_job(hub, f"j{i}", key=f"k{i % 7}")
        clock.now += 0.1  # 100 jobs finish within one retention time
    sizes = hub.sizes()
    assert sizes["events"] <= 101 and sizes["finished"] <= 101
    assert sizes["requests"] == sizes["owners"] == sizes["active_keys"] == sizes["listeners"] == 0
    assert jobs.count() <= 101 and len(list(hub.results_dir.iterdir())) <= 101
    assert hub.metrics.summary("nnsight_queue_wait_seconds")[1] == 2000


def test_a_restarted_server_expires_the_previous_process_jobs(tmp_path):
    hub, jobs, clock = make_hub(tmp_path, ttl=60)
    run_job(hub, "old")
    run_job(hub, "recent")
    import time

    wall = time.time()
    jobs.db.execute("UPDATE jobs SET updated = ? WHERE id = 'old'", (wall - 120,))
    fresh, _, _ = make_hub(tmp_path, ttl=60)
    fresh.adopt_finished(jobs.finished_jobs(), wall)
    assert jobs.get("old") is None and not (fresh.results_dir / "old.json").exists()
    assert jobs.get("recent")["status"] == "completed"


def test_listeners_are_woken_and_removed(tmp_path):
    hub, _, _ = make_hub(tmp_path)
    woken = []
    stop = hub.listen("j", lambda: woken.append(1))
    run_job(hub, "j")
    assert len(woken) == len(hub.events_since("j", 0)) == 5  # received, queued, running, log, completed
    stop()
    assert hub.sizes()["listeners"] == 0


def test_queue_serves_keys_round_robin_and_reports_positions():
    queue = JobQueue(["m"], 100)
    for i in range(4):
        queue.put("m", f"a{i}", "alice")
    assert queue.put("m", "b0", "bob") == 1  # bob's only job is second in line, not fifth
    assert [queue.position(j) for j in ("a0", "b0", "a1")] == [0, 1, 2]
    assert [queue.get("m", timeout=0) for _ in range(2)] == ["a0", "b0"]
    assert queue.take("m", 10, key="bob") == []
    assert queue.take("m", 2) == ["a1", "a2"]
    assert queue.remove("a3") and len(queue) == 0 and queue.get("m", timeout=0) is None


def test_queue_is_bounded():
    queue = JobQueue(["m"], 2)
    queue.put("m", "x", "k")
    queue.put("m", "y", "k")
    with pytest.raises(OverflowError):
        queue.put("m", "z", "k")


def test_rate_limiter_forgets_idle_keys():
    clock = Clock()
    limiter = RateLimiter(2, clock=clock)
    assert limiter.allow("a") and limiter.allow("a") and not limiter.allow("a")
    for i in range(100):
        limiter.allow(f"key{i}")
    clock.now += 61
    assert limiter.allow("a") and len(limiter.hits) == 1


def test_settings_refuse_bad_values(tmp_path):
    for bad in ({"co_batch": "sometimes"}, {"max_batch": 0}, {"batch_wait_ms": -1}, {"result_ttl": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            Settings(data_dir=tmp_path, **bad)
