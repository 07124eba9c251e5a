"""The bulk frame stream's server, and its record format (kvcdn.wire.receiver is the other end):
StreamBlocks' frames over a TCP connection (format in the .proto), in TLS when the server has
certificates (kvcdn.wire.tls).

gRPC stays the API for everything, and StreamBlocks over gRPC stays available; this path exists
because gRPC's per-message work caps a 1 MiB-frame stream at about half of what the loopback socket
carries on this machine (~2 vs ~4 GB/s). Here the server sends its cached encoded frames with no copy
(one `sendmsg` of a frame's record head and payload slice), and the receiver (kvcdn.wire.receiver)
reads each payload straight into the tensors it belongs to. Under TLS the same records travel
encrypted (asyncio's SSL transport); a deployment that closes reads sends its token in the request
(`token`).
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import contextlib
import functools
import logging
import math
import socket
import ssl
import struct
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc
from google.protobuf.message import DecodeError

from kvcdn.errors import (
    DeadlineExceeded,
    InvalidArgument,
    KVCDNError,
)
from kvcdn.v1 import kvcdn_pb2 as pb
from kvcdn.wire.auth import Authorizer
from kvcdn.wire.frames import Frame, frame_parts
from kvcdn.wire.limits import descriptor_share
from kvcdn.wire.logs import ThrottledWarning
from kvcdn.wire.metrics import BULK_METHOD, ServerMetrics
from kvcdn.wire.ratelimit import RateLimiter, check_call

__all__ = ["DEFAULT_LIMITS", "BulkLimits", "BulkServer", "StreamFn", "Trailers", "start_bulk_server", "trailer_records"]

log = logging.getLogger(__name__)

# The record format, shared with kvcdn.wire.receiver: a record is two u32 (header length, payload
# length), then the serialized FrameHeader and the payload; an error record's first u32 is _ERROR,
# the stream's end is (_END, 0). Trailing metadata (a receipt, a refusal's payment terms) travels in
# trailer records, `(_TRAILER, n)` and n bytes `key | 0x00 | value`, before the end or error record.
_PAIR = struct.Struct("<II")
_U32 = struct.Struct("<I")
_END = 0xFFFFFFFF
_ERROR = 0xFFFFFFFE
_TRAILER = 0xFFFFFFFD
_MAX_REQUEST_BYTES = 1 << 20
_MAX_HEADER_BYTES = 4096
_TLS_PIECE = 256 * 1024
"""Bytes handed to a TLS connection at a time (kvcdn.wire.bulk._Secure.send)."""
_WARN_EVERY_S = 10.0
"""A repeated warning of the accept loop (a full descriptor table, connections over the caps) is
logged once in this long, with its count (it was one line per connection, 10 a second under EMFILE)."""


@dataclass(frozen=True)
class BulkLimits:
    """What one bulk server grants the peers that connect to it (an attacker among them)."""

    connections: int = field(default_factory=lambda: descriptor_share(0.5))
    """Connections served at once; more are closed on accept (default: half the process's file
    descriptor limit, at most 4,096: kvcdn.wire.limits.descriptor_share)."""
    per_peer: int = 512
    """Connections one peer address may hold at once (one agent host runs many agents: generous)."""
    request_s: float = 10.0
    """Deadline for a connection's request to arrive whole, TLS handshake included (a peer that sends
    a length, then nothing)."""
    pending: int = 128
    """Connections between their accept and a whole request (TLS handshake included) at once; the
    others wait their turn, holding only a socket, within their request deadline."""
    pending_per_peer: int = 16
    """Of those, how many one peer address may hold."""
    send_stall_s: float = 60.0
    """Longest a frame may wait for a reader that does not read (it pins the block meanwhile)."""


DEFAULT_LIMITS = BulkLimits()


class _Turns:
    """Turns for connections that have not sent a whole request yet: at most `total` at once and
    `per_peer` for one address; the rest wait in line (a TLS handshake's buffers, ~86 KiB, are only
    allocated on a connection's turn)."""

    def __init__(self, total: int, per_peer: int) -> None:
        self._total = asyncio.Semaphore(total)
        self._per_peer = per_peer
        self._peers: dict[str, tuple[asyncio.Semaphore, list[int]]] = {}

    @contextlib.asynccontextmanager
    async def turn(self, peer: str) -> AsyncIterator[None]:
        sem, users = self._peers.setdefault(peer, (asyncio.Semaphore(self._per_peer), [0]))
        users[0] += 1
        try:
            async with sem, self._total:
                yield
        finally:
            users[0] -= 1
            if not users[0]:
                del self._peers[peer]


@dataclass(frozen=True)
class _Options:
    limits: BulkLimits
    tls: ssl.SSLContext | None
    auth: Authorizer | None
    limiter: RateLimiter | None
    turns: _Turns


_CODES = {code.value[0]: code for code in grpc.StatusCode}

Trailers = dict[str, str | bytes]
"""Trailing metadata of a stream (gRPC's trailing metadata; trailer records on the bulk port)."""
StreamFn = Callable[[pb.StreamBlocksRequest, Trailers], AsyncIterator[Frame]]
"""Serves a request's frames, filling in its trailers as it goes (sent after the last frame)."""


def trailer_records(trailers: Trailers) -> bytes:
    """`trailers` as bulk trailer records."""
    out = []
    for key, value in trailers.items():
        body = key.encode() + b"\x00" + (value if isinstance(value, bytes) else value.encode())
        out.append(_PAIR.pack(_TRAILER, len(body)) + body)
    return b"".join(out)


# --- server --------------------------------------------------------------------------------------


@dataclass
class BulkServer:
    """A listening bulk socket and its accept loop."""

    port: int
    _sock: socket.socket
    _task: asyncio.Task[None]
    _conns: dict[asyncio.Task[None], socket.socket]
    """Each connection's task and its socket."""

    async def stop(self) -> None:
        self._task.cancel()
        conns = dict(self._conns)
        for task in conns:
            task.cancel()
        await asyncio.gather(self._task, *conns, return_exceptions=True)
        for sock in conns.values():  # a task cancelled before it ran never reached its own close
            sock.close()
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


class _LeanTLS(asyncio.sslproto.SSLProtocol):
    """asyncio's TLS protocol with a 32 KiB receive buffer instead of 256 KiB: a bulk connection only
    ever receives its request, and the buffer is allocated (and touched) on accept, before the peer
    has proved anything (400 pending handshakes cost +121 MiB with the stock buffer)."""

    max_size = 32 * 1024


class _App(asyncio.StreamReaderProtocol):
    """A stream reader's protocol that keeps the transport it was given (the TLS layer's)."""

    transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        super().connection_made(transport)


class _Secure:
    """A TLS connection (asyncio's TLS protocol, lean, over the accepted socket)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer

    @classmethod
    async def accept(cls, sock: socket.socket, context: ssl.SSLContext, timeout_s: float) -> _Secure:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=_MAX_HEADER_BYTES)
        app = _App(reader)
        handshake: asyncio.Future[None] = loop.create_future()
        tls = _LeanTLS(loop, app, context, handshake, server_side=True, ssl_handshake_timeout=math.ceil(timeout_s))
        raw, _ = await loop.connect_accepted_socket(lambda: tls, sock)
        try:
            await handshake
        except BaseException:
            raw.abort()
            raise
        assert app.transport is not None
        return cls(reader, asyncio.StreamWriter(app.transport, app, reader, loop))

    async def recv(self, n: int) -> bytes:
        return await self._reader.read(n)

    async def send(self, *parts: bytes | memoryview, stall_s: float) -> None:
        """Send `parts` in pieces of _TLS_PIECE, each once the transport's buffer has drained: a reader
        that stops reading leaves at most a piece (and the transport's buffer) waiting in this process,
        not a whole frame and its encrypted copy."""
        try:
            async with asyncio.timeout(stall_s):
                for part in parts:
                    view = memoryview(part)
                    for offset in range(0, len(view), _TLS_PIECE):
                        self._writer.write(view[offset : offset + _TLS_PIECE])
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
                async with asyncio.timeout(limits.request_s), options.turns.turn(peer):
                    conn = await _connect(sock, options.tls, limits.request_s)
                    req = await _read_request(conn)
            except TimeoutError:
                raise DeadlineExceeded(f"no whole bulk request within {limits.request_s:g} s") from None
            check_call(options.auth, options.limiter, peer, req.token, "StreamBlocks")  # as over gRPC
            trailers: Trailers = {}
            async for raw in stream(req, trailers):
                header, payload = frame_parts(raw)
                record = _PAIR.pack(len(header), len(payload)) + bytes(header)
                await conn.send(record, payload, stall_s=limits.send_stall_s)
                payload_served.inc(len(payload))
                wire_served.inc(len(record) + len(payload))
            await conn.send(trailer_records(trailers) + _PAIR.pack(_END, 0), stall_s=limits.send_stall_s)
        except KVCDNError as exc:
            code = exc.code
            message = str(exc).encode()
            record = _PAIR.pack(_ERROR, 4 + len(message)) + _U32.pack(exc.code.value[0]) + message
            record = trailer_records(exc.trailers) + record
            with contextlib.suppress(OSError):
                if conn is not None:  # None: the TLS handshake failed, there is no channel to answer on
                    await conn.send(record, stall_s=limits.request_s)
        except (ConnectionError, OSError) as exc:
            code = grpc.StatusCode.CANCELLED
            log.debug("bulk connection ended: %s", exc)
        except asyncio.CancelledError:  # the server stops, or the edge cut a stalled reader
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception:
            code = grpc.StatusCode.INTERNAL
            log.exception("bulk stream failed unexpectedly")
        finally:
            if isinstance(conn, _Secure):
                await conn.close(limits.request_s)
            in_flight.dec()
            metrics.handled.labels(*labels, code.name).inc()
            metrics.handling_seconds.labels(*labels).observe(time.perf_counter() - started)


def _set_once(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)


async def _accept(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> tuple[socket.socket, tuple[str, int]]:
    """The next connection. Unlike `loop.sock_accept`, a cancellation can only come while waiting for
    one, never between accepting a connection and returning it (which left its socket to the garbage
    collector, and a ResourceWarning in whatever ran then)."""
    while True:
        try:
            conn, address = sock.accept()
            return conn, address
        except (BlockingIOError, InterruptedError):
            pass
        ready: asyncio.Future[None] = loop.create_future()
        loop.add_reader(sock.fileno(), _set_once, ready)
        try:
            await ready
        finally:
            loop.remove_reader(sock.fileno())


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
    conns: dict[asyncio.Task[None], socket.socket] = {}
    options = _Options(limits, tls, auth, limiter, _Turns(limits.pending, limits.pending_per_peer))
    per_peer: dict[str, int] = {}
    cannot_accept, refusing = ThrottledWarning(log, _WARN_EVERY_S), ThrottledWarning(log, _WARN_EVERY_S)

    def done(peer: str, task: asyncio.Task[None]) -> None:
        conns.pop(task, None)
        per_peer[peer] -= 1
        if not per_peer[peer]:
            del per_peer[peer]

    async def accept_loop() -> None:
        while True:
            try:
                conn, address = await _accept(loop, sock)
            except OSError as exc:  # EMFILE, ENFILE, ENOBUFS...: wait for connections to end, go on
                cannot_accept("bulk port cannot accept (%s); retrying every 0.1 s", exc.strerror or exc)
                await asyncio.sleep(0.1)
                continue
            peer = str(address[0])
            if len(conns) >= limits.connections or per_peer.get(peer, 0) >= limits.per_peer:
                refusing("bulk port: refusing connections over its caps; the latest from %s", peer)
                conn.close()
                continue
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = asyncio.create_task(_serve(conn, peer, stream, metrics, options))
            conns[task] = conn
            per_peer[peer] = per_peer.get(peer, 0) + 1
            task.add_done_callback(functools.partial(done, peer))

    return BulkServer(sock.getsockname()[1], sock, asyncio.create_task(accept_loop()), conns)
