"""The edge's domain logic: a memory tier over the origin with single-flight misses. No gRPC here
beyond the client stub it pulls from the origin with."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Sequence

from kvcdn.client.reader import CacheReader
from kvcdn.edge.disk import DiskTier
from kvcdn.errors import DigestMismatch, NotFound, Unavailable
from kvcdn.frames import EncodedBlock, decode_frame, stream_blocks, verify_frame
from kvcdn.lru import ByteLRU
from kvcdn.metrics import Stat
from kvcdn.rpc import check_read_request
from kvcdn.singleflight import SingleFlight
from kvcdn.v1 import kvcdn_pb2 as pb

__all__ = ["Edge"]

log = logging.getLogger(__name__)

_KNOWN_INFOS = 65536
PREFETCH_BLOCKS = 4
"""Blocks an edge stream loads ahead of the one it is sending."""


class Edge:
    """Memory LRU of encoded blocks, over an optional disk tier, in front of one origin."""

    def __init__(self, origin: CacheReader, mem_bytes: int, disk: DiskTier | None = None) -> None:
        self.origin = origin
        self.memory: ByteLRU[bytes, EncodedBlock] = ByteLRU(mem_bytes, lambda b: b.n_bytes)
        self.disk = disk
        # Block infos the origin answered lookups with, so a pull needs no second lookup.
        self._origin_infos: ByteLRU[bytes, pb.BlockInfo] = ByteLRU(_KNOWN_INFOS, lambda _: 1)
        self._fetches: SingleFlight[EncodedBlock] = SingleFlight()
        self._origin_info: pb.ServerInfo | None = None
        self.origin_fetches = 0
        self.bytes_from_origin = 0
        self.hits = 0
        self.misses = 0
        self.bulk_port = 0
        """Port of this edge's bulk frame stream (set by the server once bound; 0: none)."""
        self.metrics_port = 0
        """Port of this edge's /metrics endpoint (set by the server once bound; 0: none)."""
        self.invalidated_seq = 0
        """Last invalidation event applied."""
        self.invalidated_blocks = 0
        self._follower: asyncio.Task[None] | None = None

    def start_following(self, retry_s: float = 1.0) -> None:
        """Follow the origin's invalidation feed in the background, from the start of the feed (so an
        edge that was down, or whose disk outlived it, catches up on everything it missed)."""
        self._follower = asyncio.create_task(self._follow(retry_s))

    async def _follow(self, retry_s: float) -> None:
        while True:
            try:
                async for event in self.origin.watch(self.invalidated_seq):
                    self.invalidate(event)
            except Unavailable as exc:
                log.debug("invalidation feed: %s; reconnecting", exc)
            except Exception:
                log.exception("invalidation feed failed; reconnecting")
            await asyncio.sleep(retry_s)

    async def catch_up(self, timeout_s: float) -> None:
        """Apply the origin's invalidation feed up to its current end before serving, so a restarted
        edge never serves a block purged while it was down; if the origin is unreachable the edge
        serves what it holds and catches up when the feed reconnects."""
        try:
            async with asyncio.timeout(timeout_s):
                target = (await self.origin.info()).invalidation_seq
                if self.invalidated_seq < target:
                    async for event in self.origin.watch(self.invalidated_seq):
                        self.invalidate(event)
                        if event.seq >= target:
                            break
        except (Unavailable, TimeoutError) as exc:
            log.warning("could not catch up on invalidations before serving (%s); serving what is held", exc)

    def invalidate(self, event: pb.InvalidationEvent) -> None:
        """Drop the event's blocks from every tier; they are never served again."""
        for key in event.keys:
            dropped = self.memory.pop(key) is not None
            self._origin_infos.pop(key)
            if self.disk is not None and key in self.disk:
                self.disk.index.pop(key)
                self.disk.store.delete(key)
                dropped = True
            self.invalidated_blocks += dropped
        self.invalidated_seq = event.seq

    async def close(self) -> None:
        """Stop following the feed and close the connection to the origin."""
        if self._follower is not None:
            self._follower.cancel()
            await asyncio.gather(self._follower, return_exceptions=True)
        await self.origin.close()

    def stats(self) -> list[Stat]:
        """The edge's counters, for kvcdn.metrics (read at scrape time)."""
        stats: list[Stat] = [
            ("edge_block_hits_memory_total", "counter", "Blocks served from the memory tier", self.hits),
            ("edge_block_misses_memory_total", "counter", "Blocks missing from the memory tier", self.misses),
            ("edge_origin_fetches_total", "counter", "Blocks pulled from the origin", self.origin_fetches),
            ("edge_bytes_from_origin_total", "counter", "Frame bytes pulled from the origin", self.bytes_from_origin),
            ("edge_evictions_memory_total", "counter", "Blocks evicted from the memory tier", self.memory.evictions),
            ("edge_memory_bytes", "gauge", "Bytes held by the memory tier", self.memory.bytes),
            ("edge_memory_blocks", "gauge", "Blocks held by the memory tier", len(self.memory)),
            ("edge_pulls_in_flight", "gauge", "Origin pulls in progress", len(self._fetches)),
            ("edge_invalidation_seq", "gauge", "Last invalidation event applied", self.invalidated_seq),
            ("edge_invalidated_blocks_total", "counter", "Blocks dropped by invalidations", self.invalidated_blocks),
        ]
        if self.disk is not None:
            d = self.disk
            stats += [
                ("edge_block_hits_disk_total", "counter", "Blocks served from the disk tier", d.hits),
                ("edge_block_misses_disk_total", "counter", "Blocks missing from the disk tier", d.misses),
                ("edge_evictions_disk_total", "counter", "Blocks evicted from the disk tier", d.index.evictions),
                ("edge_corrupt_disk_total", "counter", "Disk blocks that failed their digest (dropped)", d.corrupt),
                ("edge_disk_bytes", "gauge", "Bytes held by the disk tier", d.index.bytes),
                ("edge_disk_blocks", "gauge", "Blocks held by the disk tier", len(d.index)),
            ]
        return stats

    async def origin_info(self) -> pb.ServerInfo:
        """The origin's ServerInfo; from the disk tier's copy while the origin is unreachable."""
        if self._origin_info is None:
            try:
                self._origin_info = await self.origin.info()
            except Unavailable:
                saved = self.disk.load_origin_info() if self.disk is not None else None
                if saved is None:
                    raise
                return saved
            if self.disk is not None:
                self.disk.save_origin_info(self._origin_info)
        return self._origin_info

    async def info(self) -> pb.ServerInfo:
        info = pb.ServerInfo()
        info.CopyFrom(await self.origin_info())
        info.role = "edge"
        info.bulk_port = self.bulk_port
        info.metrics_port = self.metrics_port
        return info

    async def manifest(self, document: str, version: int) -> pb.Manifest:
        return await self.origin.manifest(document, version)

    async def lookup(self, fingerprint: str, keys: Sequence[bytes]) -> list[pb.BlockInfo]:
        check_read_request(fingerprint, (await self.origin_info()).fingerprint, keys)
        found: list[pb.BlockInfo] = []
        for key in keys:
            block = self.memory.get(key)
            info = block.info if block is not None else self.disk.info(key) if self.disk is not None else None
            if info is None:
                break
            found.append(info)
        if len(found) < len(keys):
            try:
                from_origin = await self.origin.lookup(fingerprint, keys[len(found) :])
                for info in from_origin:
                    self._origin_infos.put(info.key, info)
                found += from_origin
            except Unavailable:
                if not found:
                    raise
                log.warning("origin unreachable; answering the lookup from memory alone")
        return found

    async def block(self, fingerprint: str, key: bytes) -> EncodedBlock:
        cached = self.memory.get(key)
        if cached is not None:
            self.hits += 1
            return cached
        self.misses += 1
        return await self._fetches.do(key, lambda: self._load(fingerprint, key))

    async def _load(self, fingerprint: str, key: bytes) -> EncodedBlock:
        """A block missing from memory: from the disk tier, else from the origin (then kept on disk)."""
        block = await self.disk.get(key) if self.disk is not None else None
        if block is None:
            block = await self._pull(fingerprint, key)
            if self.disk is not None:
                await self.disk.put(block, (await self.origin_info()).geometry.frame_bytes)
        self.memory.put(key, block)
        return block

    async def _pull(self, fingerprint: str, key: bytes) -> EncodedBlock:
        """Fetch one block from the origin, verifying every frame before it is cached."""
        info = self._origin_infos.pop(key)
        if info is None:
            infos = await self.origin.lookup(fingerprint, [key])
            if not infos:
                raise NotFound(f"block {key.hex()[:16]}… is not stored at the origin")
            info = infos[0]
        frame_bytes = (await self.origin_info()).geometry.frame_bytes
        frames: list[bytes] = []
        async for raw in self.origin.stream(fingerprint, [key]):
            header, payload = decode_frame(raw)
            if header.frame_index != len(frames):
                raise DigestMismatch(f"origin sent frame {header.frame_index} out of order")
            verify_frame(info, frame_bytes, header, payload)
            frames.append(raw)
        if len(frames) != len(info.frame_digests):
            raise Unavailable(f"origin ended block {key.hex()[:16]}… after {len(frames)} frames")
        self.origin_fetches += 1
        self.bytes_from_origin += sum(len(f) for f in frames)
        return EncodedBlock(info=info, frames=tuple(frames))

    async def stream(self, fingerprint: str, keys: Sequence[bytes], start_frame: int) -> AsyncIterator[bytes]:
        """The frames of `keys` in order, loading up to PREFETCH_BLOCKS blocks ahead of the one being
        sent, so that pulls from disk or the origin overlap the stream instead of queueing behind it."""
        check_read_request(fingerprint, (await self.origin_info()).fingerprint, keys)
        ahead: deque[tuple[bytes, asyncio.Task[EncodedBlock]]] = deque()
        queued = iter(keys)

        def top_up() -> None:
            while len(ahead) < PREFETCH_BLOCKS and (key := next(queued, None)) is not None:
                ahead.append((key, asyncio.ensure_future(self.block(fingerprint, key))))

        async def next_block(key: bytes) -> EncodedBlock:
            top_up()
            loaded_key, task = ahead.popleft()
            assert loaded_key == key, "stream_blocks asks for keys in request order"
            block = await task
            top_up()
            return block

        try:
            async for frame in stream_blocks(keys, start_frame, next_block):
                yield frame
        finally:
            for _, task in ahead:
                task.cancel()
            await asyncio.gather(*(task for _, task in ahead), return_exceptions=True)
