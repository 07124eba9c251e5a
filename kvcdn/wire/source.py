"""Streaming blocks from one server into a FrameTarget, the one way every receiver does it (an agent's
fetch, an edge's load from a peer or the origin): over the server's bulk port where it offers one
(kvcdn.wire.receiver, in a worker thread), else, or when the bulk port fails before a frame, over
gRPC StreamBlocks. Both settle every frame with the same sequence (`settle_frame`), and `progress`
only ever passes verified frames, so the next server resumes exactly where this one broke: `fail_over`
walks a route of servers so, and `Suspects` remembers which recently failed (shared by both callers).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

from kvcdn.errors import DeadlineExceeded, DigestMismatch, Unavailable
from kvcdn.spec.geometry import Geometry
from kvcdn.v1 import kvcdn_pb2 as pb
from kvcdn.wire.frames import decode_frame, expect_frame
from kvcdn.wire.receiver import FrameTarget, Progress, receive_into, settle_frame
from kvcdn.wire.stub import CacheReader

__all__ = ["RETRYABLE", "Suspects", "Transport", "fail_over", "stream_from"]

log = logging.getLogger(__name__)

RETRYABLE: tuple[type[Exception], ...] = (Unavailable, DeadlineExceeded, DigestMismatch)
"""Failures after which the next server of a route is asked: it is down, stalled, or sent a frame that
failed verification (nothing of which was kept: `progress` stops before it)."""


@dataclass(frozen=True)
class Transport:
    """How a receiver streams: over bulk ports where offered, their TLS and token, its threads."""

    executor: Executor
    """Threads the bulk streams block in, and gRPC frames settle in (off the event loop)."""
    timeout_s: float
    """Deadline of one stream."""
    bulk: bool = True
    """Use a server's bulk port when it offers one (else gRPC only)."""
    tls: ssl.SSLContext | None = None
    """Bulk streams over TLS with this context (None: plaintext)."""
    token: str = ""
    """Sent with each bulk request where reads are closed (gRPC calls carry the reader's own)."""


async def stream_from(
    reader: CacheReader,
    fingerprint: str,
    blocks: Sequence[pb.BlockInfo],
    geometry: Geometry,
    target: FrameTarget,
    progress: Progress,
    transport: Transport,
    from_peer: bool = False,
    first_frame_s: float | None = None,
    load: pb.Load | None = None,
) -> float:
    """Every frame of `blocks` from `progress` on, from `reader`'s server into `target`, verified (as
    part of `load` where given: its trailers, a receipt among them, go to `progress.trailers`);
    the CPU seconds the bulk stream's thread spent (0 over gRPC). Raises the typed error of a failure
    (Unavailable, DeadlineExceeded, DigestMismatch...) with `progress` past the frames that settled;
    DeadlineExceeded too when no frame settles within `first_frame_s` (a stalled peer: skip it).
    Returns only when the stream has ended: no thread goes on writing into `target` after it."""
    if progress.block == len(blocks):
        return 0.0  # every frame settled before the last server's stream failed
    try:
        async with asyncio.timeout(first_frame_s):  # (its GetInfo, asked once a server)
            bulk = await reader.bulk_address() if transport.bulk else None
    except TimeoutError:
        raise DeadlineExceeded(f"{reader.address}: no answer within {first_frame_s:g} s") from None
    if bulk is not None:
        before = (progress.block, progress.frame)
        try:
            return await asyncio.get_running_loop().run_in_executor(
                transport.executor,
                receive_into,
                bulk,
                fingerprint,
                blocks,
                geometry,
                target,
                progress,
                transport.timeout_s,
                transport.tls,
                transport.token,
                from_peer,
                first_frame_s,
                load,
            )
        except Unavailable as exc:
            if (progress.block, progress.frame) != before:
                raise
            # Refused or dropped before a frame (a connection cap, a restarted bulk port): the
            # server itself may be fine, so ask it over gRPC before the caller moves on.
            log.info("bulk stream from %s failed before a frame (%s); using its gRPC port", reader.address, exc)
    # Over gRPC: each frame's header checked on the loop, its payload written, verified and settled
    # in a worker thread (hashing and decoding stay off the loop); the first frame's deadline is
    # lifted once a header has checked, before its settle, so a timeout never leaves one running.
    loop = asyncio.get_running_loop()
    keys = [b.key for b in blocks[progress.block :]]
    try:
        async with asyncio.timeout(first_frame_s) as waiting:
            trailers: list[tuple[str, bytes]] = []
            frames = reader.stream(fingerprint, keys, progress.frame, from_peer=from_peer, load=load, trailers=trailers)
            async for raw in frames:
                if progress.block == len(blocks):
                    raise DigestMismatch(f"{reader.address} sent more frames than the blocks hold")
                header, payload = decode_frame(raw, reader.address)
                info, index = blocks[progress.block], progress.frame
                expect_frame(info, geometry.frame_bytes, index, header, len(payload), reader.address)
                waiting.reschedule(None)
                await loop.run_in_executor(
                    transport.executor,
                    _write_and_settle,
                    reader.address,
                    geometry,
                    target,
                    progress,
                    info,
                    index,
                    payload,
                )
    except TimeoutError:
        raise DeadlineExceeded(f"{reader.address}: no frame within {first_frame_s:g} s") from None
    if progress.block < len(blocks):
        raise Unavailable(f"{reader.address} ended the stream early at block {progress.block}")
    progress.trailers += trailers
    return 0.0


def _write_and_settle(
    peer: str,
    geometry: Geometry,
    target: FrameTarget,
    progress: Progress,
    info: pb.BlockInfo,
    index: int,
    payload: memoryview,
) -> None:
    start = info.index * geometry.block_tokens
    views = [r.data for r in target.regions(start, info.n_tokens, index * geometry.frame_bytes, len(payload))]
    pos = 0
    for view in views:
        view[:] = payload[pos : pos + len(view)]
        pos += len(view)
    settle_frame(peer, geometry, target, progress, info, index, views)


class Suspects:
    """Servers that recently failed a stream, until `for_s` seconds after their last failure: a client
    asks them last, an edge skips them as peers (the origin is never skipped), so a dead server costs
    one timeout per `for_s` rather than one per block."""

    def __init__(self, for_s: float) -> None:
        self.for_s = for_s
        self._until: dict[str, float] = {}

    def suspect(self, address: str) -> None:
        self._until[address] = time.monotonic() + self.for_s

    def __contains__(self, address: object) -> bool:
        return isinstance(address, str) and self._until.get(address, 0.0) > time.monotonic()

    def order(self, route: Sequence[str]) -> list[str]:
        """`route` with its suspects moved to the end (stable otherwise)."""
        return sorted(route, key=lambda address: address in self)

    def current(self) -> list[str]:
        """The servers suspected now."""
        return sorted(a for a in self._until if a in self)


async def fail_over(
    route: Sequence[str],
    attempt: Callable[[str], Awaitable[object]],
    progress: Progress,
    n_blocks: int,
    failed: Callable[[str], None],
) -> list[str]:
    """Run `attempt(address)` (one `stream_from` into a shared target, from `progress` on) for each
    server of `route` in turn until one completes the stream, telling `failed` of each that fails with
    a RETRYABLE error (any other error ends the walk); returns the servers asked. When none completes:
    DigestMismatch if one sent a frame that failed verification, else Unavailable, naming every failure."""
    used: list[str] = []
    errors: list[Exception] = []
    for address in route:
        if progress.block == n_blocks:
            return used  # every frame arrived and verified before the last stream failed
        used.append(address)
        try:
            await attempt(address)
            return used
        except RETRYABLE as exc:
            errors.append(exc)
            failed(address)
            log.warning("stream from %s broke at block %d frame %d: %s", address, progress.block, progress.frame, exc)
    if progress.block == n_blocks:
        return used
    summary = "; ".join(map(str, errors)) or "no server to ask"
    if any(isinstance(e, DigestMismatch) for e in errors):
        raise DigestMismatch(f"no server sent verified frames for the whole stream: {summary}")
    raise Unavailable(f"no server could complete the stream: {summary}")
