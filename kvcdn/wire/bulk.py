"""The bulk frame stream: StreamBlocks' frames over a TCP connection (format in the .proto), in TLS
when the server has certificates (kvcdn.wire.tls).

gRPC stays the API for everything, and StreamBlocks over gRPC stays available; this path exists
because gRPC's per-message work caps a 1 MiB-frame stream at about half of what the loopback socket
carries on this machine (~2 vs ~4 GB/s). Here the server sends its cached encoded frames with no copy
(one `sendmsg` of a frame's record head and payload slice), and the receiver reads the frames due
next with scatter reads (`recvmsg_into`): record heads into small buffers, payloads straight into
the tensors they belong to (the FrameTarget's regions), and after each read checks every frame the
read completed, its head against the one it expects and its payload against its BLAKE3 digest in
place, so its Python work is per read, not per frame, and hashing keeps pace with the socket. A
frame that fails its digest aborts the fetch; the half-written tensors are never handed out. Under
TLS the same records travel encrypted (asyncio's SSL transport on the server, an `ssl` socket's
`recv_into` on the receiver); a deployment that closes reads sends its token in the request (`token`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import resource
import socket
import ssl
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import blake3
import grpc
import numpy as np
from google.protobuf.message import DecodeError

from kvcdn.errors import (
    DeadlineExceeded,
    DigestMismatch,
    InvalidArgument,
    KVCDNError,
    Unavailable,
    error_for,
)
from kvcdn.spec.geometry import Geometry
from kvcdn.v1 import kvcdn_pb2 as pb
from kvcdn.wire.auth import Authorizer
from kvcdn.wire.frames import check_digest, expect_frame, frame_parts
from kvcdn.wire.metrics import BULK_METHOD, ServerMetrics
from kvcdn.wire.ratelimit import RateLimiter

__all__ = ["DEFAULT_LIMITS", "BulkLimits", "BulkServer", "FrameTarget", "Progress", "receive_into", "start_bulk_server"]

log = logging.getLogger(__name__)

_PAIR = struct.Struct("<II")
_U32 = struct.Struct("<I")
_END = 0xFFFFFFFF
_ERROR = 0xFFFFFFFE
_MAX_REQUEST_BYTES = 1 << 20
_MAX_HEADER_BYTES = 4096


def _fd_budget() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(64, min(4096, soft * 3 // 4)) if soft > 0 else 4096


@dataclass(frozen=True)
class BulkLimits:
    """What one bulk server grants the peers that connect to it (an attacker among them)."""

    connections: int = field(default_factory=lambda: _fd_budget())
    """Connections served at once; more are closed on accept (default: 3/4 of the process's file
    descriptor limit, at most 4,096, so the accept loop is never the one to run out)."""
    per_peer: int = 512
    """Connections one peer address may hold at once (one agent host runs many agents: generous)."""
    request_s: float = 10.0
    """Deadline for a connection's request to arrive whole (a peer that sends a length, then nothing)."""
    send_stall_s: float = 60.0
    """Longest a frame may wait for a reader that does not read (it pins the block meanwhile)."""


DEFAULT_LIMITS = BulkLimits()


@dataclass(frozen=True)
class _Options:
    limits: BulkLimits
    tls: ssl.SSLContext | None
    auth: Authorizer | None
    limiter: RateLimiter | None


_CODES = {code.value[0]: code for code in grpc.StatusCode}

StreamFn = Callable[[str, Sequence[bytes], int], AsyncIterator[bytes]]


# --- server --------------------------------------------------------------------------------------


@dataclass
class BulkServer:
    """A listening bulk socket and its accept loop."""

    port: int
    _sock: socket.socket
    _task: asyncio.Task[None]
    _conns: set[asyncio.Task[None]]

    async def stop(self) -> None:
        self._task.cancel()
        for task in list(self._conns):
            task.cancel()
        await asyncio.gather(self._task, *self._conns, return_exceptions=True)
        self._sock.close()


class _Plain:
    """A plaintext connection: the encoded frames go out with no copy (`sock_sendall` on slices)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        self._loop, self._sock = loop, sock

    async def recv(self, n: int) -> bytes:
        return await self._loop.sock_recv(self._sock, n)

    async def send(self, *parts: bytes | memoryview, stall_s: float) -> None:
        """Send `parts` in order: one `sendmsg` for all of them while the socket's buffer has room
        (a frame's record head and payload in one system call, no timer), the rest through the loop
        within `stall_s` (else ConnectionError: the reader stopped reading)."""
        try:
            sent = self._sock.sendmsg(parts)
        except (BlockingIOError, InterruptedError):
            sent = 0
        left = []
        for part in parts:
            if sent < len(part):
                left.append(memoryview(part)[sent:])
            sent = max(0, sent - len(part))
        if not left:
            return
        try:
            async with asyncio.timeout(stall_s):
                for view in left:
                    await self._loop.sock_sendall(self._sock, view)
        except TimeoutError:
            raise ConnectionError(f"the reader took nothing for {stall_s:g} s") from None


class _Secure:
    """A TLS connection (asyncio's SSL transport over the accepted socket)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer

    @classmethod
    async def accept(cls, sock: socket.socket, context: ssl.SSLContext, timeout_s: float) -> _Secure:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=_MAX_HEADER_BYTES)
        protocol = asyncio.StreamReaderProtocol(reader)
        transport, _ = await loop.connect_accepted_socket(
            lambda: protocol, sock, ssl=context, ssl_handshake_timeout=timeout_s
        )
        return cls(reader, asyncio.StreamWriter(transport, protocol, reader, loop))

    async def recv(self, n: int) -> bytes:
        return await self._reader.read(n)

    async def send(self, *parts: bytes | memoryview, stall_s: float) -> None:
        self._writer.writelines(parts)
        try:
            async with asyncio.timeout(stall_s):
                await self._writer.drain()
        except TimeoutError:
            raise ConnectionError(f"the reader took nothing for {stall_s:g} s") from None

    async def close(self, timeout_s: float) -> None:
        """Flush what is buffered, say close_notify, close (within `timeout_s`)."""
        self._writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._writer.wait_closed(), timeout_s)


async def _connect(sock: socket.socket, tls: ssl.SSLContext | None, timeout_s: float) -> _Plain | _Secure:
    """The accepted connection, after its TLS handshake when the server has a context."""
    if tls is None:
        return _Plain(asyncio.get_running_loop(), sock)
    try:
        return await _Secure.accept(sock, tls, timeout_s)
    except ssl.SSLError as exc:
        raise ConnectionError(f"TLS handshake failed: {exc.reason}") from None


async def _recv_exact(conn: _Plain | _Secure, n: int) -> bytes:
    """`n` bytes, buffered as they arrive (memory follows what the peer sent, not what it announced)."""
    buf = bytearray()
    while len(buf) < n:
        chunk = await conn.recv(min(n - len(buf), 1 << 16))
        if not chunk:
            raise ConnectionError("peer closed the connection")
        buf += chunk
    return bytes(buf)


async def _read_request(conn: _Plain | _Secure) -> pb.StreamBlocksRequest:
    (n,) = _U32.unpack(await _recv_exact(conn, 4))
    if n > _MAX_REQUEST_BYTES:
        raise InvalidArgument(f"bulk request of {n} bytes is over the {_MAX_REQUEST_BYTES}-byte limit")
    try:
        return pb.StreamBlocksRequest.FromString(await _recv_exact(conn, n))
    except DecodeError:
        raise InvalidArgument("bulk request is not a StreamBlocksRequest") from None


async def _serve(sock: socket.socket, peer: str, stream: StreamFn, metrics: ServerMetrics, options: _Options) -> None:
    code = grpc.StatusCode.OK
    started = time.perf_counter()
    limits = options.limits
    labels = (BULK_METHOD.type, BULK_METHOD.service, BULK_METHOD.name)
    metrics.started.labels(*labels).inc()
    payload_served = metrics.payload_bytes.labels("bulk")
    wire_served = metrics.wire_bytes.labels("bulk")
    in_flight = metrics.streams_in_flight.labels("bulk")
    in_flight.inc()
    conn: _Plain | _Secure | None = None
    with sock:
        try:
            try:
                async with asyncio.timeout(limits.request_s):
                    conn = await _connect(sock, options.tls, limits.request_s)
                    req = await _read_request(conn)
            except TimeoutError:
                raise DeadlineExceeded(f"no whole bulk request within {limits.request_s:g} s") from None
            if options.auth is not None:  # as StreamBlocks' metadata is checked over gRPC
                options.auth.check(req.token, "StreamBlocks")
            if options.limiter is not None:
                options.limiter.admit(peer, req.token, options.auth, "StreamBlocks")
            async for raw in stream(req.fingerprint, req.keys, req.start_frame):
                header, payload = frame_parts(raw)
                record = _PAIR.pack(len(header), len(payload)) + bytes(header)
                await conn.send(record, payload, stall_s=limits.send_stall_s)
                payload_served.inc(len(payload))
                wire_served.inc(len(record) + len(payload))
            await conn.send(_PAIR.pack(_END, 0), stall_s=limits.send_stall_s)
        except KVCDNError as exc:
            code = exc.code
            message = str(exc).encode()
            record = _PAIR.pack(_ERROR, 4 + len(message)) + _U32.pack(exc.code.value[0]) + message
            with contextlib.suppress(OSError):
                if conn is not None:  # None: the TLS handshake failed, there is no channel to answer on
                    await conn.send(record, stall_s=limits.request_s)
        except (ConnectionError, OSError) as exc:
            code = grpc.StatusCode.CANCELLED
            log.debug("bulk connection ended: %s", exc)
        except Exception:
            code = grpc.StatusCode.INTERNAL
            log.exception("bulk stream failed unexpectedly")
        finally:
            if isinstance(conn, _Secure):
                await conn.close(limits.request_s)
            in_flight.dec()
            metrics.handled.labels(*labels, code.name).inc()
            metrics.handling_seconds.labels(*labels).observe(time.perf_counter() - started)


async def start_bulk_server(
    host: str,
    port: int,
    stream: StreamFn,
    metrics: ServerMetrics,
    limits: BulkLimits = DEFAULT_LIMITS,
    tls: ssl.SSLContext | None = None,
    auth: Authorizer | None = None,
    limiter: RateLimiter | None = None,
) -> BulkServer:
    """Listen on host:port (0: any free port) and serve `stream`'s frames to each connection, within
    `limits`: connections over a cap are closed at once, and running out of file descriptors pauses
    the accept loop instead of ending it. With `tls` every connection is TLS (its handshake counts
    against the request deadline); with `auth` a request's token is checked as StreamBlocks' is, and
    with `limiter` each stream counts against its caller's rate as a gRPC call does."""
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise InvalidArgument(f"cannot bind the bulk port {host}:{port}: {exc.strerror}") from None
    sock.listen(128)
    sock.setblocking(False)
    conns: set[asyncio.Task[None]] = set()
    options = _Options(limits, tls, auth, limiter)
    per_peer: dict[str, int] = {}

    def done(peer: str, task: asyncio.Task[None]) -> None:
        conns.discard(task)
        per_peer[peer] -= 1
        if not per_peer[peer]:
            del per_peer[peer]

    async def accept_loop() -> None:
        while True:
            try:
                conn, address = await loop.sock_accept(sock)
            except OSError as exc:  # EMFILE, ENFILE, ENOBUFS...: wait for connections to end, go on
                log.warning("bulk port cannot accept (%s); retrying in 0.1 s", exc.strerror or exc)
                await asyncio.sleep(0.1)
                continue
            peer = str(address[0])
            if len(conns) >= limits.connections or per_peer.get(peer, 0) >= limits.per_peer:
                log.warning("bulk port: refusing a connection from %s (%d open)", peer, per_peer.get(peer, 0))
                conn.close()
                continue
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = asyncio.create_task(_serve(conn, peer, stream, metrics, options))
            conns.add(task)
            per_peer[peer] = per_peer.get(peer, 0) + 1
            task.add_done_callback(functools.partial(done, peer))

    return BulkServer(sock.getsockname()[1], sock, asyncio.create_task(accept_loop()), conns)


# --- client --------------------------------------------------------------------------------------


class FrameTarget(Protocol):
    """Where received payloads land (kvcdn.model.tensors.KVAssembler)."""

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
    """The deadline of a stream read from a blocking socket: at `deadline` (time.monotonic) a timer
    shuts the socket down, which ends a read waiting on it, so a sender that trickles bytes cannot
    stretch the stream past it. Use it as a context around the socket's use, inside its `with`: on
    exit the timer is stopped (and a shutdown already under way finished) before the socket closes."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.expired = False
        self._sock = sock
        self._timer = threading.Timer(max(0.0, deadline - time.monotonic()), self._cut)
        self._timer.daemon = True

    def _cut(self) -> None:
        self.expired = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> _CutOff:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        self._timer.join()


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
) -> float:
    """Stream `blocks` from `progress` on, writing each payload in place and verifying it, within
    `timeout_s` for the whole stream (as gRPC's deadline for StreamBlocks); over TLS with `tls`
    (the server's certificate checked for `address`'s host), sending `token` for closed reads.
    Returns the CPU seconds this thread spent on it.

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
    ).SerializeToString()
    peer = f"{address[0]}:{address[1]} (bulk{', TLS' if tls else ''})"
    deadline = time.monotonic() + timeout_s
    cut_off: _CutOff | None = None
    try:
        with socket.create_connection(address, timeout=timeout_s) as raw:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with tls.wrap_socket(raw, server_hostname=address[0]) if tls is not None else raw as sock:
                sock.sendall(_U32.pack(len(request)) + request)
                sock.settimeout(None)  # blocking reads from here on, cut off at the deadline
                stream = _Stream(sock)
                with _CutOff(raw, deadline) as cut_off:
                    _receive_frames(stream, peer, blocks, geometry, assembler, progress)
                    first, second = _PAIR.unpack(stream.read(_PAIR.size))
                    _raise_if_error(stream, peer, first, second)
                if first != _END:
                    raise DigestMismatch(f"{peer} sent more frames than the blocks hold")
    except OSError as exc:  # TimeoutError (connect, handshake), ConnectionError, ssl.SSLError among them
        if isinstance(exc, TimeoutError) or (cut_off is not None and cut_off.expired):
            raise DeadlineExceeded(f"{peer}: the stream did not complete within {timeout_s:g} s") from None
        if isinstance(exc, ssl.SSLCertVerificationError):  # as gRPC reports a failed handshake: the next edge is tried
            raise Unavailable(f"{peer}: the server's certificate does not verify: {exc.verify_message}") from None
        raise Unavailable(f"{peer}: {exc}") from None
    return time.thread_time() - cpu_s


def _raise_if_error(stream: _Stream, peer: str, marker: int, length: int) -> None:
    """Raise the typed error an error record carries (`marker` and `length` already read); a record
    too short to hold a status is a malformed stream (DigestMismatch: the caller fails over)."""
    if marker != _ERROR:
        return
    if length < _U32.size:
        raise DigestMismatch(f"{peer} sent an error record of {length} bytes, too short for a status")
    record = stream.read(min(length, _MAX_REQUEST_BYTES))
    (code,) = _U32.unpack_from(record)
    raise error_for(_CODES.get(code, grpc.StatusCode.UNKNOWN), record[4:].decode(errors="replace"), peer)


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


def _settle(
    peer: str,
    geometry: Geometry,
    assembler: FrameTarget,
    progress: Progress,
    info: pb.BlockInfo,
    index: int,
    views: list[memoryview],
) -> None:
    """Frame `index` of `info`'s block is written: verify it, advance `progress` past it, and hand on
    what it completes (decode, copy to a GPU)."""
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
        _settle(peer, geometry, assembler, progress, d.info, d.index, views)

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
            settle(d, _receive_frame(stream, peer, d.info, d.index, geometry, assembler))


def _receive_frame(
    stream: _Stream,
    peer: str,
    info: pb.BlockInfo,
    index: int,
    geometry: Geometry,
    assembler: FrameTarget,
) -> list[memoryview]:
    """Frame `index` of `info`'s block, its record parsed and checked, written in place; returns the
    views its payload landed in (typed errors for an error record or the stream's end)."""
    header_len, payload_len = _PAIR.unpack(stream.read(_PAIR.size))
    _raise_if_error(stream, peer, header_len, payload_len)
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
