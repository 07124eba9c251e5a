"""The edge's disk tier: a byte-bounded LRU of block files below the memory tier (a kvcdn.edge.tiers.Tier).

Blocks are written with kvcdn.store.blockstore (atomic: temp file, fsync, rename) and only counted once
the write is complete; every read re-checks the frame digests, and a block that fails is deleted and
reported as a miss, so the edge pulls it again and no client ever sees it. On start the index is
rebuilt from the files present (oldest first, so the LRU order survives a restart), dropping partial
or malformed files and anything over the byte budget.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from kvcdn.edge.tiers import TierStats
from kvcdn.errors import DigestMismatch, NotFound
from kvcdn.store.blockstore import BlockStore
from kvcdn.store.lru import ByteLRU
from kvcdn.v1 import kvcdn_pb2 as pb
from kvcdn.wire.frames import EncodedBlock, encode_stored
from kvcdn.wire.metrics import EdgeMetrics

__all__ = ["DiskTier"]

log = logging.getLogger(__name__)


class DiskTier:
    """Block files under `root`, at most `max_bytes` of them, least recently used evicted first."""

    metrics = EdgeMetrics.DISK

    def __init__(self, root: Path, max_bytes: int) -> None:
        self._store = BlockStore(root / "blocks")
        # key -> file size; evicting a key deletes its file
        self._index: ByteLRU[bytes, int] = ByteLRU(max_bytes, lambda size: size, self._evicted)
        self.hits = 0
        self.misses = 0
        self.corrupt = 0
        for f in sorted(self._store.files(), key=lambda f: f.mtime):
            if not self._index.put(f.key, f.size):
                self._store.delete(f.key)
        self._index.evictions = 0  # trimming an oversized folder on start is not traffic
        log.info("disk tier %s: %d blocks, %d bytes", root, len(self._index), self._index.bytes)

    def _evicted(self, key: bytes, size: int) -> None:
        self._store.delete(key)

    def __contains__(self, key: bytes) -> bool:
        return key in self._index

    @property
    def removed_temporaries(self) -> int:
        """Files interrupted writes had left, deleted when the tier opened."""
        return self._store.removed_temporaries

    def path(self, key: bytes) -> Path:
        """Where the block's file lives (whether or not it is held)."""
        return self._store.path(key)

    def held(self) -> list[bytes]:
        """The keys of the blocks held, least recently used first."""
        return self._index.keys()

    def info(self, key: bytes) -> pb.BlockInfo | None:
        return self._store.info(key) if key in self._index else None

    async def get(self, key: bytes) -> EncodedBlock | None:
        """The block, verified and encoded, or None (absent, or corrupt and now deleted)."""
        if key not in self._index:
            self.misses += 1
            return None
        try:
            info, payload, frame_bytes = await asyncio.to_thread(self._store.get, key)
        except (DigestMismatch, NotFound) as exc:
            if isinstance(exc, DigestMismatch):
                self.corrupt += 1
                log.warning("disk tier: %s", exc)
            self._index.pop(key)
            self.misses += 1
            return None
        self._index.get(key)  # most recently used
        self.hits += 1
        return encode_stored(info, payload, frame_bytes)

    async def put(self, block: EncodedBlock) -> bool:
        """Write a block (already verified) and count it once the file is complete."""
        key = block.info.key
        if key in self._index:
            return True
        size = await asyncio.to_thread(self._store.put, block.info, block.payloads(), block.frame_bytes)
        if not self._index.put(key, size):
            self._store.delete(key)  # larger than the whole tier: not admitted
            return False
        return True

    def drop(self, key: bytes) -> bool:
        held = self._index.pop(key) is not None
        self._store.delete(key)
        return held

    def stats(self) -> TierStats:
        i = self._index
        return TierStats(self.hits, self.misses, i.evictions, self.corrupt, i.bytes, i.max_bytes, len(i))
