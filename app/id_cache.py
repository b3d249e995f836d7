"""A thread-safe LRU of rows by image id, filled from the store in one query per call."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")


class IdCache(Generic[T]):
    """``get_many(ids)``: the cached values of ``ids``, the missing ones fetched together by ``fetch`` (which may
    leave out ids it does not know: they get ``default``, or stay absent when there is none)."""

    def __init__(
        self, fetch: Callable[[Sequence[int]], Mapping[int, T]], capacity: int, default: T | None = None
    ) -> None:
        self.fetch = fetch
        self.capacity = capacity
        self.default = default
        self._items: OrderedDict[int, T] = OrderedDict()
        self._lock = threading.Lock()

    def get_many(self, ids: Sequence[int]) -> dict[int, T]:
        found: dict[int, T] = {}
        with self._lock:
            for i in ids:
                value = self._items.get(i)
                if value is not None:
                    found[i] = value
        missing = [i for i in ids if i not in found]
        if missing:
            fetched = dict(self.fetch(missing))
            if self.default is not None:
                fetched = {i: fetched.get(i, self.default) for i in missing}
            found.update(fetched)
            with self._lock:
                self._items.update(fetched)
                while len(self._items) > self.capacity:
                    self._items.popitem(last=False)
        return found

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
