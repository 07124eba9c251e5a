"""An edge's loads of blocks it lacks (kvcdn.edge.edge runs them): the `Pull` that requests join and
follow frame by frame while it loads, and the FrameTarget a load from a peer or the origin streams
into (kvcdn.wire.source), which keeps each frame encoded as the edge serves it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np

from kvcdn.errors import KVCDNError, Unavailable
from kvcdn.v1 import kvcdn_pb2 as pb
from kvcdn.wire.frames import Frame, check_start_frame, frame_buffer, frame_prefix

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


class PullTarget:
    """Where a load from a peer or the origin lands (a kvcdn.wire.receiver.FrameTarget): each frame
    in a buffer of its own, encoded (`Frame`) with its payload region left for the receiver to write
    in place, so a frame costs one allocation and no copy after the socket's; once verified it is
    appended to `pull` on the edge's loop (the receiver may run in a worker thread). `abandon` stops
    a load whose pull is gone: no frame of it is appended after that."""

    def __init__(self, info: pb.BlockInfo, frame_bytes: int, pull: Pull, loop: asyncio.AbstractEventLoop) -> None:
        self.info, self.frame_bytes, self.pull = info, frame_bytes, pull
        self._loop = loop
        self.frames: list[Frame] = list(pull.frames)
        """The block's verified frames so far, encoded (what the load returns)."""
        self._writing: dict[int, bytearray] = {}
        """Frames being received, by index."""
        self._abandoned = False

    def regions(self, block_start: int, block_tokens: int, offset: int, length: int) -> list[np.ndarray]:
        index = offset // self.frame_bytes
        prefix = frame_prefix(self.info, index, self.frame_bytes, length)
        frame = self._writing[index] = frame_buffer(len(prefix) + length)
        frame[: len(prefix)] = prefix
        return [np.frombuffer(frame, dtype=np.uint8, offset=len(prefix))]

    def frame_done(self, block_start: int, block_tokens: int, end: int) -> None:
        if self._abandoned:
            raise Unavailable("the load was abandoned")
        frame = self._writing.pop((end - 1) // self.frame_bytes)
        self.frames.append(frame)
        self._loop.call_soon_threadsafe(self.pull.append, frame)

    def block_done(self, block_start: int, block_tokens: int) -> None:
        """(Every frame went to the pull as it settled.)"""

    def abandon(self) -> None:
        self._abandoned = True
