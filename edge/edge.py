"""The edge's domain logic: a memory tier over a disk tier over the origin, with single-flight,
cut-through misses. No gRPC here beyond the client stub it pulls from the origin with.

A missing block is loaded once however many requests ask for it (a `Pull`): the first request starts
the pull, later ones join it, and every one of them streams each frame as soon as it has arrived and
passed its digest, not after the whole block has landed.

Peers: an edge that knows the ring (`join_ring`, from `--peers`) loads a block it does not own from
the block's owners in ring order, and a block it owns as a replica from the primary owner, before
the origin, resuming at the frame where a source broke. The primary, and any edge a peer asks, loads
from its tiers or the origin only, so no request goes round the ring, and the origin sends each
block once (to its primary) however many edges are asked for it.

Admission rule (both tiers): a loaded block is kept if the tier has room for it without evicting
anything, or if it is wanted more than once: several requests joined its load, or it was missed
before (the edge remembers the keys of its last SEEN_KEYS misses). So a huge document that one agent
reads once streams through without flushing the hot working set, and a block that comes back is
admitted the second time. Blocks larger than a whole tier are never kept in it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from typing import Any

from kvcdn.edge.disk import DiskTier
from kvcdn.errors import DeadlineExceeded, DigestMismatch, InvalidArgument, KVCDNError, NotFound, Unavailable
from kvcdn.spec.placement import Placement
from kvcdn.store.lru import ByteLRU
from kvcdn.v1 import kvcdn_pb2 as pb
from kvcdn.wire.frames import EncodedBlock, FrameSource, check_start_frame, decode_frame, stream_blocks, verify_frame
from kvcdn.wire.metrics import Stat
from kvcdn.wire.rpc import check_read_request
from kvcdn.wire.stub import CacheReader

__all__ = ["Edge", "Pull"]

log = logging.getLogger(__name__)

_KNOWN_INFOS = 65536
PEER_SUSPECT_S = 10.0
"""After a peer fails, it is skipped for this long."""
SEEN_KEYS = 65536
"""Misses remembered by the admission rule."""
PREFETCH_BLOCKS = 4
"""Blocks an edge stream loads ahead of the one it is sending."""


class Pull:
    """A block being loaded (from disk, an owner edge or the origin): frames are appended as they are
    verified, and any number of readers follow them as they arrive."""

    def __init__(self, seen_before: bool, from_peers: bool) -> None:
        self.requests = 1
        self.seen_before = seen_before
        self.from_peers = from_peers
        """May load from the block's owners (not when a peer asked: see StreamBlocksRequest.from_peer)."""
        self.frames: list[bytes] = []
        self.n_frames = 0
        """Frames the block has (0 until its info is known)."""
        self.done = False
        self.error: BaseException | None = None
        self.stale = False
        """An invalidation named this block while it was loading: serve it to those waiting, keep it nowhere."""
        self._changed = asyncio.Event()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def start(self, n_frames: int) -> None:
        self.n_frames = n_frames
        self._wake()

    def append(self, frame: bytes) -> None:
        self.frames.append(frame)
        self._wake()

    def finish(self, error: BaseException | None = None) -> None:
        self.done, self.error = True, error
        self._wake()

    async def frames_from(self, start: int) -> AsyncIterator[bytes]:
        i = start
        while True:
            if self.n_frames:
                check_start_frame(start, self.n_frames)
            if i < len(self.frames):
                yield self.frames[i]
                i += 1
            elif self.done:
                if self.error is None:
                    return
                if isinstance(self.error, KVCDNError):
                    raise type(self.error)(str(self.error))
                raise Unavailable(f"loading the block failed: {self.error}")
            else:
                await self._changed.wait()


class Edge:
    """Memory LRU of encoded blocks, over an optional disk tier, in front of one origin (and, once it
    knows the ring, its peers)."""

    def __init__(self, origin: CacheReader, mem_bytes: int, disk: DiskTier | None = None) -> None:
        self.origin = origin
        self.memory: ByteLRU[bytes, EncodedBlock] = ByteLRU(mem_bytes, lambda b: b.n_bytes)
        self.disk = disk
        # Block infos the origin answered lookups with, so a pull needs no second lookup.
        self._origin_infos: ByteLRU[bytes, pb.BlockInfo] = ByteLRU(_KNOWN_INFOS, lambda _: 1)
        self._pulls: dict[bytes, Pull] = {}
        self._seen: ByteLRU[bytes, bool] = ByteLRU(SEEN_KEYS, lambda _: 1)
        self.ring: Placement | None = None
        self.address = ""
        """This edge's name on the ring."""
        self._peers: dict[str, CacheReader] = {}
        self._suspect_until: dict[str, float] = {}
        self.peer_timeout_s = 1.0
        """Longest wait for a peer's first frame before the next source is asked."""
        self.peer_fetches = 0
        self.bytes_from_peers = 0
        self.admissions_refused = 0
        self._pull_tasks: set[asyncio.Task[None]] = set()
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

    def join_ring(self, ring: Placement, address: str) -> None:
        """Know the ring the clients use, as the node `address`, to load blocks it does not own from
        their owners."""
        if address not in ring.nodes:
            raise InvalidArgument(
                f"the peer list does not name this edge ({address}): list every edge, this one included, "
                "as the clients do, or give this edge's name on it with --advertise"
            )
        self.ring, self.address = ring, address

    def _peer_sources(self, key: bytes) -> list[str]:
        """Edges to load the block from before the origin: none for its primary owner, the primary
        for another owner, every owner in ring order for an edge that owns it not."""
        if self.ring is None:
            return []
        owners = self.ring.owners(key)
        if owners[0] == self.address:
            return []
        return owners[:1] if self.address in owners else owners

    def _peer(self, address: str) -> CacheReader:
        if address not in self._peers:
            self._peers[address] = CacheReader(address, self.origin.timeout_s, self.origin.stream_timeout_s)
        return self._peers[address]

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
            if (pull := self._pulls.get(key)) is not None:
                pull.stale = True
            dropped = self.memory.pop(key) is not None
            self._origin_infos.pop(key)
            if self.disk is not None and key in self.disk:
                self.disk.index.pop(key)
                self.disk.store.delete(key)
                dropped = True
            self.invalidated_blocks += dropped
        self.invalidated_seq = event.seq

    async def settle(self, timeout_s: float | None = None) -> None:
        """Wait until the block loads in progress have finished, disk writes included."""
        if self._pull_tasks:
            await asyncio.wait(set(self._pull_tasks), timeout=timeout_s)

    async def close(self, settle_s: float = 5.0) -> None:
        """Stop following the feed, let loads in progress finish (at most `settle_s`, then cancel
        them), and close the connections to peers and origin."""
        await self.settle(settle_s)
        tasks = [*self._pull_tasks, *([self._follower] if self._follower is not None else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for peer in self._peers.values():
            await peer.close()
        await self.origin.close()

    def stats(self) -> list[Stat]:
        """The edge's counters, for kvcdn.wire.metrics (read at scrape time)."""
        stats: list[Stat] = [
            ("edge_block_hits_memory_total", "counter", "Blocks served from the memory tier", self.hits),
            ("edge_block_misses_memory_total", "counter", "Blocks missing from the memory tier", self.misses),
            ("edge_origin_fetches_total", "counter", "Blocks pulled from the origin", self.origin_fetches),
            ("edge_bytes_from_origin_total", "counter", "Frame bytes pulled from the origin", self.bytes_from_origin),
            ("edge_peer_fetches_total", "counter", "Blocks loaded from their owner edges", self.peer_fetches),
            ("edge_bytes_from_peers_total", "counter", "Frame bytes loaded from owner edges", self.bytes_from_peers),
            ("edge_evictions_memory_total", "counter", "Blocks evicted from the memory tier", self.memory.evictions),
            (
                "edge_admissions_refused_total",
                "counter",
                "Loaded blocks a full tier did not keep (asked for once, never missed before)",
                self.admissions_refused,
            ),
            ("edge_memory_bytes", "gauge", "Bytes held by the memory tier", self.memory.bytes),
            ("edge_memory_blocks", "gauge", "Blocks held by the memory tier", len(self.memory)),
            ("edge_pulls_in_flight", "gauge", "Block loads in progress (disk, peers or origin)", len(self._pulls)),
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

    def block(self, fingerprint: str, key: bytes, from_peers: bool = True) -> FrameSource:
        """The block from memory, or the pull that is loading it (started here if none is)."""
        cached = self.memory.get(key)
        if cached is not None:
            self.hits += 1
            return cached
        self.misses += 1
        pull = self._pulls.get(key)
        if pull is not None:
            pull.requests += 1
        else:
            seen = key in self._seen
            self._seen.put(key, True)
            pull = self._pulls[key] = Pull(seen, from_peers)
            task = asyncio.create_task(self._load(fingerprint, key, pull))
            self._pull_tasks.add(task)
            task.add_done_callback(self._pull_tasks.discard)
        return pull

    async def _load(self, fingerprint: str, key: bytes, pull: Pull) -> None:
        """Fill `pull` from the disk tier, else from peers or the origin, then keep the block in memory
        and on disk as the admission rule allows. Runs detached from any request, so a reader that
        hangs up does not cancel it for the others; readers finish before the disk write."""
        try:
            try:
                block = await self.disk.get(key) if self.disk is not None else None
                from_disk = block is not None
                if block is not None:
                    pull.start(len(block.frames))
                    for frame in block.frames:
                        pull.append(frame)
                else:
                    block = await self._pull(fingerprint, key, pull)
            except BaseException as exc:
                pull.finish(exc)
                if not isinstance(exc, (KVCDNError, asyncio.CancelledError)):
                    log.exception("loading block %s… failed", key.hex()[:16])
                if isinstance(exc, asyncio.CancelledError):
                    raise
                return
            pull.finish()
            if self._admit(pull, block.n_bytes, self.memory):
                self.memory.put(key, block)
            if not from_disk and self.disk is not None and self._admit(pull, block.info.n_bytes, self.disk.index):
                try:
                    await self.disk.put(block, (await self.origin_info()).geometry.frame_bytes)
                except (OSError, KVCDNError) as exc:
                    log.warning("could not keep block %s… on disk: %s", key.hex()[:16], exc)
        finally:
            del self._pulls[key]

    def _admit(self, pull: Pull, n_bytes: int, tier: ByteLRU[bytes, Any]) -> bool:
        """The admission rule (module docstring)."""
        if pull.stale:
            return False
        if tier.bytes + n_bytes <= tier.max_bytes or pull.requests > 1 or pull.seen_before:
            return True
        self.admissions_refused += 1
        return False

    async def _pull(self, fingerprint: str, key: bytes, pull: Pull) -> EncodedBlock:
        """Load one block into `pull` from its owners on the ring (if this edge is not one) or the
        origin, verifying every frame against the origin's digests before anyone sees it."""
        info = self._origin_infos.pop(key)
        if info is None:
            infos = await self.origin.lookup(fingerprint, [key])
            if not infos:
                raise NotFound(f"block {key.hex()[:16]}… is not stored at the origin")
            info = infos[0]
        frame_bytes = (await self.origin_info()).geometry.frame_bytes
        pull.start(len(info.frame_digests))
        peers = self._peer_sources(key) if pull.from_peers else []
        for source in [*peers, ""]:  # "": the origin, the last resort
            if source and self._suspect_until.get(source, 0.0) > time.monotonic():
                continue
            reader = self._peer(source) if source else self.origin
            got = 0
            try:
                # A peer that does not start sending within peer_timeout_s is skipped (the origin is
                # always there); once frames flow, the stream's own deadline applies.
                async with asyncio.timeout(self.peer_timeout_s if source else None) as waiting:
                    async for raw in reader.stream(fingerprint, [key], len(pull.frames), from_peer=bool(source)):
                        waiting.reschedule(None)
                        header, payload = decode_frame(raw)
                        if header.frame_index != len(pull.frames):
                            raise DigestMismatch(f"{reader.address} sent frame {header.frame_index} out of order")
                        verify_frame(info, frame_bytes, header, payload)
                        pull.append(raw)
                        got += len(raw)
                if len(pull.frames) != len(info.frame_digests):
                    raise Unavailable(f"{reader.address} ended block {key.hex()[:16]}… after {len(pull.frames)} frames")
            except (Unavailable, DeadlineExceeded, DigestMismatch, TimeoutError) as exc:
                if not source:
                    raise
                self._suspect_until[source] = time.monotonic() + PEER_SUSPECT_S
                reason = str(exc) or f"no frame within {self.peer_timeout_s:g} s"
                log.warning(
                    "peer %s could not send block %s… (%s); trying the next source", source, key.hex()[:16], reason
                )
                continue
            finally:
                if source:
                    self.bytes_from_peers += got
                else:
                    self.bytes_from_origin += got
            if source:
                self.peer_fetches += 1
            else:
                self.origin_fetches += 1
            break
        return EncodedBlock(info=info, frames=tuple(pull.frames))

    async def stream(
        self, fingerprint: str, keys: Sequence[bytes], start_frame: int, from_peer: bool = False
    ) -> AsyncIterator[bytes]:
        """The frames of `keys` in order, loading up to PREFETCH_BLOCKS blocks ahead of the one being
        sent, so that pulls from disk or the origin overlap the stream instead of queueing behind it
        (loads started ahead run to completion and fill the tiers even if the stream stops)."""
        check_read_request(fingerprint, (await self.origin_info()).fingerprint, keys)
        ahead: deque[FrameSource] = deque()
        queued = iter(keys)

        async def next_block(key: bytes) -> FrameSource:
            # Starting a block's load costs nothing here; its frames are awaited as they are sent.
            while len(ahead) <= PREFETCH_BLOCKS and (k := next(queued, None)) is not None:
                ahead.append(self.block(fingerprint, k, from_peers=not from_peer))
            return ahead.popleft()

        async for frame in stream_blocks(keys, start_frame, next_block):
            yield frame
