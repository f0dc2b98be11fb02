"""The job queue: per served model, one FIFO per API key, served round-robin across keys.

    queue = JobQueue(["tiny"], max_size=256)
    queue.put("tiny", job_id, key_id)        # -> position (0 = next)
    first = queue.get("tiny", timeout=0.5)   # the next job (None on timeout or close)
    mates = queue.take("tiny", 7, key=None)  # up to 7 more queued jobs right now (co-batching)

A key that queues many jobs does not delay another key's single job by more than one
turn. ``put/get/take/remove/position`` are all the server uses; a distributed queue
would implement the same methods.
"""

from __future__ import annotations

import collections
import threading


class _ModelQueue:
    def __init__(self):
        self.by_key = collections.OrderedDict()  # key id -> deque of job ids; rotation order
        self.size = 0

    def order(self):
        """Job ids in the order they will be served."""
        lanes = [list(q) for q in self.by_key.values()]
        out = []
        depth = 0
        while len(out) < self.size:
            out.extend(lane[depth] for lane in lanes if depth < len(lane))
            depth += 1
        return out

    def pop(self, key=None):
        if key is not None:
            lane = self.by_key.get(key)
            if not lane:
                return None
            job = lane.popleft()
            if not lane:
                del self.by_key[key]
            self.size -= 1
            return job
        for key, lane in self.by_key.items():
            job = lane.popleft()
            del self.by_key[key]
            if lane:  # this key's next job goes to the back of the rotation
                self.by_key[key] = lane
            self.size -= 1
            return job
        return None


class JobQueue:
    def __init__(self, models, max_size: int):
        self.max_size = max_size
        self._queues = {name: _ModelQueue() for name in models}
        self._keys = {}  # job id -> (model, key id)
        self._cond = threading.Condition()
        self.closed = False

    def put(self, model, job_id, key_id="") -> int:
        """Queue a job; returns its position (0 = next). Raises OverflowError when full."""
        with self._cond:
            if len(self._keys) >= self.max_size:
                raise OverflowError("the server's queue is full")
            queue = self._queues[model]
            queue.by_key.setdefault(key_id, collections.deque()).append(job_id)
            queue.size += 1
            self._keys[job_id] = (model, key_id)
            self._cond.notify_all()
            return queue.order().index(job_id)

    def get(self, model, timeout=None):
        """The next job for ``model`` (None on timeout or when closed)."""
        with self._cond:
            queue = self._queues[model]
            if not queue.size and not self.closed:
                self._cond.wait_for(lambda: queue.size or self.closed, timeout)
            if queue.size and not self.closed:
                job = queue.pop()
                del self._keys[job]
                return job
            return None

    def wait(self, model, count, timeout):
        """Wait up to ``timeout`` seconds until ``model`` has ``count`` queued jobs; returns how many it has."""
        with self._cond:
            queue = self._queues[model]
            self._cond.wait_for(lambda: queue.size >= count or self.closed, timeout)
            return queue.size

    def take(self, model, n, key=None) -> list:
        """Up to ``n`` more queued jobs of ``model`` (of API key ``key`` only, when given), without waiting."""
        out = []
        with self._cond:
            queue = self._queues[model]
            while len(out) < n and not self.closed:
                job = queue.pop(key)
                if job is None:
                    break
                del self._keys[job]
                out.append(job)
        return out

    def key_of(self, job_id):
        with self._cond:
            entry = self._keys.get(job_id)
            return None if entry is None else entry[1]

    def remove(self, job_id) -> bool:
        with self._cond:
            entry = self._keys.pop(job_id, None)
            if entry is None:
                return False
            model, key = entry
            queue = self._queues[model]
            lane = queue.by_key[key]
            lane.remove(job_id)
            if not lane:
                del queue.by_key[key]
            queue.size -= 1
            return True

    def position(self, job_id):
        with self._cond:
            entry = self._keys.get(job_id)
            if entry is None:
                return None
            return self._queues[entry[0]].order().index(job_id)

    def __len__(self):
        with self._cond:
            return len(self._keys)

    def depth(self, model):
        with self._cond:
            return self._queues[model].size

    def close(self):
        with self._cond:
            self.closed = True
            self._cond.notify_all()
