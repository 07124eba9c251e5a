"""Failover with resume across edges, and the origin store's crash safety."""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from kvcdn.client import ClientConfig, KVClient
from kvcdn.edge import EdgeConfig, start_edge
from kvcdn.errors import DigestMismatch, Unavailable
from kvcdn.model import adapter
from kvcdn.model.loading import LoadedModel
from kvcdn.model.prompt import document_ids
from kvcdn.spec.identity import encoded_key
from kvcdn.store.blockstore import BlockStore
from kvcdn.wire import receiver as wire_receiver
from kvcdn.wire.frames import encode_block
from tests.conftest import SAMPLES, Network, start_network, stop_network


async def test_unreachable_first_edge_fails_over_to_the_next(network: Network, sample_text: str) -> None:
    await network.origin.publish("doc", sample_text)
    doc = document_ids(network.model.tokenizer, sample_text)
    async with KVClient(["127.0.0.1:1", network.edge_address]) as client:
        await client.info()  # asks every edge in turn: the dead one fails once
        fetched = await client.fetch(network.model, doc)
        # A failed edge is asked last for a while, whatever the ring says, so it costs one failure.
        for key in (bytes([i]) * 32 for i in range(20)):
            assert client.suspects.order(client.placement.route(key)) == [network.edge_address, "127.0.0.1:1"]
    assert fetched.cached_tokens == len(doc)
    assert "127.0.0.1:1" not in fetched.edges_used


TRANSPORTS = ["bulk", "bulk, frame by frame", "grpc"]
"""The bulk stream reading a batch of frames at a time; the same stream when no record is the one
the receiver expects, so it parses every frame from what it handed back to its stream (the path
of error records and of headers encoded otherwise); and gRPC's StreamBlocks."""


def _transport(transport: str, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Set up `transport`; whether it is the bulk stream."""
    if transport == "bulk, frame by frame":
        due = wire_receiver._due

        def unexpected(*args: Any) -> list[Any]:
            return [dataclasses.replace(d, expected=bytes(len(d.expected))) for d in due(*args)]

        monkeypatch.setattr(wire_receiver, "_due", unexpected)
    return transport != "grpc"


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_parallel_runs_and_one_broken_mid_block_resumes_on_the_next_edge_at_that_frame(
    network: Network, sample_text: str, transport: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    bulk = _transport(transport, monkeypatch)
    model = network.model
    manifest = (await network.origin.publish("doc", sample_text)).manifest
    assert len(manifest.blocks[0].frame_digests) > 1, "the test needs multi-frame blocks"
    edge2, server2 = await start_edge(EdgeConfig(origin=network.origin_server.address, listen="127.0.0.1:0"))
    by_address = {network.edge_address: network.edge, server2.address: edge2}
    requests: list[tuple[str, bytes, int, int]] = []
    streaming = peak = 0
    try:
        doc = document_ids(model.tokenizer, sample_text)
        config = ClientConfig((network.edge_address, server2.address), bulk=bulk)
        async with KVClient(config) as client:
            runs = client.runs(list(manifest.blocks))
            first = runs[0].edge  # the edge the first block is streamed from
            (second,) = set(by_address) - {first}
            real = {a: e.stream for a, e in by_address.items()}

            def serving(address: str, dies: bool) -> Callable[..., AsyncIterator[bytes]]:
                async def stream(
                    fp: str, keys: Sequence[bytes], start: int, from_peer: bool = False, **kw: Any
                ) -> AsyncIterator[bytes]:
                    nonlocal streaming, peak
                    requests.append((address, keys[0], len(keys), start))
                    streaming += 1
                    peak = max(peak, streaming)
                    try:
                        await asyncio.sleep(0.01)  # the other runs' streams open meanwhile
                        async for raw in real[address](fp, keys, start, from_peer, **kw):
                            yield raw
                            if dies and keys[0] == manifest.blocks[0].key:
                                raise Unavailable("edge died")  # one frame into the first run
                    finally:
                        streaming -= 1

                return stream

            # The first block's edge dies one frame into its stream.
            by_address[first].stream = serving(first, dies=True)  # type: ignore[method-assign]
            by_address[second].stream = serving(second, dies=False)  # type: ignore[method-assign]
            fetched = await client.fetch(model, doc)
        assert len(runs) > 1 and peak > 1, "the runs streamed at the same time"
        # The second replica was asked for the rest of the first run, from frame 1 of its first block.
        run = runs[0].blocks
        assert [r for r in requests if r[1] == run[0].key][:2] == [
            (first, run[0].key, len(run), 0),
            (second, run[0].key, len(run), 1),
        ]
        assert set(fetched.edges_used) == {first, second}
        for (k, v), (rk, rv) in zip(fetched.layers, adapter.prefill(model.model, doc), strict=True):
            assert torch.equal(k, rk) and torch.equal(v, rv)
    finally:
        await server2.stop(0)
        await edge2.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("fault", ["tampered", "garbage"])
@pytest.mark.parametrize("codec", ["raw", "lossless"])  # an encoded block is verified and resumed alike
async def test_bad_frames_from_an_edge_fail_over_to_the_next_at_that_frame(
    network: Network, sample_text: str, transport: str, fault: str, codec: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    bulk = _transport(transport, monkeypatch)
    model = network.model
    manifest = (await network.origin.publish("doc", sample_text, [codec])).manifest
    first_key = encoded_key(manifest.blocks[0].key, codec)
    edge2, server2 = await start_edge(EdgeConfig(origin=network.origin_server.address, listen="127.0.0.1:0"))
    by_address = {network.edge_address: network.edge, server2.address: edge2}
    asked: list[tuple[str, bytes, int]] = []
    try:
        doc = document_ids(model.tokenizer, sample_text)
        config = ClientConfig((network.edge_address, server2.address), bulk=bulk, codecs=(codec,))
        async with KVClient(config) as client:
            bad, good = client.placement.route(first_key)
            real_bad, real_good = by_address[bad].stream, by_address[good].stream

            async def corrupts_its_second_frame(
                fp: str, keys: Sequence[bytes], start: int, from_peer: bool = False, **kw: Any
            ) -> AsyncIterator[bytes]:
                asked.append((bad, keys[0], start))
                sent = 0
                async for raw in real_bad(fp, keys, start, from_peer, **kw):
                    if sent == 1:  # a compromised edge: a flipped payload byte, or bytes that are no Frame
                        raw = bytes(raw)
                        raw = raw[:-1] + bytes([raw[-1] ^ 1]) if fault == "tampered" else b"\x0a\x7f" + raw[:5]
                    yield raw
                    sent += 1

            async def records(
                fp: str, keys: Sequence[bytes], start: int, from_peer: bool = False, **kw: Any
            ) -> AsyncIterator[bytes]:
                asked.append((good, keys[0], start))
                async for raw in real_good(fp, keys, start, from_peer, **kw):
                    yield raw

            by_address[bad].stream = corrupts_its_second_frame  # type: ignore[method-assign]
            by_address[good].stream = records  # type: ignore[method-assign]
            fetched = await client.fetch(model, doc)
        assert fetched.codec == codec
        first_run = [(address, start) for address, key, start in asked if key == first_key]
        assert first_run[:2] == [(bad, 0), (good, 1)]  # the replica resumed at the bad frame
        for (k, v), (rk, rv) in zip(fetched.layers, adapter.prefill(model.model, doc), strict=True):
            assert torch.equal(k, rk) and torch.equal(v, rv)
    finally:
        await server2.stop(0)
        await edge2.close()


async def test_blocks_travel_from_an_owner_on_the_ring_spread_evenly(network: Network, sample_text: str) -> None:
    model = network.model
    manifest = (await network.origin.publish("doc", sample_text)).manifest
    extra = [await start_edge(EdgeConfig(origin=network.origin_server.address, listen="127.0.0.1:0")) for _ in range(2)]
    edges = {network.edge_address: network.edge} | {server.address: edge for edge, server in extra}
    try:
        doc = document_ids(model.tokenizer, sample_text)
        async with KVClient(ClientConfig(tuple(edges), replicas=2)) as client:
            fetched = await client.fetch(model, doc)
            runs = client.runs(list(manifest.blocks))
            owners = {b.key: client.placement.owners(b.key) for b in manifest.blocks}
        assert fetched.cached_tokens == len(doc)
        assert all(run.edge in owners[b.key] for run in runs for b in run.blocks)
        sent = Counter(run.edge for run in runs for _ in run.blocks)
        # Each edge pulled from the origin exactly the blocks it was asked for: none twice, none astray,
        # and every edge about as many (by primary alone, one such run gave them 19, 20 and 9).
        assert {a: e.origin_fetches for a, e in edges.items() if e.origin_fetches} == dict(sent)
        assert len(sent) == 3 and max(sent.values()) - min(sent.values()) <= 1
    finally:
        for edge, server in extra:
            await server.stop(0)
            await edge.close()


async def test_every_edge_failing_is_unavailable(network: Network, sample_text: str) -> None:
    await network.origin.publish("doc", sample_text)
    doc = document_ids(network.model.tokenizer, sample_text)
    async with KVClient(["127.0.0.1:1", "127.0.0.1:2"]) as client:
        with pytest.raises(Unavailable):
            await client.fetch(network.model, doc)


def test_store_ignores_and_removes_partial_writes(tmp_path: Path) -> None:
    store = BlockStore(tmp_path)
    block = encode_block(bytes(32), 0, 2, bytes(range(200)), 64)
    store.put(block.info, bytes(range(200)), 64)
    # A crash mid-write leaves only a temporary file beside the real ones.
    leftover = store.path(bytes([1] * 32)).parent / ".tmp-crashed"
    leftover.parent.mkdir(parents=True, exist_ok=True)
    leftover.write_bytes(b"half a block")
    reopened = BlockStore(tmp_path)
    assert not leftover.exists() and reopened.removed_temporaries == 1
    assert bytes([1] * 32) not in reopened
    info, payload, frame_bytes = reopened.get(bytes(32))
    assert info == block.info and payload == bytes(range(200)) and frame_bytes == 64


def test_store_rejects_a_truncated_block_file(tmp_path: Path) -> None:
    store = BlockStore(tmp_path)
    block = encode_block(bytes(32), 0, 2, bytes(range(200)), 64)
    store.put(block.info, bytes(range(200)), 64)
    path = store.path(bytes(32))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DigestMismatch):
        BlockStore(tmp_path).get(bytes(32))
    assert not path.exists()
    # A scan on restart drops a truncated file before anything reads it.
    store.put(block.info, bytes(range(200)), 64)
    path.write_bytes(path.read_bytes()[:-10])
    assert BlockStore(tmp_path).files() == [] and not path.exists()


@pytest.mark.parametrize("bulk", [True, False], ids=["bulk", "grpc"])
async def test_a_failure_after_the_last_frame_still_yields_the_verified_cache(
    network: Network, sample_text: str, bulk: bool
) -> None:
    model = network.model
    await network.origin.publish("doc", sample_text)
    real = network.edge.stream

    async def fails_at_the_end(
        fp: str, keys: Sequence[bytes], start: int, from_peer: bool = False, **kw: Any
    ) -> AsyncIterator[bytes]:
        async for raw in real(fp, keys, start, from_peer, **kw):
            yield raw
        raise Unavailable("edge died after sending everything")

    network.edge.stream = fails_at_the_end  # type: ignore[method-assign]
    doc = document_ids(model.tokenizer, sample_text)
    async with KVClient(ClientConfig((network.edge_address,), bulk=bulk)) as client:
        fetched = await client.fetch(model, doc)
    assert fetched.cached_tokens == len(doc)


async def test_with_the_origin_down_edges_serve_what_they_hold_and_misses_fail_fast(
    llama: LoadedModel, tmp_path: Path
) -> None:
    net = await start_network(llama, tmp_path / "store")
    try:
        held = (SAMPLES / "apache-2.0.txt").read_text()[:2000]
        missing = (SAMPLES / "mpl-2.0.txt").read_text()[:2000]
        await net.origin.publish("held", held)
        await net.origin.publish("missing", missing)
        held_ids = document_ids(llama.tokenizer, held)
        async with KVClient([net.edge_address]) as client:
            warm = await client.fetch(llama, held_ids)
            await net.origin_server.stop(0)
            again = await asyncio.wait_for(client.fetch(llama, held_ids), 30)
            assert again.cached_tokens == warm.cached_tokens == len(held_ids)
            for (k, v), (rk, rv) in zip(again.layers, warm.layers, strict=True):
                assert torch.equal(k, rk) and torch.equal(v, rv)
            with pytest.raises(Unavailable):
                await asyncio.wait_for(client.fetch(llama, document_ids(llama.tokenizer, missing)), 30)
    finally:
        await stop_network(net)


async def test_a_bulk_port_that_refuses_falls_back_to_the_same_edges_grpc_port(
    network: Network, sample_text: str
) -> None:
    await network.origin.publish("doc", sample_text)
    doc = document_ids(network.model.tokenizer, sample_text)
    async with KVClient([network.edge_address]) as client:
        assert await client._reader(network.edge_address).bulk_address() is not None  # advertised, cached
        assert network.edge_server.bulk is not None
        await network.edge_server.bulk.stop()  # then refused: a connection cap, a restarted bulk port
        fetched = await client.fetch(network.model, doc)
    assert fetched.cached_tokens == len(doc) and fetched.edges_used == [network.edge_address]
