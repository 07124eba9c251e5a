"""The baseline the benchmark compares fetches with: a plain TCP transfer of the same number of bytes
from another process over loopback. Stdlib only, so the spawned sender starts in a blink."""

from __future__ import annotations

import multiprocessing as mp
import socket
import time
from multiprocessing.connection import Connection

__all__ = ["raw_tcp_gbps"]

_CHUNK = 1 << 20


def _tcp_sender(conn: Connection, n_bytes: int, repeats: int) -> None:
    buf = memoryview(bytes(_CHUNK))
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        conn.send(srv.getsockname()[1])
        for _ in range(repeats):
            peer, _ = srv.accept()
            with peer:
                left = n_bytes
                while left:
                    left -= peer.send(buf[: min(left, _CHUNK)])


def raw_tcp_gbps(n_bytes: int, repeats: int = 3) -> float:
    """Best GB/s of a plain TCP transfer of `n_bytes` from another process over loopback."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_tcp_sender, args=(child, n_bytes, repeats), daemon=True)
    proc.start()
    port = parent.recv()
    sink = bytearray(n_bytes)
    view = memoryview(sink)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port)) as s:
            got = 0
            while got < n_bytes:
                n = s.recv_into(view[got:], min(n_bytes - got, 4 * _CHUNK))
                if n == 0:
                    raise ConnectionError("sender closed early")
                got += n
        best = min(best, time.perf_counter() - t0)
    proc.join(10)
    return n_bytes / best / 1e9
