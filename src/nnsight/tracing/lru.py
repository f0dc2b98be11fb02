"""A bounded map that drops its least recently used entry: the engine's caches use it.

    cache = LRU(limit=512)
    value = cache.get(key)             # None when absent; a hit counts as a use
    cache.put(key, value)              # the oldest entry goes once there are more than ``limit``
    cache.drop(lambda key: ...)        # remove every entry whose key matches

A process that runs for weeks (a notebook, a server) meets ever new call sites and
functions; an evicted entry is simply rebuilt when next needed. Not locked: the owner
holds its own lock around a get-or-build.
"""

from __future__ import annotations

from collections import OrderedDict


class LRU:
    def __init__(self, limit: int):
        self.limit = limit
        self._items: OrderedDict = OrderedDict()

    def __len__(self):
        return len(self._items)

    def __iter__(self):
        return iter(self._items)

    def get(self, key):
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key, value):
        self._items[key] = value
        if len(self._items) > self.limit:
            self._items.popitem(last=False)
        return value

    def drop(self, matches):
        for key in [k for k in self._items if matches(k)]:
            del self._items[key]
