"""The edge's disk tier: below memory, verified, byte-bounded, and surviving a restart."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvcdn.client import KVClient
from kvcdn.edge import EdgeConfig, start_edge
from kvcdn.edge.disk import DiskTier
from kvcdn.edge.server import edge_stats
from kvcdn.model import adapter
from kvcdn.model.loading import LoadedModel
from kvcdn.model.prompt import document_ids
from kvcdn.wire.frames import EncodedBlock, encode_block
from kvcdn.wire.metrics import EdgeMetrics
from tests.conftest import SAMPLES, disk_tier, start_network, stop_network

TEXT = (SAMPLES / "gpl-2.0.txt").read_text()[:2500]


def _block(i: int, n_bytes: int = 5000) -> tuple[bytes, EncodedBlock]:
    key = i.to_bytes(32, "big")
    return key, encode_block(key, 0, 4, bytes([i % 256]) * n_bytes, 4096)


async def test_disk_tier_keeps_its_byte_budget_and_deletes_what_it_evicts(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, max_bytes=3 * 5200)
    for i in range(5):
        await tier.put(_block(i)[1])
    s = tier.stats()
    assert s.blocks == 3 and s.bytes <= 3 * 5200 and s.evictions == 2
    assert not tier.path(_block(0)[0]).exists() and tier.path(_block(4)[0]).exists()
    got = await tier.get(_block(4)[0])
    assert got is not None and got.frames == _block(4)[1].frames
    assert await tier.get(_block(0)[0]) is None and tier.misses == 1


async def test_disk_tier_index_survives_a_restart_and_drops_partial_files(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, max_bytes=1 << 20)
    for i in range(3):
        await tier.put(_block(i)[1])
    # A crash mid-write: a temporary file, and a block file cut short.
    (tier.path(_block(0)[0]).parent / ".tmp-crash").write_bytes(b"partial")
    cut = tier.path(_block(1)[0])
    cut.write_bytes(cut.read_bytes()[:-100])
    reopened = DiskTier(tmp_path, max_bytes=1 << 20)
    assert set(reopened.held()) == {_block(0)[0], _block(2)[0]}
    assert reopened.removed_temporaries == 1 and not cut.exists()


async def test_a_corrupt_disk_block_is_dropped_and_counted_as_a_miss(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, max_bytes=1 << 20)
    key, block = _block(7)
    await tier.put(block)
    path = tier.path(key)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    assert await tier.get(key) is None
    assert tier.corrupt == 1 and key not in tier and not path.exists()


async def test_edge_serves_from_disk_after_memory_eviction_and_after_restart_without_origin(
    llama: LoadedModel, tmp_path: Path
) -> None:
    net = await start_network(llama, tmp_path / "store")
    disk_dir = tmp_path / "edge-disk"
    # A memory tier too small for one block: everything after the first pull comes from disk.
    config = EdgeConfig(origin=net.origin_server.address, listen="127.0.0.1:0", mem_bytes=1000, disk_dir=disk_dir)
    edge, server = await start_edge(config)
    doc = document_ids(llama.tokenizer, TEXT)
    try:
        manifest = (await net.origin.publish("gpl", TEXT)).manifest
        async with KVClient([server.address]) as client:
            await client.fetch(llama, doc)
            await edge.settle()  # clients finish before the edge's disk writes do
            again = await client.fetch(llama, doc)
        assert edge.origin_fetches == len(manifest.blocks)
        assert disk_tier(edge).hits == len(manifest.blocks)
        assert again.cached_tokens == len(doc)
        stats = dict(edge_stats(edge))
        assert stats[EdgeMetrics.DISK.hits] == len(manifest.blocks)
        assert stats[EdgeMetrics.DISK.blocks] == len(manifest.blocks) and stats[EdgeMetrics.DISK.bytes] > again.n_bytes
    finally:
        await server.stop(0)
        await edge.close()
        await stop_network(net)
    # The origin is gone; a new edge process on the same disk still serves the whole cache.
    edge, server = await start_edge(config)
    try:
        async with KVClient([server.address]) as client:
            fetched = await client.fetch(llama, doc)
        assert fetched.cached_tokens == len(doc) and edge.origin_fetches == 0
        for (k, v), (rk, rv) in zip(fetched.layers, adapter.prefill(llama.model, doc), strict=True):
            assert torch.equal(k, rk) and torch.equal(v, rv)
    finally:
        await server.stop(0)
        await edge.close()


async def test_a_corrupt_disk_block_is_refetched_and_the_client_never_sees_it(
    llama: LoadedModel, tmp_path: Path
) -> None:
    net = await start_network(llama, tmp_path / "store")
    config = EdgeConfig(
        origin=net.origin_server.address, listen="127.0.0.1:0", mem_bytes=1000, disk_dir=tmp_path / "disk"
    )
    edge, server = await start_edge(config)
    try:
        manifest = (await net.origin.publish("gpl", TEXT)).manifest
        doc = document_ids(llama.tokenizer, TEXT)
        async with KVClient([server.address]) as client:
            await client.fetch(llama, doc)
            await edge.settle()
            path = disk_tier(edge).path(manifest.blocks[1].key)
            data = bytearray(path.read_bytes())
            data[-3] ^= 0x10
            path.write_bytes(bytes(data))
            fetched = await client.fetch(llama, doc)
        assert fetched.cached_tokens == len(doc)
        assert disk_tier(edge).corrupt == 1 and edge.origin_fetches == len(manifest.blocks) + 1
    finally:
        await server.stop(0)
        await edge.close()
        await stop_network(net)


def test_edge_config_rejects_negative_budgets() -> None:
    from kvcdn.errors import InvalidArgument

    with pytest.raises(InvalidArgument):
        EdgeConfig(origin="o:1", disk_bytes=-1)
