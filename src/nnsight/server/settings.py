"""What one server instance is configured with (``nnsight serve`` flags map onto these fields).

    settings = Settings(models=["tiny=/models/tiny"], result_ttl=3600, max_batch=8)
    app = create_app(settings)

Fields are documented next to their defaults below; ``limits()`` is the part a worker process gets.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

CO_BATCH_MODES = ("any", "per-key", "off")


def default_data_dir() -> Path:
    return Path(os.environ.get("NNSIGHT_SERVER_DIR") or Path.home() / ".local" / "share" / "nnsight-server")


@dataclass
class Settings:
    models: list = field(default_factory=list)
    data_dir: Path = field(default_factory=default_data_dir)
    job_timeout: float = 60.0  # seconds of run time per job (per batch when co-batched)
    memory_mb: int | None = None  # address-space limit of a worker process (None: sized from model and machine; 0: none)
    max_body_bytes: int = 32 << 20  # a request body
    max_tensor_bytes: int = 16 << 20  # the tensors of one request
    max_result_bytes: int = 64 << 20  # the saved values of one job
    max_print: int = 65536  # characters of print output per job
    rate_limit: int = 120  # job submissions per key per minute
    max_concurrent: int = 4  # queued + running jobs per key
    max_queue: int = 256
    threads: int = 1  # torch threads per worker
    weights_every: int = 1  # check the weights' checksum every N jobs (0: never)
    result_ttl: float = 24 * 3600.0  # seconds a finished job (status, events, result) is kept
    co_batch: str = "any"  # which queued trace and generate requests may share one forward: any, per-key, off
    max_batch: int = 8  # requests in one co-batched forward
    batch_wait_ms: float = 2.0  # how long a batch waits for more batch-mates once others are queued
    lazy: bool = False  # load each model on its first request instead of at start
    memory_budget_gb: float = 0.0  # with lazy: unload least recently used models to stay under this (0: no budget)
    ray: str | None = None  # run replicas as Ray actors: a cluster address, or "local" (None: worker processes here)
    ray_cpus: int | None = None  # CPUs of a local Ray instance (None: all)
    replicas: dict = field(default_factory=dict)  # model name -> replicas on Ray (default 1)
    replica_gpus: float = 0.0  # GPUs each Ray replica declares
    replica_memory_gb: float = 0.0  # memory each Ray replica declares (0: none declared)
    isolate: bool = True  # drop network/user/syscalls in workers where the machine allows (see isolation.py)

    def __post_init__(self):
        if self.co_batch not in CO_BATCH_MODES:
            raise ValueError(f"co_batch must be one of {', '.join(CO_BATCH_MODES)}, not {self.co_batch!r}")
        if self.max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if self.batch_wait_ms < 0:
            raise ValueError("batch_wait_ms must not be negative")
        if self.ray is not None and self.lazy:
            raise ValueError("--lazy is not available with --ray yet: Ray replicas are loaded at start")
        if self.result_ttl <= 0:
            raise ValueError("result_ttl must be positive")

    def limits(self) -> dict:
        return {
            "job_timeout": self.job_timeout, "memory_mb": self.memory_mb, "max_tensor_bytes": self.max_tensor_bytes,
            "max_result_bytes": self.max_result_bytes, "max_print": self.max_print, "threads": self.threads,
            "weights_every": self.weights_every, "isolate": self.isolate, "max_batch": self.max_batch,
        }
