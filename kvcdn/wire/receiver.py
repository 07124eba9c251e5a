"""The receiving end of the bulk frame stream (kvcdn.wire.bulk has the server and the record format):
`receive_into` streams blocks from an edge's bulk port into a FrameTarget, verifying every frame.

It reads the frames due next with scatter reads (`recvmsg_into`): record heads into small buffers,
payloads straight into the tensors they belong to (the FrameTarget's regions), and after each read
checks every frame the read completed, its head against the one it expects and its payload against
its BLAKE3 digest in place, so its Python work is per read, not per frame, and hashing keeps pace with
the socket. A frame that fails its digest aborts the fetch; the half-written tensors are never handed
out. Under TLS an `ssl` socket's `recv_into` reads one buffer at a time.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import blake3
import grpc
import numpy as np
from google.protobuf.message import DecodeError

from kvcdn.errors import DeadlineExceeded, DigestMismatch, Unavailable, error_for
from kvcdn.spec.geometry import Geometry
from kvcdn.v1 import kvcdn_pb2 as pb
from kvcdn.wire.bulk import _CODES, _END, _ERROR, _MAX_HEADER_BYTES, _MAX_REQUEST_BYTES, _PAIR, _TRAILER, _U32
from kvcdn.wire.frames import check_digest, expect_frame

__all__ = ["FrameTarget", "Progress", "receive_into", "settle_frame"]


class FrameTarget(Protocol):
    """Where received payloads land (kvcdn.model.receiving.KVAssembler; an edge's pull keeps encoded
    frames, kvcdn.edge.pulls)."""

    def regions(self, block_start: int, block_tokens: int, offset: int, length: int) -> list[np.ndarray]:
        """Writable byte views of the buffers that bytes [offset, offset + length) of the block
        covering tokens [block_start, block_start + block_tokens) belong to, in payload order."""
        ...

    def frame_done(self, block_start: int, block_tokens: int, end: int) -> None:
        """Bytes [0, end) of that block are written and verified, in order (an encoded target decodes
        what they complete)."""
        ...

    def block_done(self, block_start: int, block_tokens: int) -> None:
        """Every frame of that block is written and verified (a GPU target starts its copy now)."""
        ...


@dataclass
class Progress:
    """Where a fetch stands: the next frame due is `frame` of block `block`."""

    block: int = 0
    frame: int = 0
    first_frame_at: float = 0.0
    """time.perf_counter() when the first frame was verified and written (0: none yet)."""
    trailers: list[tuple[str, bytes]] = field(default_factory=list)
    """The trailing metadata of the streams that completed (a charged load's receipt among them)."""

    def advance(self, frames_in_block: int) -> bool:
        """One more frame of the current block is verified and written; True when that completed it."""
        if not self.first_frame_at:
            self.first_frame_at = time.perf_counter()
        self.frame += 1
        if self.frame < frames_in_block:
            return False
        self.block, self.frame = self.block + 1, 0
        return True


_IOV = 64
"""Buffers one scatter read fills at most (the system's limit is 1,024)."""


class _Stream:
    """The receiving end of a bulk connection, on a blocking socket: fills many buffers at once, with
    one system call for all of them as far as bytes have arrived (`recvmsg_into`; under TLS, whose
    sockets have no scatter read, one read per buffer), and reads first what was handed back (`unread`).
    A socket with a timeout would poll before each read: the stream's deadline is `_CutOff`'s."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._scatter = not isinstance(sock, ssl.SSLSocket)
        self._back = memoryview(b"")
        self.filled = 0
        """Bytes the last `filling` wrote, in order from its first buffer (also when it raised)."""

    def unread(self, data: bytes) -> None:
        """Hand `data` back: the next reads return it before anything else from the socket."""
        self._back = memoryview(data + bytes(self._back))

    def filling(self, buffers: list[memoryview]) -> Iterator[int]:
        """Fill `buffers` in order, yielding after each read how many bytes are in so far (`filled`);
        ConnectionError if the peer closes first (OSError for other failures)."""
        self.filled = 0
        todo = [b for b in buffers if len(b)]
        i = 0
        while i < len(todo):
            if self._back:
                n = min(len(self._back), len(todo[i]))
                todo[i][:n] = self._back[:n]
                self._back = self._back[n:]
            elif self._scatter:
                n = self._sock.recvmsg_into(todo[i : i + _IOV])[0]
            else:
                n = self._sock.recv_into(todo[i])
            if n == 0:
                raise ConnectionError("the server closed the connection mid-stream")
            self.filled += n
            while n:  # past the buffers this read filled, into the one it filled in part
                if n < len(todo[i]):
                    todo[i] = todo[i][n:]
                    break
                n -= len(todo[i])
                i += 1
            yield self.filled

    def fill(self, buffers: list[memoryview]) -> None:
        """Fill `buffers` in order (see `filling`)."""
        for _ in self.filling(buffers):
            pass

    def read(self, n: int) -> bytes:
        buf = bytearray(n)
        self.fill([memoryview(buf)])
        return bytes(buf)


class _CutOff:
    """The deadline of a stream read from a blocking socket: at `deadline` (time.monotonic), or at
    `first` when no frame has settled by then (`started()` False), a timer shuts the socket down,
    which ends a read waiting on it, so a sender that trickles bytes (or none) cannot stretch the
    stream past it. Use it as a context around the socket's use, inside its `with`: on exit the
    timers are stopped (and a shutdown already under way finished) before the socket closes."""

    def __init__(
        self, sock: socket.socket, deadline: float, first: tuple[float, Callable[[], bool]] | None = None
    ) -> None:
        self.expired = ""
        """Why the socket was shut: "" (it was not), "deadline" or "first frame"."""
        self._sock = sock
        now = time.monotonic()
        self._timers = [threading.Timer(max(0.0, deadline - now), self._cut, ("deadline",))]
        if first is not None:
            at, started = first

            def first_frame() -> None:
                if not started():
                    self._cut("first frame")

            self._timers.append(threading.Timer(max(0.0, at - now), first_frame))
        for timer in self._timers:
            timer.daemon = True

    def _cut(self, why: str) -> None:
        self.expired = self.expired or why
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> _CutOff:
        for timer in self._timers:
            timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for timer in self._timers:
            timer.cancel()
            timer.join()


def receive_into(
    address: tuple[str, int],
    fingerprint: str,
    blocks: Sequence[pb.BlockInfo],
    geometry: Geometry,
    assembler: FrameTarget,
    progress: Progress,
    timeout_s: float,
    tls: ssl.SSLContext | None = None,
    token: str = "",
    from_peer: bool = False,
    first_frame_s: float | None = None,
    load: pb.Load | None = None,
) -> float:
    """Stream `blocks` from `progress` on, writing each payload in place and verifying it, within
    `timeout_s` for the whole stream (as gRPC's deadline for StreamBlocks); over TLS with `tls`
    (the server's certificate checked for `address`'s host), sending `token` for closed reads
    (`from_peer`: an edge asks another, see StreamBlocksRequest.from_peer), and giving up with
    DeadlineExceeded if no frame has settled within `first_frame_s` (a stalled peer), as part of `load`
    where given. Returns the CPU seconds this thread spent on it; the stream's trailers go to `progress`.

    Blocking: run it in a worker thread. Frames arrive a batch at a time (`_receive_frames`) and each
    is verified in this thread right after the read that completed it, while its bytes are still in
    this core's cache (BLAKE3 releases the GIL meanwhile); a helper thread that verified beside the receiving one was
    slower on two cores and on sixteen (the handover per frame cost more than the overlap gained).
    `progress` advances frame by frame, in order and only past verified frames, so after a retryable
    failure another server can resume exactly where this one stopped.
    """
    cpu_s = time.thread_time()
    request = pb.StreamBlocksRequest(
        fingerprint=fingerprint,
        keys=[b.key for b in blocks[progress.block :]],
        start_frame=progress.frame,
        token=token,
        from_peer=from_peer,
        load=load,
    ).SerializeToString()
    peer = f"{address[0]}:{address[1]} (bulk{', TLS' if tls else ''})"
    deadline = time.monotonic() + timeout_s
    before = (progress.block, progress.frame)
    first = None
    if first_frame_s is not None:
        first = (time.monotonic() + first_frame_s, lambda: (progress.block, progress.frame) != before)
    cut_off: _CutOff | None = None
    try:
        connect_s = timeout_s if first_frame_s is None else min(timeout_s, first_frame_s)
        with socket.create_connection(address, timeout=connect_s) as raw:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with tls.wrap_socket(raw, server_hostname=address[0]) if tls is not None else raw as sock:
                sock.sendall(_U32.pack(len(request)) + request)
                sock.settimeout(None)  # blocking reads from here on, cut off at the deadline
                stream = _Stream(sock)
                with _CutOff(raw, deadline, first) as cut_off:
                    trailers: list[tuple[str, bytes]] = []
                    _receive_frames(stream, peer, blocks, geometry, assembler, progress, trailers)
                    marker, length = _next_record(stream, peer, trailers)
                    _raise_if_error(stream, peer, marker, length, trailers)
                if marker != _END:
                    raise DigestMismatch(f"{peer} sent more frames than the blocks hold")
                progress.trailers += trailers
    except OSError as exc:  # TimeoutError (connect, handshake), ConnectionError, ssl.SSLError among them
        if cut_off is not None and cut_off.expired == "first frame":
            raise DeadlineExceeded(f"{peer}: no frame within {first_frame_s:g} s") from None
        if isinstance(exc, TimeoutError) or (cut_off is not None and cut_off.expired):
            raise DeadlineExceeded(f"{peer}: the stream did not complete within {timeout_s:g} s") from None
        if isinstance(exc, ssl.SSLCertVerificationError):  # as gRPC reports a failed handshake: the next edge is tried
            raise Unavailable(f"{peer}: the server's certificate does not verify: {exc.verify_message}") from None
        raise Unavailable(f"{peer}: {exc}") from None
    return time.thread_time() - cpu_s


def _next_record(stream: _Stream, peer: str, trailers: list[tuple[str, bytes]]) -> tuple[int, int]:
    """The next record's two lengths, after the trailer records before it (kept in `trailers`)."""
    while True:
        first, second = _PAIR.unpack(stream.read(_PAIR.size))
        if first != _TRAILER:
            return first, second
        if second > _MAX_REQUEST_BYTES:
            raise DigestMismatch(f"{peer} sent a trailer record of {second} bytes (at most {_MAX_REQUEST_BYTES})")
        key, _, value = stream.read(second).partition(b"\x00")
        trailers.append((key.decode(errors="replace"), value))


def _raise_if_error(stream: _Stream, peer: str, marker: int, length: int, trailers: list[tuple[str, bytes]]) -> None:
    """Raise the typed error an error record carries (`marker` and `length` already read), with the
    `trailers` sent before it; a record too short to hold a status is a malformed stream
    (DigestMismatch: the caller fails over)."""
    if marker != _ERROR:
        return
    if length < _U32.size:
        raise DigestMismatch(f"{peer} sent an error record of {length} bytes, too short for a status")
    record = stream.read(min(length, _MAX_REQUEST_BYTES))
    (code,) = _U32.unpack_from(record)
    exc = error_for(_CODES.get(code, grpc.StatusCode.UNKNOWN), record[4:].decode(errors="replace"), peer)
    exc.trailers = {k: v if k.endswith("-bin") else v.decode(errors="replace") for k, v in trailers}
    raise exc


def _hash(views: list[memoryview]) -> bytes:
    if len(views) == 1:
        return blake3.blake3(views[0]).digest()
    hasher = blake3.blake3()
    for view in views:
        hasher.update(view)
    return hasher.digest()


_BATCH_BYTES = 8 << 20
"""Payload bytes a receiver asks for in one go: the frames due next, as far as they add up to this."""
_BATCH_FRAMES = 12
"""Frames one read asks for at most (each takes a record head and one to a few payload regions)."""


@dataclass
class _Due:
    """A frame due on the stream, its record as kvcdn's servers write it, and where it lands."""

    info: pb.BlockInfo
    index: int
    expected: bytes
    """The record's head: the two lengths and the canonical encoding of the frame's header (the
    fields in order: a header that says anything else, or says it otherwise, is parsed instead)."""
    head: memoryview
    """Where the record's head is read to."""
    views: list[memoryview]
    """Where its payload is read to: the target's regions."""


def _due(blocks: Sequence[pb.BlockInfo], at: Progress, geometry: Geometry, assembler: FrameTarget) -> list[_Due]:
    """The frames due from `at` on, at most a batch's worth (`_BATCH_BYTES`, `_BATCH_FRAMES`)."""
    out: list[_Due] = []
    block, frame, total = at.block, at.frame, 0
    while block < len(blocks) and len(out) < _BATCH_FRAMES and total < _BATCH_BYTES:
        info = blocks[block]
        offset = frame * geometry.frame_bytes
        size = min(geometry.frame_bytes, info.n_bytes - offset)
        digest = info.frame_digests[frame]
        header = pb.FrameHeader(block_key=info.key, frame_index=frame, offset=offset, digest=digest)
        encoded = header.SerializeToString()
        expected = _PAIR.pack(len(encoded), size) + encoded
        regions = assembler.regions(info.index * geometry.block_tokens, info.n_tokens, offset, size)
        out.append(_Due(info, frame, expected, memoryview(bytearray(len(expected))), [r.data for r in regions]))
        total += size
        frame += 1
        if frame == len(info.frame_digests):
            block, frame = block + 1, 0
    return out


def settle_frame(
    peer: str,
    geometry: Geometry,
    assembler: FrameTarget,
    progress: Progress,
    info: pb.BlockInfo,
    index: int,
    views: list[memoryview],
) -> None:
    """Frame `index` of `info`'s block is written into `views` (the target's regions for it): verify
    it, advance `progress` past it, and hand on what it completes (decode, copy to a GPU). The one
    settle sequence of every receiver: bulk streams here, gRPC streams in kvcdn.wire.source."""
    check_digest(info, index, _hash(views), peer)
    start = info.index * geometry.block_tokens
    assembler.frame_done(start, info.n_tokens, index * geometry.frame_bytes + sum(len(v) for v in views))
    if progress.advance(len(info.frame_digests)):
        assembler.block_done(start, info.n_tokens)


class _Batch:
    """The frames due next on a stream (`_due`), the buffers their records are read into, and how
    many of them have settled."""

    def __init__(self, due: list[_Due]) -> None:
        self.due = due
        self.buffers = [b for d in due for b in (d.head, *d.views)]
        self.ends = list(itertools.accumulate(len(d.head) + sum(len(v) for v in d.views) for d in due))
        """Where each frame's record ends, counted from the batch's first byte."""
        self.settled = 0

    def settle(self, filled: int, settle: Callable[[_Due, list[memoryview]], None]) -> bool:
        """`settle` every frame that the batch's first `filled` bytes complete and that has not
        settled yet; False when the bytes in show a record other than the one due."""
        while self.settled < len(self.due):
            d, start = self.due[self.settled], self.start
            seen = min(filled - start, len(d.head))
            if seen <= 0:
                return True
            if d.head[:seen] != d.expected[:seen]:
                return False
            if filled < self.ends[self.settled]:
                return True
            settle(d, d.views)
            self.settled += 1
        return True

    @property
    def start(self) -> int:
        """Where the first unsettled frame's record starts."""
        return self.ends[self.settled - 1] if self.settled else 0

    def rest(self, filled: int) -> bytes:
        """The bytes in from the first unsettled frame's record on (of the first `filled`)."""
        first = sum(1 + len(d.views) for d in self.due[: self.settled])
        out, left = [], filled - self.start
        for b in self.buffers[first:]:
            out.append(bytes(b[: min(left, len(b))]))
            left -= len(out[-1])
        return b"".join(out)


def _receive_frames(
    stream: _Stream,
    peer: str,
    blocks: Sequence[pb.BlockInfo],
    geometry: Geometry,
    assembler: FrameTarget,
    progress: Progress,
    trailers: list[tuple[str, bytes]],
) -> None:
    """Every frame from `progress` on, a batch at a time: the records of the frames due next are
    read with scatter reads, heads into small buffers and payloads straight into the target's
    regions, and after each read every frame it completed is checked against the record expected
    (the exact bytes kvcdn's servers write), verified and settled, in order, while the sender goes
    on sending. A record other than the one expected (an error, the stream's end, a header encoded
    otherwise) is handed back to the stream and parsed on its own (`_receive_frame`). `progress`
    only ever passes verified frames, so when the stream fails, the frames that arrived whole before
    the failure still count and the next server resumes after them."""

    def settle(d: _Due, views: list[memoryview]) -> None:
        settle_frame(peer, geometry, assembler, progress, d.info, d.index, views)

    while progress.block < len(blocks):
        batch = _Batch(_due(blocks, progress, geometry, assembler))
        try:
            expected = all(batch.settle(filled, settle) for filled in stream.filling(batch.buffers))
        except OSError:
            if batch.settle(stream.filled, settle):
                raise
            expected = False  # a record other than the one due came before the failure: read what it says
        if not expected:
            stream.unread(batch.rest(stream.filled))
            d = batch.due[batch.settled]
            settle(d, _receive_frame(stream, peer, d.info, d.index, geometry, assembler, trailers))


def _receive_frame(
    stream: _Stream,
    peer: str,
    info: pb.BlockInfo,
    index: int,
    geometry: Geometry,
    assembler: FrameTarget,
    trailers: list[tuple[str, bytes]],
) -> list[memoryview]:
    """Frame `index` of `info`'s block, its record parsed and checked, written in place; returns the
    views its payload landed in (typed errors for an error record or the stream's end)."""
    header_len, payload_len = _next_record(stream, peer, trailers)
    _raise_if_error(stream, peer, header_len, payload_len, trailers)
    if header_len == _END:
        raise Unavailable(f"{peer} ended the stream at block {info.index} frame {index}")
    if header_len > _MAX_HEADER_BYTES:
        raise DigestMismatch(f"{peer} announced a frame header of {header_len} bytes (at most {_MAX_HEADER_BYTES})")
    try:
        header = pb.FrameHeader.FromString(stream.read(header_len))
    except DecodeError:
        raise DigestMismatch(f"{peer} sent a frame header that is not a FrameHeader") from None
    expect_frame(info, geometry.frame_bytes, index, header, payload_len, peer)
    start = info.index * geometry.block_tokens
    views = [region.data for region in assembler.regions(start, info.n_tokens, header.offset, payload_len)]
    stream.fill(views)
    return views
