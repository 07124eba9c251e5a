"""Bad input and faults get the right gRPC status with a sentence saying what to fix, and the
servers keep serving afterwards."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import struct
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
import torch

from kvcdn.client import CacheReader, ClientConfig, KVClient
from kvcdn.edge import EdgeConfig, start_edge
from kvcdn.errors import (
    DeadlineExceeded,
    DigestMismatch,
    FingerprintMismatch,
    InvalidArgument,
    KVCDNError,
    LimitExceeded,
    NotFound,
    Unavailable,
)
from kvcdn.model.loading import LoadedModel
from kvcdn.model.prompt import document_ids
from kvcdn.model.receiving import KVAssembler
from kvcdn.spec.identity import block_keys
from kvcdn.v1 import kvcdn_pb2 as pb
from kvcdn.v1 import kvcdn_pb2_grpc as pb_grpc
from kvcdn.wire.frames import decode_frame
from kvcdn.wire.receiver import Progress, receive_into
from tests.conftest import Network, memory_tier


async def _still_serving(address: str) -> None:
    async with CacheReader(address) as reader:
        assert (await reader.info()).fingerprint


@pytest.mark.parametrize("server", ["origin", "edge"])
async def test_unknown_document_is_not_found(network: Network, server: str) -> None:
    address = network.origin_server.address if server == "origin" else network.edge_address
    async with CacheReader(address) as reader:
        with pytest.raises(NotFound, match="has not been published"):
            await reader.manifest("nope")
    await _still_serving(address)


@pytest.mark.parametrize(
    ("server", "method"),
    [
        ("edge", "/kvcdn.v1.KVCache/GetManifest"),
        ("edge", "/kvcdn.v1.KVCache/StreamBlocks"),
        ("origin", "/kvcdn.v1.Publisher/Publish"),
    ],
)
async def test_a_request_that_does_not_parse_is_invalid_argument_with_no_traceback(
    network: Network, server: str, method: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Field 1 of each request (document name / fingerprint) with bytes that are not UTF-8: gRPC's own
    # deserializer answered UNKNOWN and logged a traceback per request.
    address = network.origin_server.address if server == "origin" else network.edge_address
    bad = b"\x0a\x02\xff\xfe"
    async with grpc.aio.insecure_channel(address) as channel:
        if method.endswith("StreamBlocks"):
            call = channel.unary_stream(method)(bad, timeout=5)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in call:
                    pass
        else:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await channel.unary_unary(method)(bad, timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "UTF-8" in (caught.value.details() or "") and "incident" not in (caught.value.details() or "")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    await _still_serving(address)


async def test_unknown_version_is_not_found(network: Network, sample_text: str) -> None:
    await network.origin.publish("doc", sample_text)
    async with CacheReader(network.edge_address) as reader:
        with pytest.raises(NotFound, match="no version 7"):
            await reader.manifest("doc", 7)


@pytest.mark.parametrize("server", ["origin", "edge"])
async def test_streaming_an_unknown_key_is_not_found(network: Network, server: str) -> None:
    address = network.origin_server.address if server == "origin" else network.edge_address
    async with CacheReader(address) as reader:
        with pytest.raises(NotFound, match="not stored"):
            async for _ in reader.stream(network.model.fingerprint_hex, [bytes(32)]):
                pass
    await _still_serving(address)


@pytest.mark.parametrize(
    ("keys", "match"),
    [([], "names no block keys"), ([b"short"], "32 raw bytes")],
)
@pytest.mark.parametrize("server", ["origin", "edge"])
async def test_malformed_keys_are_invalid_argument(
    network: Network, server: str, keys: list[bytes], match: str
) -> None:
    address = network.origin_server.address if server == "origin" else network.edge_address
    async with CacheReader(address) as reader:
        with pytest.raises(InvalidArgument, match=match):
            await reader.lookup(network.model.fingerprint_hex, keys)
        with pytest.raises(InvalidArgument, match=match):
            async for _ in reader.stream(network.model.fingerprint_hex, keys):
                pass
    await _still_serving(address)


async def test_too_many_keys_is_resource_exhausted(network: Network) -> None:
    async with CacheReader(network.edge_address) as reader:
        with pytest.raises(LimitExceeded, match="limit is 4096"):
            await reader.lookup(network.model.fingerprint_hex, [bytes(32)] * 5000)


@pytest.mark.parametrize(
    ("name", "text", "match"),
    [
        ("bad name!", "text", "invalid"),
        ("../etc", "text", "invalid"),
        ("doc\n", "text", "invalid"),  # `$` would let a trailing newline through; names fully match
        ("ok", "   ", "empty"),
    ],
)
async def test_malformed_publish_is_invalid_argument(network: Network, name: str, text: str, match: str) -> None:
    async with CacheReader(network.origin_server.address) as origin:
        with pytest.raises(InvalidArgument, match=match):
            await origin.publish(name, text)
    await _still_serving(network.origin_server.address)


async def test_document_over_the_token_limit_is_resource_exhausted(network: Network) -> None:
    async with CacheReader(network.origin_server.address) as origin:
        with pytest.raises(LimitExceeded, match="accepts at most 2000"):
            await origin.publish("long", "word " * 5000)
        # Far over: refused by its size before any tokenizing (2,000 tokens x 16 bytes).
        with pytest.raises(LimitExceeded, match="over 32000 bytes of text"):
            await origin.publish("huge", "x" * 40_000)
    await _still_serving(network.origin_server.address)


async def test_repeated_keys_are_refused_before_any_egress(network: Network, sample_text: str) -> None:
    manifest = (await network.origin.publish("dup", sample_text)).manifest
    key = manifest.blocks[0].key
    async with CacheReader(network.edge_address) as reader:
        with pytest.raises(InvalidArgument, match="more than once"):
            async for _ in reader.stream(network.model.fingerprint_hex, [key] * 100):
                pass
        with pytest.raises(InvalidArgument, match="more than once"):
            await reader.lookup(network.model.fingerprint_hex, [key, key])
    await _still_serving(network.edge_address)


async def test_an_internal_error_names_an_incident_not_the_exception(network: Network) -> None:
    async def explodes(*_: object) -> pb.ServerInfo:
        raise RuntimeError("secret path /var/lib/kvcdn/keys")

    network.edge.info = explodes  # type: ignore[method-assign]
    async with CacheReader(network.edge_address) as reader:
        with pytest.raises(KVCDNError) as caught:
            await reader.info()
    assert "incident" in str(caught.value) and "secret" not in str(caught.value)


async def test_an_edge_that_misstates_the_geometry_is_refused(network: Network, sample_text: str) -> None:
    await network.origin.publish("doc", sample_text)
    real = network.edge.info

    async def inflated() -> pb.ServerInfo:
        info = await real()
        info.geometry.layers *= 1000  # a client sizing buffers from this would allocate ~1000x
        return info

    network.edge.info = inflated  # type: ignore[method-assign]
    async with KVClient([network.edge_address]) as client:
        with pytest.raises(FingerprintMismatch, match="faulty or hostile edge"):
            await client.fetch(network.model, document_ids(network.model.tokenizer, sample_text))


async def test_other_model_fingerprint_is_failed_precondition(
    network: Network, tiny_models: dict[str, LoadedModel], sample_text: str
) -> None:
    await network.origin.publish("doc", sample_text)
    other = tiny_models["qwen3"]
    doc = document_ids(other.tokenizer, sample_text)
    async with KVClient([network.edge_address]) as client:
        with pytest.raises(FingerprintMismatch, match="load the same model"):
            await client.fetch(other, doc)
    # The servers check it too, for clients that skip the local check.
    keys = block_keys(other.fingerprint, doc, network.model.geometry.block_tokens)
    async with CacheReader(network.edge_address) as reader:
        with pytest.raises(FingerprintMismatch):
            await reader.lookup(other.fingerprint_hex, keys)
        with pytest.raises(FingerprintMismatch):
            async for _ in reader.stream(other.fingerprint_hex, keys):
                pass
    await _still_serving(network.edge_address)


async def test_edge_without_its_origin_is_unavailable(network: Network) -> None:
    edge, server = await start_edge(EdgeConfig(origin="127.0.0.1:1", listen="127.0.0.1:0", origin_timeout_s=2))
    try:
        async with CacheReader(server.address) as reader:
            with pytest.raises(Unavailable, match=r"127\.0\.0\.1:1"):
                await reader.info()
            with pytest.raises(Unavailable):
                await reader.manifest("doc")
        await _still_serving_health(server.address)
    finally:
        await server.stop(0)
        await edge.close()


async def _still_serving_health(address: str) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        resp = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("bulk", [True, False], ids=["bulk", "grpc"])
async def test_tampered_frames_from_an_edge_raise_and_never_yield_a_cache(
    network: Network, sample_text: str, bulk: bool
) -> None:
    model = network.model
    manifest = (await network.origin.publish("doc", sample_text)).manifest
    doc = document_ids(model.tokenizer, sample_text)
    async with KVClient(ClientConfig((network.edge_address,), bulk=bulk)) as client:
        await client.fetch(model, doc)  # the edge now holds every block
        # A compromised edge flips one byte of a cached frame (the last byte is payload).
        key = manifest.blocks[1].key
        block = await memory_tier(network.edge).get(key)
        assert block is not None
        frames = list(block.frames)
        frames[0] = bytes(frames[0][:-1]) + bytes([frames[0][-1] ^ 0x01])
        await memory_tier(network.edge).put(replace(block, frames=tuple(frames)))
        with pytest.raises(DigestMismatch, match="BLAKE3"):
            await client.fetch(model, doc)


async def test_start_frame_past_the_block_is_invalid_argument(network: Network, sample_text: str) -> None:
    manifest = (await network.origin.publish("doc", sample_text)).manifest
    async with CacheReader(network.edge_address) as reader:
        with pytest.raises(InvalidArgument, match="start_frame"):
            async for _ in reader.stream(network.model.fingerprint_hex, [manifest.blocks[0].key], 99):
                pass
        frames = [raw async for raw in reader.stream(network.model.fingerprint_hex, [manifest.blocks[0].key], 1)]
    assert decode_frame(frames[0])[0].frame_index == 1


async def test_standard_protobuf_stub_reads_streamed_frames(network: Network, sample_text: str) -> None:
    manifest = (await network.origin.publish("doc", sample_text)).manifest
    async with grpc.aio.insecure_channel(network.edge_address) as channel:
        stub = pb_grpc.KVCacheStub(channel)
        req = pb.StreamBlocksRequest(fingerprint=network.model.fingerprint_hex, keys=[manifest.blocks[0].key])
        frames = [f async for f in stub.StreamBlocks(req, timeout=10)]
    assert sum(len(f.payload) for f in frames) == manifest.blocks[0].n_bytes


def test_bad_model_folders_are_one_clear_error_each(tmp_path: Path, llama: LoadedModel) -> None:
    from kvcdn.model.loading import load_model

    with pytest.raises(InvalidArgument, match="not a model directory"):
        load_model(str(tmp_path / "missing"))
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(InvalidArgument, match=r"folder without config\.json"):
        load_model(str(folder))
    (folder / "config.json").write_text("{}")
    with pytest.raises(InvalidArgument, match="not a transformers model config"):
        load_model(str(folder))
    (folder / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(InvalidArgument, match="'t5' model, not a causal language model"):
        load_model(str(folder))
    source = Path(llama.name)
    shutil.copy(source / "config.json", folder / "config.json")
    with pytest.raises(InvalidArgument, match="has no tokenizer"):
        load_model(str(folder))
    for f in source.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
            shutil.copy(f, folder / f.name)
    with pytest.raises(InvalidArgument, match="no weights"):
        load_model(str(folder))


@pytest.mark.parametrize(
    ("request_bytes", "match"),
    [
        (struct.pack("<I", 5) + b"\xff\xff\xff\xff\xff", "not a StreamBlocksRequest"),
        (struct.pack("<I", 1 << 30), "over the"),
        (struct.pack("<I", 2) + b"\x12\x00", "fingerprint"),
    ],
)
async def test_bulk_port_answers_bad_requests_with_a_status_and_keeps_serving(
    network: Network, request_bytes: bytes, match: str
) -> None:
    port = network.edge_server.bulk_port
    assert port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request_bytes)
        await writer.drain()
        marker, length = struct.unpack("<II", await reader.readexactly(8))
        record = await reader.readexactly(length)
    finally:
        writer.close()
        await writer.wait_closed()
    assert marker == 0xFFFFFFFE
    expected = grpc.StatusCode.FAILED_PRECONDITION if match == "fingerprint" else grpc.StatusCode.INVALID_ARGUMENT
    assert struct.unpack_from("<I", record)[0] == expected.value[0]
    assert match in record[4:].decode()
    await _still_serving(network.edge_address)


async def test_bulk_stream_errors_reach_the_client_typed(network: Network) -> None:
    async with CacheReader(network.edge_address) as edge:
        address = await edge.bulk_address()
    assert address is not None
    blocks = [pb.BlockInfo(key=bytes(32), index=0, n_tokens=1, n_bytes=8, frame_digests=[bytes(32)])]
    geometry = network.model.geometry
    assembler = KVAssembler(geometry, 1, torch.device("cpu"))
    with pytest.raises(NotFound, match="not stored"):
        await asyncio.to_thread(
            receive_into, address, network.model.fingerprint_hex, blocks, geometry, assembler, Progress(), 5.0
        )


async def test_the_bulk_port_bounds_slow_and_greedy_peers_and_keeps_serving(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from kvcdn.wire.bulk import BulkLimits, start_bulk_server
    from kvcdn.wire.frames import encode_block
    from kvcdn.wire.metrics import ServerMetrics

    block = encode_block(bytes(32), 0, 1, b"payload" * 100, 256)

    async def stream(request: pb.StreamBlocksRequest, trailers: dict[str, str | bytes]) -> AsyncIterator[bytes]:
        for frame in block.frames:
            yield frame

    limits = BulkLimits(connections=16, per_peer=4, request_s=0.5, send_stall_s=1.0)
    server = await start_bulk_server("127.0.0.1", 0, stream, ServerMetrics(), limits)
    loop = asyncio.get_running_loop()

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", server.port)

    try:
        # Six peers announce a 1 MiB request and send nothing: four are held (for request_s), the
        # fifth and sixth are closed at once.
        slow = [await connect() for _ in range(6)]
        for _, writer in slow:
            writer.write(struct.pack("<I", 1 << 20))
            await writer.drain()
        t0 = loop.time()
        endings = await asyncio.gather(*(asyncio.wait_for(r.read(), 5) for r, _ in slow))
        assert loop.time() - t0 < 3  # none is held past its deadline
        refused = [e for e in endings if e == b""]
        timed_out = [e for e in endings if e.startswith(struct.pack("<I", 0xFFFFFFFE))]
        assert len(refused) == 2 and len(timed_out) == 4
        refusals = [r for r in caplog.records if "refusing connections" in r.getMessage()]
        assert len(refusals) == 1  # two refused, one line: a flood of connections is not a flood of log
        assert all(b"no whole bulk request" in e for e in timed_out)
        for _, writer in slow:
            writer.close()
        # A normal request afterwards is served in full.
        reader, writer = await connect()
        request = pb.StreamBlocksRequest(keys=[bytes(32)]).SerializeToString()
        writer.write(struct.pack("<I", len(request)) + request)
        data = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert data.endswith(struct.pack("<II", 0xFFFFFFFF, 0)) and b"payload" in data
    finally:
        await server.stop()


async def test_a_bulk_reader_that_stops_reading_is_cut_off_after_the_send_stall(tmp_path: Path) -> None:
    from kvcdn.wire.bulk import BulkLimits, start_bulk_server
    from kvcdn.wire.frames import encode_block
    from kvcdn.wire.metrics import ServerMetrics

    # 64 MiB in 1 MiB frames: far more than the socket buffers hold, so sends must wait for the reader.
    block = encode_block(bytes(32), 0, 1, bytes(64 << 20), 1 << 20)

    async def stream(request: pb.StreamBlocksRequest, trailers: dict[str, str | bytes]) -> AsyncIterator[bytes]:
        for frame in block.frames:
            yield frame

    metrics = ServerMetrics()
    server = await start_bulk_server("127.0.0.1", 0, stream, metrics, BulkLimits(send_stall_s=0.5))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        request = pb.StreamBlocksRequest(keys=[bytes(32)]).SerializeToString()
        writer.write(struct.pack("<I", len(request)) + request)
        await asyncio.sleep(2.0)  # reads nothing: the server gives up after its send stall
        got = 0
        while chunk := await asyncio.wait_for(reader.read(1 << 20), 5):
            got += len(chunk)
        writer.close()
        assert 0 < got < 64 << 20  # what the buffers held, then the server closed the connection
        in_flight = metrics.streams_in_flight.labels("bulk")._value.get()
        assert in_flight == 0
    finally:
        await server.stop()


async def test_a_lookup_flood_reaches_the_origin_bounded_and_repeated_misses_not_at_all(
    network: Network, sample_text: str
) -> None:
    edge = network.edge
    real = edge.upstream.lookup
    at_once = peak = calls = 0

    async def counted(*args: object, **kwargs: object) -> list[pb.BlockInfo]:
        nonlocal at_once, peak, calls
        at_once, calls = at_once + 1, calls + 1
        peak = max(peak, at_once)
        try:
            await asyncio.sleep(0.01)
            return await real(*args, **kwargs)  # type: ignore[arg-type]
        finally:
            at_once -= 1

    edge.upstream.lookup = counted  # type: ignore[method-assign]
    fingerprint = network.model.fingerprint_hex
    async with CacheReader(edge_address := network.edge_address) as reader:
        # 200 lookups of random keys nobody holds: the origin sees at most origin_lookups at once.
        keys = [[bytes([i % 256, i // 256]) * 16] for i in range(200)]
        answers = await asyncio.gather(*(reader.lookup(fingerprint, k) for k in keys))
        assert all(a == [] for a in answers) and calls == 200 and peak <= edge.config.origin_lookups
        # The same miss again within miss_ttl_s: answered by the edge alone.
        assert await reader.lookup(fingerprint, keys[0]) == [] and calls == 200
        # An agent polls for a document before it is published: once published, it is found as soon
        # as the remembered miss expires (miss_ttl_s).
        model = network.model
        ids = document_ids(model.tokenizer, sample_text)
        doc_keys = block_keys(model.fingerprint, ids, model.geometry.block_tokens)
        assert await reader.lookup(fingerprint, doc_keys) == []
        await network.origin.publish("later", sample_text)
        assert await reader.lookup(fingerprint, doc_keys) == []  # the miss, remembered
        await asyncio.sleep(edge.config.miss_ttl_s)
        assert len(await reader.lookup(fingerprint, doc_keys)) == len(doc_keys)
    await _still_serving(edge_address)


async def test_a_stream_of_unknown_keys_costs_the_origin_one_lookup(network: Network) -> None:
    # The re-attack's amplification: a stream of >= 5 unknown keys made an edge send 5 lookups to the
    # origin (its read-ahead loads looked up their own keys). Now the stream ends at the first block the
    # origin lacks, and nothing after it is loaded ahead.
    edge = network.edge
    real = edge.upstream.lookup
    calls = 0

    async def counted(*args: object, **kwargs: object) -> list[pb.BlockInfo]:
        nonlocal calls
        calls += 1
        return await real(*args, **kwargs)  # type: ignore[arg-type]

    edge.upstream.lookup = counted  # type: ignore[method-assign]
    fingerprint = network.model.fingerprint_hex
    async with CacheReader(network.edge_address) as reader:
        for stream in range(3):
            keys = [bytes([stream, i]) * 16 for i in range(8)]
            with pytest.raises(NotFound):
                async for _ in reader.stream(fingerprint, keys, 0):
                    pass
            assert calls == stream + 1  # one lookup a stream, whatever its length
    await _still_serving(network.edge_address)


async def test_a_bulk_sender_that_trickles_is_cut_off_at_the_stream_deadline(
    network: Network, sample_text: str
) -> None:
    manifest = (await network.origin.publish("trickle", sample_text)).manifest
    info = manifest.blocks[0]
    header = pb.FrameHeader(block_key=info.key, frame_index=0, offset=0, digest=info.frame_digests[0])
    body = header.SerializeToString()
    frame_len = min(network.model.geometry.frame_bytes, info.n_bytes)

    stop = asyncio.Event()
    handlers: list[asyncio.Task[None]] = []

    async def trickles(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handlers.append(asyncio.current_task())  # type: ignore[arg-type]
        try:
            (n,) = struct.unpack("<I", await reader.readexactly(4))
            await reader.readexactly(n)
            writer.write(struct.pack("<II", len(body), frame_len) + body)
            for _ in range(frame_len):  # a byte every 50 ms: each wait is short, the whole is not
                if stop.is_set():
                    break
                writer.write(b"\0")
                await writer.drain()
                await asyncio.sleep(0.05)
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(trickles, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    geometry = network.model.geometry
    assembler = KVAssembler(geometry, info.n_tokens, torch.device("cpu"))
    t0 = asyncio.get_running_loop().time()
    try:
        with pytest.raises(DeadlineExceeded, match="within 1 s"):
            await asyncio.to_thread(
                receive_into,
                ("127.0.0.1", port),
                network.model.fingerprint_hex,
                [info],
                geometry,
                assembler,
                Progress(),
                1.0,
            )
        assert asyncio.get_running_loop().time() - t0 < 3
    finally:
        stop.set()
        await asyncio.gather(*handlers, return_exceptions=True)
        server.close()
        await server.wait_closed()
