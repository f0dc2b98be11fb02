"""Counters and summaries the server keeps, rendered as Prometheus text for ``GET /metrics``.

    metrics = Metrics()
    metrics.inc("nnsight_jobs_submitted_total")
    metrics.observe("nnsight_queue_wait_seconds", 0.004)
    metrics.observe("nnsight_batch_size", 3, model="tiny")
    text = metrics.render(gauges=[("nnsight_queue_depth", {"model": "tiny"}, 0)])

Label sets are fixed by the code (model names, statuses), so the tables stay small.
"""

from __future__ import annotations

import collections
import threading


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.counters = collections.Counter()
        self.summaries = {}  # (name, labels) -> [sum, count, max]

    def inc(self, name, amount=1, **labels):
        with self.lock:
            self.counters[(name, tuple(sorted(labels.items())))] += amount

    def observe(self, name, value, **labels):
        key = (name, tuple(sorted(labels.items())))
        with self.lock:
            entry = self.summaries.setdefault(key, [0.0, 0, 0.0])
            entry[0] += value
            entry[1] += 1
            entry[2] = max(entry[2], value)

    def summary(self, name, **labels):
        """``(sum, count, max)`` of one summary (zeros when nothing was observed)."""
        with self.lock:
            return tuple(self.summaries.get((name, tuple(sorted(labels.items()))), (0.0, 0, 0.0)))

    def render(self, gauges=()) -> str:
        lines = []
        typed = set()

        def emit(kind, name, labels, value):
            if name not in typed:
                typed.add(name)
                lines.append(f"# TYPE {name} {kind}")
            label = ",".join(f'{k}="{v}"' for k, v in labels)
            lines.append(f"{name}{{{label}}} {value}" if label else f"{name} {value}")

        for name, labels, value in gauges:
            emit("gauge", name, sorted(labels.items()), value)
        with self.lock:
            for (name, labels), (total, count, peak) in sorted(self.summaries.items()):
                if name not in typed:
                    typed.add(name)
                    lines.append(f"# TYPE {name} summary")
                label = ",".join(f'{k}="{v}"' for k, v in labels)
                braces = f"{{{label}}}" if label else ""
                lines.append(f"{name}_sum{braces} {total:.6f}")
                lines.append(f"{name}_count{braces} {count}")
                lines.append(f"{name}_max{braces} {peak:.6f}")
            for (name, labels), value in sorted(self.counters.items()):
                emit("counter", name, labels, value)
        return "\n".join(lines) + "\n"
