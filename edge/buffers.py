"""Block buffers an edge reuses: each load from a peer or the origin lands in one buffer the size of a
whole block (kvcdn.edge.pulls), leased from a pool of such buffers that the edge keeps for its life.

Why a pool: a block the memory tier evicts goes back to the pool when the last reference to its frames
is gone (the tier's, a stream's, a pull's: the garbage collector tells, so nothing is given back
while anyone still sends from it), and the next load writes into pages that are already mapped. Left
to malloc, the same memory is freed, trimmed back to the system (kvcdn.tuning.trim_after_frees, which
bounds what floods leave behind) and faulted in again page by page on the next load: a cold pull
through an edge cost 0.165 s and 0.170 CPU-seconds with that, 0.108 and 0.110 without the trim.
The pool is bounded (`max_bytes`, the memory tier plus the pinned-bytes budget: what an edge holds
at most by design); a load past it gets a buffer of its own, freed as before.
"""

from __future__ import annotations

import gc
import threading
import time
import weakref

import numpy as np

__all__ = ["BlockBuffers"]


class BlockBuffers:
    """Buffers of `slot_bytes` (a whole block's encoded frames), at most `max_bytes` of them, each
    leased out as a view and back in the pool once that view and everything cut from it are gone.
    Leasing is thread-safe (loads land in worker threads); a view may die in any thread."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._slot_bytes = 0
        self._slots = 0
        """Buffers the pool has allocated (free or leased) for the current `_slot_bytes`."""
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()
        self._collected_at = 0.0
        self.collections = 0
        self.leased_from_pool = 0
        self.allocated = 0
        """Leases the pool could not serve (larger than a slot, or every slot leased): fresh buffers."""

    def lease(self, n_bytes: int, slot_bytes: int) -> np.ndarray:
        """A writable uint8 buffer of `n_bytes` (contents undefined), from the pool when it fits in a
        slot of `slot_bytes` (the largest block the origin's geometry makes; a new size starts a new
        pool, the old slots freed as their leases end)."""
        slot, grow = None, False
        with self._lock:  # a view's finalizer only appends to `free` (atomic), never takes the lock
            if slot_bytes != self._slot_bytes:
                self._slot_bytes, self._slots, self._free = slot_bytes, 0, []
            free = self._free
            if n_bytes <= slot_bytes:
                if free:
                    slot = free.pop()
                elif (self._slots + 1) * slot_bytes <= self.max_bytes:
                    self._slots, grow = self._slots + 1, True
        if grow:
            slot = np.empty(slot_bytes, dtype=np.uint8)
        elif slot is None and n_bytes <= slot_bytes and self._collect():
            try:
                slot = free.pop()
            except IndexError:
                slot = None
        if slot is None:
            self.allocated += 1
            return np.empty(n_bytes, dtype=np.uint8)
        self.leased_from_pool += 1
        view = slot[:n_bytes]
        weakref.finalize(view, free.append, slot)  # the pool it came from, even if a new one started since
        return view

    def _collect(self) -> bool:
        """Every slot is leased: collect garbage (at most once a second), since leases that reference
        cycles keep alive (a cancelled stream's traceback holds its blocks) wait for the collector."""
        now = time.monotonic()
        if now - self._collected_at < 1.0:
            return False
        self._collected_at = now
        gc.collect()
        self.collections += 1
        return True

    @property
    def pooled_bytes(self) -> int:
        """Bytes of buffers the pool has allocated (leased or free)."""
        return self._slots * self._slot_bytes
