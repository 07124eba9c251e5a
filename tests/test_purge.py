"""Invalidation: a purged document is gone at the origin and from every edge tier, blocks that other
documents share survive, and an edge that was down catches up from the feed."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from kvcdn.client import CacheReader, KVClient
from kvcdn.edge import Edge, EdgeConfig, start_edge
from kvcdn.errors import NotFound
from kvcdn.model.loading import LoadedModel
from kvcdn.model.prompt import document_ids
from tests.conftest import SAMPLES, Network, disk_tier, memory_tier, start_network, stop_network

TEXT = (SAMPLES / "apache-2.0.txt").read_text()[:2500]
OTHER = TEXT[:1500] + " An ending of another document."


async def _applied(edge: Edge, seq: int) -> None:
    """Wait (at most 10 s) until the edge has applied invalidation event `seq`."""
    for _ in range(500):
        if edge.invalidated_seq >= seq:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"the edge applied event {edge.invalidated_seq}, not {seq}, within 10 s")


async def test_purge_removes_a_document_everywhere_and_keeps_shared_blocks(network: Network) -> None:
    model = network.model
    a = (await network.origin.publish("a", TEXT)).manifest
    b = (await network.origin.publish("b", OTHER)).manifest
    shared = {blk.key for blk in a.blocks} & {blk.key for blk in b.blocks}
    assert shared and len(shared) < len(a.blocks)
    doc_a, doc_b = document_ids(model.tokenizer, TEXT), document_ids(model.tokenizer, OTHER)
    async with KVClient([network.edge_address]) as client:
        assert (await client.fetch(model, doc_a)).cached_tokens == len(doc_a)  # the edge now holds a
        async with CacheReader(network.origin_server.address) as origin:
            purged = await origin.purge("a")
        assert list(purged.versions) == [1] and purged.blocks_removed == len(a.blocks) - len(shared)
        await _applied(network.edge, purged.seq)
        for key in {blk.key for blk in a.blocks} - shared:
            assert key not in memory_tier(network.edge) and key not in network.origin.blocks
        # Only the shared prefix of a is still served; b is whole.
        after = await client.fetch(model, doc_a)
        assert after.cached_tokens == len(shared) * model.geometry.block_tokens
        assert (await client.fetch(model, doc_b)).cached_tokens == len(doc_b)
    async with CacheReader(network.edge_address) as edge:
        with pytest.raises(NotFound):
            await edge.manifest("a")
        assert (await edge.manifest("b")).version == b.version


async def test_purging_what_is_not_there_is_not_found(network: Network) -> None:
    await network.origin.publish("a", TEXT)
    async with CacheReader(network.origin_server.address) as origin:
        with pytest.raises(NotFound):
            await origin.purge("nope")
        with pytest.raises(NotFound, match="no version 3"):
            await origin.purge("a", 3)


async def test_an_edge_that_was_down_catches_up_and_never_serves_the_purged_blocks(
    llama: LoadedModel, tmp_path: Path
) -> None:
    net = await start_network(llama, tmp_path / "store")
    config = EdgeConfig(origin=net.origin_server.address, listen="127.0.0.1:0", disk_dir=tmp_path / "disk")
    try:
        manifest = (await net.origin.publish("a", TEXT)).manifest
        doc = document_ids(llama.tokenizer, TEXT)
        edge, server = await start_edge(config)
        async with KVClient([server.address]) as client:
            await client.fetch(llama, doc)  # the edge's disk now holds every block
        await server.stop(0)
        await edge.close()
        assert disk_tier(edge).stats().blocks == len(manifest.blocks)

        async with CacheReader(net.origin_server.address) as origin:
            purged = await origin.purge("a")  # while the edge is down

        edge, server = await start_edge(config)  # restarts on the same disk
        try:
            # Caught up before it started serving: nothing purged is left to serve.
            assert edge.invalidated_seq == purged.seq
            assert disk_tier(edge).stats().blocks == 0
            async with KVClient([server.address]) as client:
                assert (await client.fetch(llama, doc)).cached_tokens == 0
        finally:
            await server.stop(0)
            await edge.close()
    finally:
        await stop_network(net)


async def test_the_feed_survives_an_origin_restart(llama: LoadedModel, tmp_path: Path) -> None:
    net = await start_network(llama, tmp_path / "store")
    try:
        await net.origin.publish("a", TEXT)
        await net.origin.publish("b", OTHER)
        first = await net.origin.purge("a", 0)
        second = await net.origin.purge("b", 1)
    finally:
        await stop_network(net)
    from kvcdn.origin.store import EventLog

    log = EventLog(tmp_path / "store")
    assert [e.seq for e in log.events] == [first[2], second[2]] == [1, 2]
    assert [e.document for e in log.events] == ["a", "b"]
