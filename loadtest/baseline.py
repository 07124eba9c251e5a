"""The baselines the benchmark compares fetches with, measured in the same run.

`RawTCP` (`raw_tcp_gbps`): a plain TCP transfer of the same number of bytes from another process over
loopback, over as many connections at once as the fetch used, into a pre-touched buffer (stdlib only,
so the spawned sender starts in a blink); the benchmark times one after each fetch, so both see the
same moment of a shared machine. The bytes are a known pattern, checked after each timed transfer,
so a baseline that moved less (or other) data than it claims fails instead of flattering the comparison.
With `tls` (the server's and the client's files), every connection is TLS with the contexts the bulk
port uses, so a fetch over TLS is compared with TLS itself on the same cores.

`blake3_gbps`: one core hashing the same bytes in frames, as a receiver verifies them. A verified
fetch cannot beat `verified_bound(raw, hash) = 1 / (1/raw + 1/hash)` where the receiving core both
receives and hashes every byte (on two cores the sender takes the other one).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import socket
import ssl
import struct
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

import blake3
import psutil

if TYPE_CHECKING:  # not imported for plaintext: the spawned sender then needs the stdlib only
    from kvcdn.wire.tls import TLSFiles

__all__ = ["RawTCP", "blake3_gbps", "cpu_seconds", "raw_tcp_gbps", "verified_bound"]

_CHUNK = 1 << 20
_PATTERN = bytes(range(256)) * (_CHUNK // 256)


def _send_part(peer: socket.socket, tls: ssl.SSLContext | None) -> None:
    """Serve one connection: it asks for (offset, length) of the stream, byte i of which is i % 256."""
    buf = memoryview(_PATTERN)
    if tls is not None:
        peer = tls.wrap_socket(peer, server_side=True)
    with peer:
        head = b""
        while len(head) < 16:  # (no MSG_WAITALL: TLS sockets take no flags)
            chunk = peer.recv(16 - len(head))
            if not chunk:
                return
            head += chunk
        offset, length = struct.unpack("!QQ", head)
        assert offset % 256 == 0
        while length:
            take = min(length, _CHUNK)
            peer.sendall(buf[:take])
            length -= take


def _tcp_sender(conn: Connection, tls: TLSFiles | None) -> None:
    context = tls.server_context() if tls is not None else None
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(64)
        conn.send(srv.getsockname()[1])
        while True:  # a thread per connection (sendall releases the GIL); the parent ends this process
            peer, _ = srv.accept()
            threading.Thread(target=_send_part, args=(peer, context), daemon=True).start()


def _receive_part(port: int, view: memoryview, offset: int, tls: ssl.SSLContext | None) -> None:
    n_bytes = len(view)
    with (
        socket.create_connection(("127.0.0.1", port)) as raw,
        tls.wrap_socket(raw, server_hostname="127.0.0.1") if tls is not None else raw as s,
    ):
        s.sendall(struct.pack("!QQ", offset, n_bytes))
        got = 0
        while got < n_bytes:
            n = s.recv_into(view[got:], min(n_bytes - got, 4 * _CHUNK))
            if n == 0:
                raise ConnectionError(f"the sender closed after {got} of {n_bytes} bytes")
            got += n


class RawTCP:
    """A plain TCP sender in another process over loopback, kept for several timed transfers (so a
    benchmark can time one after each fetch, side by side); in TLS with `tls` = (server files, client
    files), whose handshake is timed too, as a fetch's is."""

    def __init__(self, tls: tuple[TLSFiles, TLSFiles] | None = None) -> None:
        self._tls = tls
        self._client = tls[1].client_context() if tls is not None else None
        self._sink = bytearray()
        self.receiver_cpu_s = 0.0
        """CPU seconds this process spent receiving the last transfer (the check after it not counted)."""
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        self._proc = ctx.Process(target=_tcp_sender, args=(child, tls[0] if tls else None), daemon=True)
        self._proc.start()
        try:
            self._port: int = parent.recv()
        except BaseException:
            self.close()
            raise

    @property
    def sender_pid(self) -> int:
        """The sending process (to read its CPU time)."""
        pid = self._proc.pid
        assert pid is not None
        return pid

    def close(self) -> None:
        self._proc.kill()
        self._proc.join(10)

    def __enter__(self) -> RawTCP:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def seconds(self, n_bytes: int, streams: int = 1) -> float:
        """The time of one transfer of `n_bytes` into a pre-touched buffer, split over `streams`
        connections at once (parts of whole MiB, each received by a thread of its own); raises
        ConnectionError if the sender stops early and ValueError if the bytes arrive changed."""
        if len(self._sink) != n_bytes:
            self._sink = bytearray(n_bytes)
        view = memoryview(self._sink)
        part = -(-n_bytes // streams // _CHUNK) * _CHUNK or _CHUNK
        parts = [(offset, view[offset : offset + part]) for offset in range(0, n_bytes, part)]
        with ThreadPoolExecutor(len(parts)) as pool:
            t0, cpu_s = time.perf_counter(), time.process_time()
            for done in [pool.submit(_receive_part, self._port, v, offset, self._client) for offset, v in parts]:
                done.result()
            took = time.perf_counter() - t0
            self.receiver_cpu_s = time.process_time() - cpu_s
        pattern = memoryview(_PATTERN)
        for offset in range(0, n_bytes, _CHUNK):  # not timed: the stream is byte i = i % 256
            chunk = view[offset : offset + _CHUNK]
            if chunk != pattern[: len(chunk)]:
                raise ValueError(f"the raw TCP baseline received other bytes than were sent at byte {offset}")
        return took


def raw_tcp_gbps(
    n_bytes: int, repeats: int = 3, streams: int = 1, tls: tuple[TLSFiles, TLSFiles] | None = None
) -> float:
    """Best GB/s of `repeats` RawTCP transfers of `n_bytes` over `streams` connections."""
    with RawTCP(tls) as tcp:
        return n_bytes / min(tcp.seconds(n_bytes, streams) for _ in range(repeats)) / 1e9


def blake3_gbps(n_bytes: int, frame_bytes: int, repeats: int = 3) -> float:
    """Best GB/s of one thread computing the BLAKE3 digest of each `frame_bytes` frame of `n_bytes`."""
    view = memoryview(bytearray(n_bytes))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for offset in range(0, n_bytes, frame_bytes):
            blake3.blake3(view[offset : offset + frame_bytes]).digest()
        best = min(best, time.perf_counter() - t0)
    return n_bytes / best / 1e9


_CPUCLOCK_SCHED = 2
"""Linux: the clock id of process `pid`'s CPU time is `((~pid) << 3) | 2` (clock_getcpuclockid)."""


def cpu_seconds(pids: Sequence[int]) -> float:
    """CPU seconds (user and system, every thread, exited ones too) the processes `pids` have run so
    far: a benchmark reads it before and after a transfer to learn what the transfer cost each side.
    On Linux from each process's CPU clock, to the nanosecond like the client's own `time.process_time`;
    elsewhere psutil's times, in ticks of 10 ms (an edge's share of a 25 ms fetch would read 0 or 10)."""
    return sum(_cpu_s(pid) for pid in pids)


def _cpu_s(pid: int) -> float:
    if sys.platform == "linux":
        with contextlib.suppress(OSError):  # (a kernel that refuses: the ticks)
            return time.clock_gettime(((~pid) << 3) | _CPUCLOCK_SCHED)
    return float(sum(psutil.Process(pid).cpu_times()[:2]))


def verified_bound(raw_gbps: float, hash_gbps: float) -> float:
    """GB/s of one core that receives at `raw_gbps` and then hashes at `hash_gbps`, byte for byte."""
    return 1 / (1 / raw_gbps + 1 / hash_gbps)
