"""The edge's disk tier: a byte-bounded LRU of block files below the memory tier.

Blocks are written with kvcdn.store.blockstore (atomic: temp file, fsync, rename) and only counted once the
write is complete; every read re-checks the frame digests, and a block that fails is deleted and
reported as a miss, so the edge pulls it again and no client ever sees it. On start the index is
rebuilt from the files present (oldest first, so the LRU order survives a restart), dropping partial
or malformed files and anything over the byte budget. The origin's ServerInfo is kept beside the
blocks, so a restarted edge can serve what it holds while the origin is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from kvcdn.errors import DigestMismatch, NotFound
from kvcdn.store.blockstore import BlockStore
from kvcdn.store.files import atomic_write
from kvcdn.store.lru import ByteLRU
from kvcdn.v1 import kvcdn_pb2 as pb
from kvcdn.wire.frames import EncodedBlock, encode_stored, frame_parts

__all__ = ["DiskTier"]

log = logging.getLogger(__name__)


class DiskTier:
    """Block files under `root`, at most `max_bytes` of them, least recently used evicted first."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.store = BlockStore(root / "blocks")
        self._info_path = root / "origin-info.pb"
        self.index: ByteLRU[bytes, int] = ByteLRU(max_bytes, lambda size: size, self._evicted)
        self.hits = 0
        self.misses = 0
        self.corrupt = 0
        files = sorted(self.store.files(), key=lambda f: f.mtime)
        for f in files:
            if not self.index.put(f.key, f.size):
                self.store.delete(f.key)
        self.index.evictions = 0  # trimming an oversized folder on start is not traffic
        log.info("disk tier %s: %d blocks, %d bytes", root, len(self.index), self.index.bytes)

    def _evicted(self, key: bytes, size: int) -> None:
        self.store.delete(key)

    def __contains__(self, key: bytes) -> bool:
        return key in self.index

    def info(self, key: bytes) -> pb.BlockInfo | None:
        return self.store.info(key) if key in self.index else None

    async def get(self, key: bytes) -> EncodedBlock | None:
        """The block, verified and encoded, or None (absent, or corrupt and now deleted)."""
        if key not in self.index:
            self.misses += 1
            return None
        try:
            info, payload, frame_bytes = await asyncio.to_thread(self.store.get, key)
        except (DigestMismatch, NotFound) as exc:
            if isinstance(exc, DigestMismatch):
                self.corrupt += 1
                log.warning("disk tier: %s", exc)
            self.index.pop(key)
            self.misses += 1
            return None
        self.index.get(key)  # most recently used
        self.hits += 1
        return encode_stored(info, payload, frame_bytes)

    async def put(self, block: EncodedBlock, frame_bytes: int) -> None:
        """Write a block (already verified) and count it once the file is complete."""
        key = block.info.key
        if key in self.index:
            return
        payload = [frame_parts(f)[1] for f in block.frames]
        size = await asyncio.to_thread(self.store.put, block.info, payload, frame_bytes)
        if not self.index.put(key, size):
            self.store.delete(key)  # larger than the whole tier: not admitted

    def save_origin_info(self, info: pb.ServerInfo) -> None:
        atomic_write(self._info_path, info.SerializeToString())

    def load_origin_info(self) -> pb.ServerInfo | None:
        with contextlib.suppress(Exception):  # absent, unreadable or not a ServerInfo
            return pb.ServerInfo.FromString(self._info_path.read_bytes())
        return None
