"""The origin's store as the source of truth: a corrupt block is quarantined and recomputed from its
document's token ids (raw and encoded, on a read or under a publish), one nobody can recompute is
DATA_LOSS; purges find orphans through the manifest index (rebuilt on restart); a byte budget refuses
publishes that could exceed it, before any prefill."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvcdn.client import CacheReader, ClientConfig, KVClient
from kvcdn.errors import DigestMismatch, LimitExceeded
from kvcdn.model import adapter
from kvcdn.model.loading import LoadedModel
from kvcdn.model.prompt import document_ids
from kvcdn.origin.store import ManifestStore
from kvcdn.spec.identity import encoded_key
from kvcdn.wire.frames import encode_block
from tests.conftest import SAMPLES, start_network, stop_network

TEXT = (SAMPLES / "apache-2.0.txt").read_text()[:2500]
OTHER = TEXT[:1500] + " An ending of another document."


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))


async def _stream(address: str, fingerprint: str, key: bytes) -> bytes:
    async with CacheReader(address) as reader:
        return b"".join([raw async for raw in reader.stream(fingerprint, [key])])


@pytest.mark.parametrize("codec", ["raw", "lossless"])
async def test_a_corrupt_origin_block_is_quarantined_and_recomputed(
    llama: LoadedModel, tmp_path: Path, codec: str
) -> None:
    net = await start_network(llama, tmp_path / "store", codecs=("lossless",), read_cache_bytes=0)
    origin = net.origin
    try:
        manifest = (await origin.publish("doc", TEXT)).manifest
        key = encoded_key(manifest.blocks[1].key, codec)
        path = origin.blocks.path(key)
        original = path.read_bytes()
        before = await _stream(net.origin_server.address, llama.fingerprint_hex, key)
        _flip(path)
        # Read straight from the origin: the same frames as before the flip, from recomputed bytes.
        assert await _stream(net.origin_server.address, llama.fingerprint_hex, key) == before
        assert path.read_bytes() == original  # recomputed bit for bit (CPU, same prefill as the publish)
        quarantined = list((tmp_path / "store" / "quarantine").iterdir())
        assert len(quarantined) == 1 and quarantined[0].name.startswith(key.hex())
        assert origin.blocks.quarantined == 1 and origin.blocks_repaired == 1
        assert origin.prefill_runs == (2 if codec == "raw" else 1)  # an encoding is re-encoded, not prefilled
        # And through an edge, an agent gets the exact cache.
        doc = document_ids(llama.tokenizer, TEXT)
        _flip(origin.blocks.path(encoded_key(manifest.blocks[2].key, codec)))
        async with KVClient(ClientConfig((net.edge_address,), codecs=(codec,))) as client:
            fetched = await client.fetch(llama, doc)
        assert fetched.cached_tokens == len(doc)
        for (k, v), (rk, rv) in zip(fetched.layers, adapter.prefill(llama.model, doc), strict=True):
            assert torch.equal(k, rk) and torch.equal(v, rv)
        assert origin.blocks_repaired == 2
    finally:
        await stop_network(net)


async def test_a_publish_over_a_corrupt_shared_prefix_recomputes_it(llama: LoadedModel, tmp_path: Path) -> None:
    net = await start_network(llama, tmp_path / "store", read_cache_bytes=0)
    try:
        a = (await net.origin.publish("a", TEXT)).manifest
        _flip(net.origin.blocks.path(a.blocks[0].key))
        b = (await net.origin.publish("b", OTHER)).manifest  # reuses a's prefix: finds it corrupt
        assert net.origin.blocks.quarantined == 1
        for manifest in (a, b):
            for info in manifest.blocks:
                stored, _, _ = net.origin.blocks.get(info.key)  # every block whole again
                assert stored.frame_digests == info.frame_digests
    finally:
        await stop_network(net)


async def test_a_corrupt_block_nobody_can_recompute_is_data_loss(llama: LoadedModel, tmp_path: Path) -> None:
    net = await start_network(llama, tmp_path / "store", read_cache_bytes=0)
    try:
        payload = bytes(range(256)) * 64
        block = encode_block(bytes([7]) * 32, 0, 1, payload, llama.geometry.frame_bytes)
        net.origin.blocks.put(block.info, payload, llama.geometry.frame_bytes)  # no manifest names it
        _flip(net.origin.blocks.path(block.info.key))
        with pytest.raises(DigestMismatch, match="no manifest with token ids uses it: publish its document again"):
            await _stream(net.origin_server.address, llama.fingerprint_hex, block.info.key)
        assert net.origin.blocks.quarantined == 1 and net.origin.blocks_repaired == 0
        assert not net.origin.blocks.path(block.info.key).exists()
        async with CacheReader(net.origin_server.address) as reader:  # still serving
            assert (await reader.info()).fingerprint == llama.fingerprint_hex
    finally:
        await stop_network(net)


async def test_the_manifest_index_finds_orphans_and_survives_a_restart(llama: LoadedModel, tmp_path: Path) -> None:
    net = await start_network(llama, tmp_path / "store", codecs=("lossless",))
    try:
        a = (await net.origin.publish("a", TEXT)).manifest
        b = (await net.origin.publish("b", OTHER)).manifest
        a2 = (await net.origin.publish("a", TEXT, ["raw"])).manifest  # version 2: raw only
    finally:
        await stop_network(net)
    store = ManifestStore(tmp_path / "store")  # as a restarted origin builds it
    shared = a.blocks[0].key
    assert store.users(shared) == [("a", 1), ("a", 2), ("b", 1)]
    assert store.users(encoded_key(shared, "lossless")) == [("a", 1), ("b", 1)]
    # Dropping a v1 orphans only its lossless copies of blocks b does not share.
    orphans = store.delete("a", 1)
    only_a = [blk.key for blk in a.blocks if blk.key not in {x.key for x in b.blocks}]
    assert sorted(orphans) == sorted(encoded_key(k, "lossless") for k in only_a)
    assert store.delete("a", a2.version) == [k for k in only_a]
    assert ManifestStore(tmp_path / "store").users(only_a[0]) == []


async def test_a_store_budget_refuses_a_publish_before_computing(llama: LoadedModel, tmp_path: Path) -> None:
    doc_bytes = len(document_ids(llama.tokenizer, TEXT)) * llama.geometry.token_bytes
    net = await start_network(llama, tmp_path / "store", store_bytes=int(doc_bytes * 1.5))
    try:
        await net.origin.publish("a", TEXT)
        runs = net.origin.prefill_runs
        with pytest.raises(LimitExceeded, match=r"--store-bytes\): purge documents or raise the budget"):
            await net.origin.publish("c", TEXT.replace("License", "Licence"))
        assert net.origin.prefill_runs == runs  # refused before any prefill
        # The budget counts the files, exactly.
        files = sum(p.stat().st_size for p in (tmp_path / "store" / "blocks").rglob("*.blk"))
        assert net.origin.blocks.size() == files
        # What is stored already costs nothing: publishing it again is fine.
        assert (await net.origin.publish("a-again", TEXT)).computed_blocks == 0
        async with CacheReader(net.origin_server.address) as origin:
            with pytest.raises(LimitExceeded):
                await origin.publish("c", TEXT.replace("License", "Licence"))
            await origin.purge("a")
            await origin.purge("a-again")
            assert net.origin.blocks.size() == 0
            await origin.publish("c", TEXT.replace("License", "Licence"))
    finally:
        await stop_network(net)
