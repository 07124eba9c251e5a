"""The edge's tiers behind one interface: memory here, disk in kvcdn.edge.disk.

An edge asks its tiers in order (fastest first) before it loads a block from a peer or the origin,
and offers a loaded block to every tier above the one it came from, as the admission rule allows
(kvcdn.edge.admission). A tier counts its own hits, misses and evictions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from kvcdn.store.lru import ByteLRU
from kvcdn.v1 import kvcdn_pb2 as pb
from kvcdn.wire.frames import EncodedBlock
from kvcdn.wire.metrics import EdgeMetrics, Stat, TierMetrics

__all__ = ["MemoryTier", "Tier", "TierStats"]


@dataclass(frozen=True)
class TierStats:
    """A tier's counters and occupancy."""

    hits: int
    misses: int
    evictions: int
    corrupt: int
    """Blocks that failed their digests when read (dropped, reported as misses)."""
    bytes: int
    max_bytes: int
    blocks: int


def tier_stats(tier: Tier) -> list[Stat]:
    """A tier's counters, for kvcdn.wire.metrics."""
    s, m = tier.stats(), tier.metrics
    return [
        (m.hits, s.hits),
        (m.misses, s.misses),
        (m.evictions, s.evictions),
        (m.corrupt, s.corrupt),
        (m.bytes, s.bytes),
        (m.blocks, s.blocks),
    ]


class Tier(Protocol):
    """Where an edge keeps blocks."""

    metrics: TierMetrics
    """Its metric names (kvcdn.wire.metrics); `metrics.tier` is the tier's name."""

    def __contains__(self, key: bytes) -> bool: ...

    def info(self, key: bytes) -> pb.BlockInfo | None:
        """The held block's info (no payload read, no hit counted), or None."""
        ...

    async def get(self, key: bytes) -> EncodedBlock | None:
        """The block, verified and encoded, marked most recently used; None when absent."""
        ...

    async def put(self, block: EncodedBlock) -> bool:
        """Keep a verified block, evicting least recently used ones; False when it is larger than the
        tier's whole budget (not kept)."""
        ...

    def drop(self, key: bytes) -> bool:
        """Forget the block; True if it was held."""
        ...

    def stats(self) -> TierStats: ...


class MemoryTier:
    """Encoded blocks in a byte-bounded LRU, ready to send without a copy."""

    metrics = EdgeMetrics.MEMORY

    def __init__(self, max_bytes: int) -> None:
        self._lru: ByteLRU[bytes, EncodedBlock] = ByteLRU(max_bytes, lambda b: b.n_bytes)
        self.hits = 0
        self.misses = 0

    def __contains__(self, key: bytes) -> bool:
        return key in self._lru

    def info(self, key: bytes) -> pb.BlockInfo | None:
        block = self._lru.peek(key)
        return block.info if block is not None else None

    async def get(self, key: bytes) -> EncodedBlock | None:
        block = self._lru.get(key)
        if block is None:
            self.misses += 1
        else:
            self.hits += 1
        return block

    async def put(self, block: EncodedBlock) -> bool:
        return self._lru.put(block.info.key, block)

    def drop(self, key: bytes) -> bool:
        return self._lru.pop(key) is not None

    def stats(self) -> TierStats:
        lru = self._lru
        return TierStats(self.hits, self.misses, lru.evictions, 0, lru.bytes, lru.max_bytes, len(lru))
