"""A byte-bounded LRU map, used for the origin's read cache and the edge's memory tier."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["ByteLRU"]

K = TypeVar("K")
V = TypeVar("V")


class ByteLRU(Generic[K, V]):
    """Least-recently-used map whose values' sizes never add up to more than `max_bytes`.

    Admission rule: a value larger than `max_bytes` is not stored at all (it would evict everything
    else and still not fit).
    """

    def __init__(
        self, max_bytes: int, size_of: Callable[[V], int], on_evict: Callable[[K, V], None] | None = None
    ) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = max_bytes
        self._size_of = size_of
        self._on_evict = on_evict
        self._items: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self.bytes = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: K) -> bool:
        return key in self._items

    def get(self, key: K) -> V | None:
        """The value for `key`, marking it most recently used; None when absent."""
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    def peek(self, key: K) -> V | None:
        """The value for `key` without marking it used; None when absent."""
        item = self._items.get(key)
        return item[0] if item is not None else None

    def keys(self) -> list[K]:
        """The keys held, least recently used first."""
        return list(self._items)

    def put(self, key: K, value: V) -> bool:
        """Store `value`, evicting least recently used entries; False if it was not admitted."""
        size = self._size_of(value)
        if size > self.max_bytes:
            return False
        self.pop(key)
        while self.bytes + size > self.max_bytes:
            old_key, (old_value, old) = self._items.popitem(last=False)
            self.bytes -= old
            self.evictions += 1
            if self._on_evict is not None:
                self._on_evict(old_key, old_value)
        self._items[key] = (value, size)
        self.bytes += size
        return True

    def pop(self, key: K) -> V | None:
        item = self._items.pop(key, None)
        if item is None:
            return None
        self.bytes -= item[1]
        return item[0]
