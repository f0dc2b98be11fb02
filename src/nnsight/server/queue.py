"""The job queue: one FIFO per served model, behind a small interface.

``JobQueue.put/get/remove/position`` are all the server uses; a distributed queue
(Ray, Redis) or a co-batching scheduler that takes several compatible jobs at once
(``get_batch``) would replace this class.
"""

from __future__ import annotations

import collections
import threading


class JobQueue:
    def __init__(self, models, max_size: int):
        self.max_size = max_size
        self._queues = {name: collections.deque() for name in models}
        self._cond = threading.Condition()
        self.closed = False

    def put(self, model, job_id) -> int:
        """Queue a job; returns its position (0 = next). Raises OverflowError when full."""
        with self._cond:
            if len(self) >= self.max_size:
                raise OverflowError("the server's queue is full")
            queue = self._queues[model]
            queue.append(job_id)
            self._cond.notify_all()
            return len(queue) - 1

    def get(self, model, timeout=None):
        """The next job for ``model`` (None on timeout or when closed)."""
        with self._cond:
            queue = self._queues[model]
            if not queue and not self.closed:
                self._cond.wait_for(lambda: queue or self.closed, timeout)
            if queue and not self.closed:
                return queue.popleft()
            return None

    def remove(self, job_id) -> bool:
        with self._cond:
            for queue in self._queues.values():
                if job_id in queue:
                    queue.remove(job_id)
                    return True
            return False

    def position(self, job_id):
        with self._cond:
            for queue in self._queues.values():
                if job_id in queue:
                    return queue.index(job_id)
            return None

    def __len__(self):
        return sum(len(q) for q in self._queues.values())

    def depth(self, model):
        return len(self._queues[model])

    def close(self):
        with self._cond:
            self.closed = True
            self._cond.notify_all()
