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
import threading
import urllib.request
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from kvcdn.client import ClientConfig, KVClient
from kvcdn.edge import EdgeConfig
from kvcdn.edge.pins import Pins
from kvcdn.edge.server import start_edge
from kvcdn.loadtest.attacks import still_open
from kvcdn.model.loading import LoadedModel
from kvcdn.model.prompt import document_ids
from kvcdn.v1 import kvcdn_pb2 as pb
from kvcdn.wire.auth import Authorizer
from kvcdn.wire.bulk import BulkLimits, start_bulk_server
from kvcdn.wire.frames import encode_block
from kvcdn.wire.limits import GrpcLimits
from kvcdn.wire.metrics import ServerMetrics
from kvcdn.wire.ratelimit import CALLER
from kvcdn.wire.readside import ReadService
from kvcdn.wire.rpc import start_server
from kvcdn.wire.stub import CacheReader
from kvcdn.wire.tls import TLSFiles, make_test_ca
from tests.conftest import SAMPLES, Network, start_network, stop_network

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

    async def stream(request: pb.StreamBlocksRequest, trailers: dict[str, str | bytes]) -> AsyncIterator[bytes]:
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


async def test_trickling_scrapes_hold_a_bounded_pool_for_a_bounded_time(monkeypatch: pytest.MonkeyPatch) -> None:
    from kvcdn.wire import metrics as metrics_module

    scrapes = metrics_module._Scrapes
    monkeypatch.setattr(scrapes, "workers", 2)
    monkeypatch.setattr(scrapes, "waiting", 2)
    monkeypatch.setattr(scrapes, "deadline_s", 1.5)
    served = ServerMetrics()
    port = served.start_http("127.0.0.1", 0)
    try:
        with _half_open(port, 10, b"GET /metr") as socks:
            await asyncio.sleep(0.3)
            assert await asyncio.to_thread(still_open, socks) == 4  # 2 answered, 2 waiting, 6 closed
            for _ in range(4):  # a byte every 0.4 s kept a thread forever before
                await asyncio.sleep(0.4)
                for s in socks:
                    with contextlib.suppress(OSError):
                        s.send(b"i")
            threads = [t for t in threading.enumerate() if t.name.startswith("kvcdn-metrics")]
            assert len(threads) <= 2 + 1  # the pool, and the accept loop
            assert await asyncio.to_thread(still_open, socks) == 0  # all past their 1.5 s
        page = await asyncio.to_thread(urllib.request.urlopen, f"http://127.0.0.1:{port}/metrics", timeout=5)
        assert b"process_cpu_seconds_total" in page.read()  # answered whole after the flood
    finally:
        served.stop()


async def test_a_stalled_stream_gives_its_pinned_bytes_way_to_a_reading_one() -> None:
    pins = Pins(budget=3, stall_s=0.3)
    stalled_started = asyncio.Event()

    async def stalled() -> None:
        with pins.stream() as hold:
            assert await pins.take(hold, 2, wait=True)
            stalled_started.set()
            await asyncio.sleep(30)  # a reader that takes nothing: its send never returns

    async def reading() -> int:
        with pins.stream() as hold:
            assert not await pins.take(hold, 2, wait=False)  # no room to load ahead: it does not wait
            assert await pins.take(hold, 2, wait=True)  # its next block waits for room
            return pins.used

    stuck = asyncio.create_task(stalled())
    await stalled_started.wait()
    t0 = asyncio.get_running_loop().time()
    assert await asyncio.wait_for(reading(), 5) == 2
    assert 0.3 <= asyncio.get_running_loop().time() - t0 < 3  # cut once stalled for stall_s, not the send deadline
    assert stuck.cancelled() and pins.streams_cut == 1 and pins.used == 0


async def test_streams_hold_no_more_than_the_pinned_budget(llama: LoadedModel, tmp_path: Path) -> None:
    net = await start_network(llama, tmp_path / "store")
    geometry = llama.geometry
    one_block = geometry.block_bytes(geometry.block_tokens)
    edge, server = await start_edge(
        EdgeConfig(origin=net.origin_server.address, listen="127.0.0.1:0", pinned_bytes=2 * one_block)
    )
    try:
        texts = [(SAMPLES / name).read_text()[:3000] for name in ("apache-2.0.txt", "mpl-2.0.txt", "gpl-3.0.txt")]
        for i, text in enumerate(texts):
            await net.origin.publish(f"doc{i}", text)
        peak = 0

        async def watch() -> None:
            nonlocal peak
            while True:
                peak = max(peak, edge.pins.used)
                await asyncio.sleep(0)

        watcher = asyncio.create_task(watch())
        docs = [document_ids(llama.tokenizer, t) for t in texts for _ in range(3)]
        async with KVClient(ClientConfig((server.address,))) as client:
            fetched = await asyncio.gather(*(client.fetch(llama, ids) for ids in docs))
        watcher.cancel()
        assert [f.cached_tokens for f in fetched] == [len(ids) for ids in docs]
        assert 0 < peak <= 2 * one_block and edge.pins.used == 0  # 9 streams of 5 blocks ahead, within 2
    finally:
        await server.stop(0)
        await edge.close()
        await stop_network(net)


async def test_one_clients_streams_hold_at_most_its_share_of_the_pinned_budget() -> None:
    # 16 readers from one address that never read held the whole budget, so every other client's
    # stream waited stall_s for room; now a client holds at most a quarter (at least two blocks).
    pins = Pins(budget=16, stall_s=30)
    release = asyncio.Event()
    taken: list[tuple[str | None, bool]] = []

    async def stream(client: str | None, n: int, wait: bool = False) -> None:
        CALLER.set(client)  # as the server's boundary sets it for the task serving a call
        with pins.stream() as hold:
            taken.append((client, await pins.take(hold, n, wait=wait)))
            await release.wait()

    flood = [asyncio.create_task(stream("peer 127.0.0.2", 2)) for _ in range(6)]
    await asyncio.sleep(0.01)
    assert [ok for _, ok in taken] == [True, True, False, False, False, False]  # 4 of 16: its share
    others = [asyncio.create_task(stream(c, n)) for c, n in (("peer 127.0.0.3", 6), (None, 6))]
    await asyncio.sleep(0.01)
    assert taken[-2:] == [("peer 127.0.0.3", True), (None, True)]  # a first block of any size; the edges' own
    assert pins.used == 16
    waiting = asyncio.create_task(stream("peer 127.0.0.3", 2, wait=True))
    await asyncio.sleep(0.05)
    assert len(taken) == 8  # over its share (and the budget): it waits
    flood[0].cancel()  # one of the flood's streams ends: room, but not within that client's share
    await asyncio.sleep(0.05)
    assert len(taken) == 8
    others[0].cancel()  # its own first stream ends: its next one proceeds
    await asyncio.sleep(0.05)
    assert taken[-1] == ("peer 127.0.0.3", True)
    release.set()
    await asyncio.gather(*flood, *others, waiting, return_exceptions=True)
    assert pins.used == 0


async def test_servers_name_the_caller_of_each_stream(tmp_path: Path) -> None:
    callers: list[str | None] = []
    block = encode_block(bytes(32), 0, 1, b"payload" * 100, 256)

    async def stream(request: pb.StreamBlocksRequest, trailers: dict[str, str | bytes]) -> AsyncIterator[bytes]:
        callers.append(CALLER.get())
        for frame in block.frames:
            yield frame

    class Reads:
        def stream(self, fingerprint: str, keys: Sequence[bytes], start: int, **_: Any) -> Any:
            return stream(pb.StreamBlocksRequest(fingerprint=fingerprint, keys=keys, start_frame=start), {})

    tokens = {"r" * 32: "reader", "e" * 32: "edge"}
    service = ReadService(Reads(), ServerMetrics(), Authorizer(tokens))  # type: ignore[arg-type]
    server = await start_server("127.0.0.1:0", service, bulk_stream=stream)
    try:
        for token in ("r" * 32, "e" * 32):
            async with CacheReader(server.address, token=token) as reader:
                assert len([f async for f in reader.stream("f", [bytes(32)])]) == len(block.frames)
        request = pb.StreamBlocksRequest(keys=[bytes(32)]).SerializeToString()

        def bulk() -> None:
            with socket.create_connection(("127.0.0.1", server.bulk_port), 5, source_address=("127.0.0.2", 0)) as s:
                s.sendall(struct.pack("<I", len(request)) + request)
                while s.recv(1 << 16):
                    pass

        await asyncio.to_thread(bulk)
        assert callers[0] is not None and callers[0].startswith("reader token ")
        assert callers[1:] == [None, "peer 127.0.0.2"]  # an edge's token: the deployment's own
    finally:
        await server.stop(0)
