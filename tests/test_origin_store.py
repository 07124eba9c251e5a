"""The origin's store as the source of truth: a corrupt block is quarantined and recomputed from its
document's token ids (raw and encoded, on a read or under a publish), one nobody can recompute is
DATA_LOSS; purges find orphans through the manifest index (rebuilt on restart); a byte budget refuses
publishes that could exceed it, before any prefill; a damaged manifest or feed record is set aside and
costs only what it described."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvcdn.client import CacheReader, ClientConfig, KVClient
from kvcdn.errors import DigestMismatch, LimitExceeded, NotFound
from kvcdn.model import adapter
from kvcdn.model.loading import LoadedModel
from kvcdn.model.prompt import document_ids
from kvcdn.origin.server import origin_stats
from kvcdn.origin.store import EventLog, ManifestStore
from kvcdn.spec.identity import encoded_key
from kvcdn.v1 import kvcdn_pb2 as pb
from kvcdn.wire.frames import encode_block
from kvcdn.wire.metrics import OriginMetrics
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


async def test_a_damaged_manifest_costs_only_its_own_document(llama: LoadedModel, tmp_path: Path) -> None:
    store = tmp_path / "store"
    net = await start_network(llama, store)
    try:
        await net.origin.publish("a", TEXT)
        await net.origin.publish("b", OTHER)
        path = net.origin.manifests._dir("a") / "1.manifest"
    finally:
        await stop_network(net)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit
    path.write_bytes(bytes(data))
    net = await start_network(llama, store)  # the origin starts (it stopped on a DecodeError before)
    try:
        origin = net.origin
        assert origin.manifests.quarantined == 1 and not path.exists()
        assert [p.name.split(".")[0] for p in (store / "quarantine").iterdir()] == [f"manifest-{path.parent.name}-v1"]
        async with CacheReader(net.origin_server.address) as reader:
            assert (await reader.manifest("b")).version == 1  # everything else is served
            with pytest.raises(DigestMismatch, match=r"'a' v1 was damaged .* publish the document again"):
                await reader.manifest("a")
        republished = (await origin.publish("a", TEXT)).manifest
        assert republished.version == 2  # the damaged version's number is not reused
        async with CacheReader(net.origin_server.address) as reader:
            assert (await reader.manifest("a")).content_digest == republished.content_digest
        # Damaged while running: the next read quarantines it, the rest goes on.
        (origin.manifests._dir("b") / "1.manifest").write_bytes(b"\xff" * 40)
        with pytest.raises(DigestMismatch):
            await origin.manifest("b", 0)
        assert origin.manifests.quarantined == 2
        assert dict(origin_stats(origin))[OriginMetrics.METADATA_QUARANTINED] == 2
        # Purging every version forgets the damaged ones too.
        assert (await origin.purge("b", 0))[0] == [1]
        with pytest.raises(NotFound):
            await origin.manifest("b", 0)
    finally:
        await stop_network(net)
    assert ManifestStore(store).next_version("a") == 3  # after a restart too


def test_manifests_written_before_the_digest_are_read_and_rewritten(tmp_path: Path) -> None:
    store = ManifestStore(tmp_path)
    manifest = pb.Manifest(document="old", version=4, content_digest=b"d" * 32)
    path = store._dir("old") / "4.manifest"
    path.parent.mkdir(parents=True)
    path.write_bytes(manifest.SerializeToString())  # the format before the digest
    store = ManifestStore(tmp_path)
    assert store.get("old") == manifest and path.read_bytes().startswith(b"KVCDNMF1")
    # A bare manifest under another document's path is damage, not an old file.
    other = store._dir("other") / "1.manifest"
    other.parent.mkdir(parents=True)
    other.write_bytes(manifest.SerializeToString())
    store = ManifestStore(tmp_path)
    assert store.quarantined == 1 and store.versions("other") == []


def _event_log(root: Path, n: int) -> list[int]:
    """An invalidation log of `n` events; the offsets of its records."""
    log = EventLog(root)
    offsets = []
    for i in range(n):
        offsets.append(log._valid_bytes)
        log.append(f"doc{i}", 1, [bytes([i]) * 32])
    return offsets


@pytest.mark.parametrize(
    ("where", "empty"),
    [("body of the middle record", [2]), ("length of the middle record", [2]), ("body of the last record", [3])],
)
def test_a_damaged_feed_record_is_skipped_and_the_log_repaired(tmp_path: Path, where: str, empty: list[int]) -> None:
    offsets = _event_log(tmp_path, 3)
    path = tmp_path / "invalidations.log"
    data = bytearray(path.read_bytes())
    at = offsets[2 if "last" in where else 1] + (4 if "body" in where else 1)
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))
    log = EventLog(tmp_path)  # raised DecodeError before (the origin did not start)
    assert [e.seq for e in log.events] == [1, 2, 3] and log.damaged == 1
    assert [e.seq for e in log.events if not e.keys] == empty  # the rest kept their keys
    assert [e.document for e in log.events if e.keys] == [f"doc{i}" for i in range(3) if i + 1 not in empty]
    assert len(list((tmp_path / "quarantine").glob("invalidations.*.log"))) == 1
    assert log.append("later", 1, []).seq == 4
    again = EventLog(tmp_path)  # rewritten whole: nothing is damaged now
    assert again.damaged == 0 and [e.seq for e in again.events] == [1, 2, 3, 4]


def test_a_record_cut_short_by_a_crash_is_not_damage(tmp_path: Path) -> None:
    _event_log(tmp_path, 2)
    path = tmp_path / "invalidations.log"
    path.write_bytes(path.read_bytes()[:-3])
    log = EventLog(tmp_path)
    assert [e.seq for e in log.events] == [1] and log.damaged == 0
    assert log.append("next", 1, []).seq == 2 and [e.seq for e in EventLog(tmp_path).events] == [1, 2]
