"""An edge's loads of blocks it lacks (kvcdn.edge.edge runs them): the `Pull` that requests join and
follow frame by frame while it loads, and the FrameTarget a load from a peer or the origin streams
into (kvcdn.wire.source), which keeps the block's frames encoded, as the edge serves them, in one
buffer (kvcdn.edge.buffers)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np

from kvcdn.edge.buffers import BlockBuffers
from kvcdn.errors import DigestMismatch, KVCDNError, Unavailable
from kvcdn.spec.geometry import Geometry
from kvcdn.v1 import kvcdn_pb2 as pb
from kvcdn.wire.frames import Frame, check_start_frame, frame_prefix

__all__ = ["Pull", "PullTarget"]


class Pull:
    """A block being loaded (from a lower tier, an owner edge or the origin): frames are appended as
    they are verified, and any number of readers follow them as they arrive."""

    def __init__(self, seen_before: bool, from_peers: bool) -> None:
        self.requests = 1
        self.seen_before = seen_before
        self.from_peers = from_peers
        """May load from the block's owners (not when a peer asked: see StreamBlocksRequest.from_peer)."""
        self.frames: list[Frame] = []
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

    def append(self, frame: Frame) -> None:
        self.frames.append(frame)
        self._wake()

    def finish(self, error: BaseException | None = None) -> None:
        self.done, self.error = True, error
        self._wake()

    async def frames_from(self, start: int) -> AsyncIterator[Frame]:
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


_PREFIX_BYTES = 128
"""At most the bytes of a frame's head (kvcdn.wire.frames.frame_prefix: two 32-byte fields, two varints)."""


def _slot_bytes(geometry: Geometry) -> int:
    """The largest block the geometry makes, encoded: what a pooled buffer holds."""
    raw = geometry.block_bytes(geometry.block_tokens)
    return raw + -(-raw // geometry.frame_bytes) * _PREFIX_BYTES


class PullTarget:
    """Where a load from a peer or the origin lands (a kvcdn.wire.receiver.FrameTarget): the block's
    frames, encoded (`Frame`), laid out one after the other in one buffer leased from the edge's pool
    (kvcdn.edge.buffers), each frame's head written up front and its payload region left for the
    receiver to write in place, so a block costs no allocation when the pool has a free buffer and no
    copy after the socket's; once verified, a frame is appended to `pull` on the edge's loop (the
    receiver may run in a worker thread). `abandon` stops a load whose pull is gone: no frame of it
    is appended after that."""

    def __init__(
        self,
        info: pb.BlockInfo,
        geometry: Geometry,
        pull: Pull,
        loop: asyncio.AbstractEventLoop,
        buffers: BlockBuffers,
    ) -> None:
        frame_bytes = geometry.frame_bytes
        self.info, self.frame_bytes, self.pull = info, frame_bytes, pull
        self._loop = loop
        self.frames: list[Frame] = list(pull.frames)
        """The block's verified frames so far, encoded (what the load returns)."""
        sizes = [max(0, min(frame_bytes, info.n_bytes - i * frame_bytes)) for i in range(len(info.frame_digests))]
        prefixes = [frame_prefix(info, i, frame_bytes, size) for i, size in enumerate(sizes)]
        # Frames and regions are cut from a memoryview of the leased buffer, never by slicing the
        # array (numpy points a slice at the pool's buffer): the lease lives while any of them does.
        block = buffers.lease(sum(map(len, prefixes)) + sum(sizes), _slot_bytes(geometry)).data
        self._spans: list[tuple[int, int, int]] = []
        """Each frame's start, payload start and end in `block`."""
        at = 0
        for prefix, size in zip(prefixes, sizes, strict=True):
            block[at : at + len(prefix)] = prefix
            self._spans.append((at, at + len(prefix), at + len(prefix) + size))
            at += len(prefix) + size
        self._block = block
        self._abandoned = False

    def regions(self, block_start: int, block_tokens: int, offset: int, length: int) -> list[np.ndarray]:
        _, payload, end = self._spans[offset // self.frame_bytes]
        if end - payload != length:  # the receivers check lengths against the info first
            raise DigestMismatch(f"a frame of {length} bytes where the block's info says {end - payload}")
        return [np.frombuffer(self._block[payload:end], dtype=np.uint8)]

    def frame_done(self, block_start: int, block_tokens: int, end: int) -> None:
        if self._abandoned:
            raise Unavailable("the load was abandoned")
        start, _, stop = self._spans[(end - 1) // self.frame_bytes]
        frame = self._block[start:stop]
        self.frames.append(frame)
        self._loop.call_soon_threadsafe(self.pull.append, frame)

    def block_done(self, block_start: int, block_tokens: int) -> None:
        """(Every frame went to the pull as it settled.)"""

    @property
    def payload_bytes(self) -> int:
        """Payload bytes of the frames verified so far."""
        return sum(end - payload for _, payload, end in self._spans[: len(self.frames)])

    def abandon(self) -> None:
        self._abandoned = True
