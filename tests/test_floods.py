"""Every port bounded: floods of connections that never finish (half-sent HTTP/2 prefaces, pending TLS
handshakes, half-open scrapes) cost the server a bounded number of descriptors, threads and bytes for
a bounded time, and an honest caller is served meanwhile."""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import contextlib
import gc
import socket
import struct
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

from kvcdn.loadtest.attacks import still_open
from kvcdn.v1 import kvcdn_pb2 as pb
from kvcdn.wire.bulk import BulkLimits, start_bulk_server
from kvcdn.wire.frames import encode_block
from kvcdn.wire.limits import GrpcLimits
from kvcdn.wire.metrics import ServerMetrics
from kvcdn.wire.readside import ReadService
from kvcdn.wire.rpc import start_server
from kvcdn.wire.stub import CacheReader
from kvcdn.wire.tls import TLSFiles, make_test_ca
from tests.conftest import Network

PREFACE = b"PRI * HTTP/2.0\r\n"
"""The first half of HTTP/2's client preface: a connection that sends it and stops."""


@contextlib.contextmanager
def _half_open(port: int, n: int, first: bytes) -> Iterator[list[socket.socket]]:
    """`n` connections to `port` that send `first` and then nothing (closed on exit)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=2))
            socks[-1].sendall(first)
        yield socks
    finally:
        for s in socks:
            s.close()


async def test_the_grpc_port_caps_connections_and_drops_half_sent_prefaces(network: Network) -> None:
    limits = GrpcLimits(connections=8, handshake_s=1.0)
    server = await start_server("127.0.0.1:0", ReadService(network.edge, ServerMetrics()), limits=limits)
    try:
        async with CacheReader(server.address) as honest:
            assert (await honest.info()).role == "edge"  # connected before the flood
            with _half_open(server.port, 40, PREFACE) as socks:
                await asyncio.sleep(0.3)
                held = await asyncio.to_thread(still_open, socks)
                assert held <= limits.connections - 1  # the honest channel holds one of the 8
                assert (await honest.info()).role == "edge"  # and is served during the flood
                await asyncio.sleep(limits.handshake_s + 1.0)
                assert await asyncio.to_thread(still_open, socks) == 0  # none outlives the handshake deadline
        async with CacheReader(server.address) as late:  # a new connection after the flood is served
            assert (await late.info()).role == "edge"
    finally:
        await server.stop(0)


async def test_pending_tls_handshakes_on_the_bulk_port_take_turns(tmp_path: Path) -> None:
    files = make_test_ca(tmp_path / "ca", ["127.0.0.1"])
    server_tls = TLSFiles(files["server"], files["server_key"], files["ca"])
    block = encode_block(bytes(32), 0, 1, b"payload" * 100, 256)

    async def stream(fingerprint: str, keys: Sequence[bytes], start: int) -> AsyncIterator[bytes]:
        for frame in block.frames:
            yield frame

    limits = BulkLimits(request_s=1.5, pending=4, pending_per_peer=2)
    server = await start_bulk_server("127.0.0.1", 0, stream, ServerMetrics(), limits, tls=server_tls.server_context())
    try:
        # 30 connections that never start their handshake: only two at a time get TLS buffers.
        with _half_open(server.port, 30, b"") as socks:
            await asyncio.sleep(0.3)
            live = [o for o in gc.get_objects() if issubclass(type(o), asyncio.sslproto.SSLProtocol)]
            assert len(live) <= limits.pending_per_peer
            del live
            # An honest caller from another address is served meanwhile, over TLS with its certificate.
            client = TLSFiles(files["client"], files["client_key"], files["ca"]).client_context()
            request = pb.StreamBlocksRequest(keys=[bytes(32)]).SerializeToString()

            def fetch() -> bytes:
                raw = socket.create_connection(("127.0.0.1", server.port), timeout=5, source_address=("127.0.0.2", 0))
                with client.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                    s.sendall(struct.pack("<I", len(request)) + request)
                    data = b""
                    while chunk := s.recv(1 << 16):
                        data += chunk
                    return data

            assert b"payload" in await asyncio.to_thread(fetch)
            # Every waiting connection is closed by its request deadline, whether it got a turn or not.
            await asyncio.sleep(limits.request_s + 0.5)
            assert await asyncio.to_thread(still_open, socks) == 0
    finally:
        await server.stop()
