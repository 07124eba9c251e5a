"""The baselines the benchmark compares fetches with, measured in the same run.

`raw_tcp_gbps`: a plain TCP transfer of the same number of bytes from another process over loopback,
into a pre-touched buffer (stdlib only, so the spawned sender starts in a blink). The bytes are a known
pattern, checked after each timed transfer, so a baseline that moved less (or other) data than it
claims fails instead of flattering the comparison.

`blake3_gbps`: one core hashing the same bytes in frames, as a receiver verifies them. A verified
fetch cannot beat `verified_bound(raw, hash) = 1 / (1/raw + 1/hash)` where the receiving core both
receives and hashes every byte (on two cores the sender takes the other one).
"""

from __future__ import annotations

import multiprocessing as mp
import socket
import time
from multiprocessing.connection import Connection

import blake3

__all__ = ["blake3_gbps", "raw_tcp_gbps", "verified_bound"]

_CHUNK = 1 << 20
_PATTERN = bytes(range(256)) * (_CHUNK // 256)


def _tcp_sender(conn: Connection, n_bytes: int, repeats: int) -> None:
    buf = memoryview(_PATTERN)
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        conn.send(srv.getsockname()[1])
        for _ in range(repeats):
            peer, _ = srv.accept()
            with peer:
                left = n_bytes
                while left:  # byte i of the stream is i % 256
                    take = min(left, _CHUNK)
                    peer.sendall(buf[:take])
                    left -= take


def raw_tcp_gbps(n_bytes: int, repeats: int = 3) -> float:
    """Best GB/s of a plain TCP transfer of `n_bytes` from another process over loopback; raises
    ConnectionError if the sender stops early and ValueError if the bytes arrive changed."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_tcp_sender, args=(child, n_bytes, repeats), daemon=True)
    proc.start()
    port = parent.recv()
    sink = bytearray(n_bytes)
    view = memoryview(sink)
    pattern = memoryview(_PATTERN)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port)) as s:
            got = 0
            while got < n_bytes:
                n = s.recv_into(view[got:], min(n_bytes - got, 4 * _CHUNK))
                if n == 0:
                    raise ConnectionError(f"the sender closed after {got} of {n_bytes} bytes")
                got += n
        best = min(best, time.perf_counter() - t0)
        for offset in range(0, n_bytes, _CHUNK):  # not timed: the stream is byte i = i % 256
            chunk = view[offset : offset + _CHUNK]
            if chunk != pattern[: len(chunk)]:
                raise ValueError(f"the raw TCP baseline received other bytes than were sent at byte {offset}")
    proc.join(10)
    return n_bytes / best / 1e9


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


def verified_bound(raw_gbps: float, hash_gbps: float) -> float:
    """GB/s of one core that receives at `raw_gbps` and then hashes at `hash_gbps`, byte for byte."""
    return 1 / (1 / raw_gbps + 1 / hash_gbps)
