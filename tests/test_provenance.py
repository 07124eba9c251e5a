"""Publisher signatures: blocks and manifests signed by the origin's key verify at clients and edges
that pin it; a forged or altered info, an unknown key, an unsigned origin and a manifest rolled back to
an older version are refused, and the fetch completes from an honest edge, byte-identical to the
origin's (in-process, and across real processes with an edge whose disk holds forged blocks)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from kvcdn.client import CacheReader, ClientConfig, KVClient
from kvcdn.edge import EdgeConfig, start_edge
from kvcdn.errors import DigestMismatch, InvalidArgument
from kvcdn.model import adapter
from kvcdn.model.loading import LoadedModel
from kvcdn.model.prompt import document_ids
from kvcdn.ops.launcher import Cluster
from kvcdn.spec.identity import digest
from kvcdn.spec.provenance import Signer, TrustStore, Untrusted, block_statement, generate_key
from kvcdn.store.blockstore import BlockStore
from kvcdn.v1 import kvcdn_pb2 as pb
from tests.conftest import SAMPLES, start_network, stop_network

TEXT = (SAMPLES / "apache-2.0.txt").read_text()[:2500]


def _keys(tmp_path: Path, name: str = "publisher") -> tuple[Path, Path]:
    private = tmp_path / "keys" / f"{name}.key"
    public, _ = generate_key(private)
    return private, public


def _same(fetched_layers: Sequence[tuple[torch.Tensor, torch.Tensor]], reference: object) -> bool:
    return all(
        torch.equal(k, rk) and torch.equal(v, rv)
        for (k, v), (rk, rv) in zip(fetched_layers, reference, strict=True)  # type: ignore[call-overload]
    )


def test_a_signature_covers_every_field_a_client_relies_on(tmp_path: Path) -> None:
    private, public = _keys(tmp_path)
    signer, trust = Signer.from_file(private), TrustStore.from_files([public])
    fingerprint = bytes(range(32))
    info = pb.BlockInfo(key=bytes(32), index=3, n_tokens=256, n_bytes=4096, frame_digests=[bytes(32)] * 2)
    signed = signer.sign_block(fingerprint, info)
    trust.check_block(fingerprint, signed)
    for change in (
        lambda i: setattr(i, "index", 4),
        lambda i: setattr(i, "n_tokens", 255),
        lambda i: setattr(i, "n_bytes", 4097),
        lambda i: setattr(i, "codec", "fp8"),
        lambda i: setattr(i, "raw_bytes", 1),
        lambda i: i.frame_digests.__setitem__(1, b"\x01" * 32),
        lambda i: setattr(i, "key", b"\x02" * 32),
    ):
        altered = pb.BlockInfo()
        altered.CopyFrom(signed)
        change(altered)
        assert block_statement(fingerprint, altered) != block_statement(fingerprint, info)
        with pytest.raises(Untrusted, match="does not match"):
            trust.check_block(fingerprint, altered)
    with pytest.raises(Untrusted, match="does not match"):  # the same info for another model
        trust.check_block(bytes(32), signed)
    with pytest.raises(Untrusted, match="signed by no key"):
        trust.check_block(fingerprint, info)
    _, other = _keys(tmp_path, "other")
    with pytest.raises(Untrusted, match=f"signed by key {signer.key_id}"):
        TrustStore.from_files([other]).check_block(fingerprint, signed)


async def test_signed_caches_fetch_and_forged_infos_fail_over_to_an_honest_edge(
    llama: LoadedModel, tmp_path: Path
) -> None:
    private, public = _keys(tmp_path)
    net = await start_network(llama, tmp_path / "store", signing_key=private, trust=(public,))
    liar, liar_server = await start_edge(
        EdgeConfig(origin=net.origin_server.address, listen="127.0.0.1:0", trust=(public,))
    )
    try:
        await net.origin.publish("doc", TEXT)
        doc = document_ids(llama.tokenizer, TEXT)
        reference = adapter.prefill(llama.model, doc)
        real = liar.lookup

        async def forges(
            fingerprint: str, keys: Sequence[bytes], codecs: Sequence[str] = (), from_peer: bool = False
        ) -> list[pb.BlockInfo]:
            forged = []
            for info in await real(fingerprint, keys, codecs, from_peer):
                copy = pb.BlockInfo()  # a compromised edge: new digests for its own bytes, the old signature
                copy.CopyFrom(info)
                copy.frame_digests[0] = digest(b"forged")
                forged.append(copy)
            return forged

        liar.lookup = forges  # type: ignore[method-assign]
        edges = [liar_server.address, net.edge_address]
        for order in (edges, edges[::-1]):  # the forging edge asked first or second: its answer is skipped
            async with KVClient(ClientConfig(tuple(order), trust=(public,))) as client:
                fetched = await client.fetch(llama, doc)
            assert fetched.cached_tokens == len(doc) and _same(fetched.layers, reference)
        # A client that asks only the forging edge gets a clear refusal, not the forged cache.
        async with KVClient(ClientConfig((liar_server.address,), trust=(public,))) as client:
            with pytest.raises(Untrusted, match="does not match"):
                await client.fetch(llama, doc)
        # A client that trusts another key refuses the genuine signatures too.
        _, other = _keys(tmp_path, "other")
        async with KVClient(ClientConfig((net.edge_address,), trust=(other,))) as client:
            with pytest.raises(Untrusted, match="not by a trusted publisher"):
                await client.fetch(llama, doc)
    finally:
        await liar_server.stop(0)
        await liar.close()
        await stop_network(net)


async def test_an_edge_that_pins_a_key_refuses_an_unsigned_origin(llama: LoadedModel, tmp_path: Path) -> None:
    _, public = _keys(tmp_path)
    net = await start_network(llama, tmp_path / "store", trust=(public,))  # the origin signs nothing
    try:
        await net.origin.publish("doc", TEXT)
        async with KVClient([net.edge_address]) as client:
            with pytest.raises(DigestMismatch, match="signed by no key, not by a trusted publisher"):
                await client.fetch(llama, document_ids(llama.tokenizer, TEXT))
    finally:
        await stop_network(net)


async def test_manifests_are_signed_and_a_rollback_to_an_older_version_is_refused(
    llama: LoadedModel, tmp_path: Path
) -> None:
    private, public = _keys(tmp_path)
    net = await start_network(llama, tmp_path / "store", signing_key=private)
    try:
        await net.origin.publish("doc", TEXT)
        await net.origin.publish("doc", TEXT + "\n\nA second version.")
        async with KVClient(ClientConfig((net.edge_address,), trust=(public,))) as client:
            latest = await client.manifest("doc")
            assert latest.version == 2 and latest.signer and latest.issued_at > 0
            assert (await client.manifest("doc", 1)).version == 1  # asked for by number: fine
            real = net.edge.manifest

            async def replays_v1(document: str, version: int, token_ids: bool = False) -> pb.Manifest:
                return await real(document, version or 1, token_ids)

            net.edge.manifest = replays_v1  # type: ignore[method-assign]
            with pytest.raises(Untrusted, match="rollback"):
                await client.manifest("doc")
        _, other = _keys(tmp_path, "other")
        async with KVClient(ClientConfig((net.edge_address,), trust=(other,))) as client:
            with pytest.raises(Untrusted, match="not by a trusted publisher"):
                await client.manifest("doc", 2)
    finally:
        await stop_network(net)


async def test_a_replayed_latest_manifest_is_refused_once_its_validity_has_passed(
    llama: LoadedModel, tmp_path: Path
) -> None:
    # The freeze attack rollback protection cannot see: a client that never saw v2 is shown the v1
    # an edge recorded while v1 was the latest. The origin vouches for a latest for --manifest-ttl.
    private, public = _keys(tmp_path)
    net = await start_network(llama, tmp_path / "store", signing_key=private, manifest_ttl_s=2)
    try:
        await net.origin.publish("doc", TEXT)
        frozen = await net.edge.manifest("doc", 0)
        assert frozen.version == 1 and time.time() < frozen.valid_until <= time.time() + 2
        by_number = await net.edge.manifest("doc", 1)
        assert by_number.valid_until == 0  # not an answer for "the latest"
        await net.origin.publish("doc", TEXT + "\n\nA second version.")

        async def freezes(document: str, version: int, token_ids: bool = False) -> pb.Manifest:
            return frozen if version == 0 else by_number

        net.edge.manifest = freezes  # type: ignore[method-assign]
        trust = TrustStore.from_files([public])
        trust.check_manifest(frozen, latest=True)  # still within its validity: accepted (bounded staleness)
        with pytest.raises(Untrusted, match="for no time"):  # an answer by number passed off as the latest
            trust.check_manifest(by_number, latest=True)
        altered = pb.Manifest()
        altered.CopyFrom(frozen)
        altered.valid_until += 3600
        with pytest.raises(Untrusted, match="does not match"):  # the edge cannot extend it
            trust.check_manifest(altered, latest=True)
        await asyncio.sleep(frozen.valid_until - time.time() + 0.05)
        async with KVClient(ClientConfig((net.edge_address,), trust=(public,))) as client:
            with pytest.raises(Untrusted, match="stale answer"):
                await client.manifest("doc")
            assert (await client.manifest("doc", 1)).version == 1  # by number: no validity needed
        net.edge.manifest = net.edge.upstream.manifest  # type: ignore[method-assign]
        async with KVClient(ClientConfig((net.edge_address,), trust=(public,))) as client:
            assert (await client.manifest("doc")).version == 2  # an honest edge: fresh, and the new one
    finally:
        await stop_network(net)


def _forge_disk(blocks_dir: Path) -> int:
    """What a compromised edge operator does: rewrite every stored block and recompute its digests
    (the publisher's signature stays: it cannot make a new one)."""
    store = BlockStore(blocks_dir)
    forged = 0
    for f in store.files():
        info, payload, frame_bytes = store.get(f.key)
        data = bytearray(payload)
        data[0] ^= 0x40
        info.frame_digests[0] = digest(bytes(data[:frame_bytes]))
        store.put(info, bytes(data), frame_bytes)
        forged += 1
    return forged


def test_an_edge_process_serving_forged_blocks_is_refused_and_the_fetch_completes_elsewhere(
    llama: LoadedModel, tmp_path: Path
) -> None:
    doc = document_ids(llama.tokenizer, TEXT)
    reference = adapter.prefill(llama.model, doc)
    cluster = Cluster(
        store_dir=tmp_path / "store",
        edges=2,
        origin_args=["--model", llama.name, "--dtype", "float32", "--device", "cpu", "--codecs", ""],
        edge_args=["--disk-bytes", "64MiB"],
        edge_disk_root=tmp_path / "disks",
    )

    async def publish_and_fetch(edges: Sequence[str], trust: tuple[Path, ...]) -> object:
        async with KVClient(ClientConfig(tuple(edges), trust=trust, codecs=("raw",))) as client:
            async with CacheReader(cluster.origin_address) as origin:
                await origin.publish("doc", TEXT)
            return await client.fetch(llama, doc)

    with cluster:
        assert cluster.trust_file is not None
        fetched = asyncio.run(publish_and_fetch(cluster.edge_addresses, (cluster.trust_file,)))
        assert _same(fetched.layers, reference)  # type: ignore[attr-defined]
        asyncio.run(asyncio.sleep(1.0))  # the edges' disk writes land after the clients finish
    assert _forge_disk(tmp_path / "disks" / "edge0" / "blocks") > 0

    cluster.untrusting = (0,)  # whoever rewrote edge0's disk also dropped its --trust (which would refuse them)
    with cluster:  # the same store, key and disks; edge0 now serves forged blocks and infos
        trust = (cluster.trust_file,) if cluster.trust_file is not None else ()
        liar = cluster.edge_addresses[:1]
        # The attack, without pinned keys: the forged cache arrives "verified" (digests and all).
        forged = asyncio.run(publish_and_fetch(liar, ()))
        assert forged.cached_tokens == len(doc) and not _same(forged.layers, reference)  # type: ignore[attr-defined]
        # With the publisher's key pinned: refused when the liar is the only edge ...
        with pytest.raises(Untrusted, match="does not match"):
            asyncio.run(publish_and_fetch(liar, trust))
        # ... and completed from the honest edge, byte-identical to the origin's, when there is one.
        fetched = asyncio.run(publish_and_fetch(cluster.edge_addresses, trust))
        assert fetched.cached_tokens == len(doc) and _same(fetched.layers, reference)  # type: ignore[attr-defined]


def _set_expiry(public: Path, when: str) -> None:
    pem = public.read_bytes()
    public.write_bytes(f"Expires: {when}\n".encode() + pem[pem.find(b"-----BEGIN") :])


def test_an_expired_key_signs_nothing_and_verifies_nothing(tmp_path: Path) -> None:
    private = tmp_path / "keys" / "publisher.key"
    public, key = generate_key(private, days=30)
    assert b"Expires: " in public.read_bytes()
    signer, trust = Signer.from_file(private), TrustStore.from_files([public])
    fingerprint = bytes(range(32))
    signed = signer.sign_block(fingerprint, pb.BlockInfo(key=bytes(32), n_tokens=1, frame_digests=[bytes(32)]))
    trust.check_block(fingerprint, signed)  # valid for 30 more days
    assert trust.accepts(key)
    _set_expiry(public, "2026-01-01T00:00:00Z")
    expired = TrustStore.from_files([public])
    assert not expired.accepts(key)
    with pytest.raises(Untrusted, match="expired at 2026-01-01T00:00:00Z: the publisher has to sign with a new key"):
        expired.check_block(fingerprint, signed)
    with pytest.raises(InvalidArgument, match="expired at 2026-01-01T00:00:00Z"):
        Signer.from_file(private)  # the origin will not start with it
    _set_expiry(public, "next tuesday")
    with pytest.raises(InvalidArgument, match="`Expires:` takes a UTC time"):
        TrustStore.from_files([public])


async def test_after_a_key_rotation_edges_answer_with_fresh_signatures_from_what_they_hold(
    llama: LoadedModel, tmp_path: Path
) -> None:
    """The origin moves from key A to key B and every party drops A at once: an edge restarted with
    only B on its disk tier answers lookups with the origin's new signatures and streams what it
    holds (no block loaded again); an agent that trusts only B gets the exact cache."""
    old_private, old_public = _keys(tmp_path, "old")
    new_private, new_public = _keys(tmp_path, "new")
    net = await start_network(llama, tmp_path / "store", signing_key=old_private, trust=(old_public,))
    disk = tmp_path / "edge-disk"
    doc = document_ids(llama.tokenizer, TEXT)
    edge, edge_server = await start_edge(
        EdgeConfig(origin=net.origin_server.address, listen="127.0.0.1:0", disk_dir=disk, trust=(old_public,))
    )
    try:
        await net.origin.publish("doc", TEXT)
        async with KVClient(ClientConfig((edge_server.address,), trust=(old_public,))) as client:
            assert (await client.fetch(llama, doc)).cached_tokens == len(doc)
        loaded = edge.origin_fetches
        assert loaded > 0
        await edge_server.stop(0)
        await edge.close()
        # The rotation: the origin signs with B from now on (as a restart with --signing-key new.key).
        net.origin.signer = Signer.from_file(new_private)
        edge, edge_server = await start_edge(
            EdgeConfig(origin=net.origin_server.address, listen="127.0.0.1:0", disk_dir=disk, trust=(new_public,))
        )
        async with KVClient(ClientConfig((edge_server.address,), trust=(new_public,))) as client:
            fetched = await client.fetch(llama, doc)
        assert fetched.cached_tokens == len(doc) and _same(fetched.layers, adapter.prefill(llama.model, doc))
        assert edge.origin_fetches == 0  # every block streamed from the disk tier it kept
        async with KVClient(ClientConfig((edge_server.address,), trust=(old_public,))) as client:
            with pytest.raises(Untrusted, match="not by a trusted publisher"):
                await client.fetch(llama, doc)  # A is gone from the network too
    finally:
        await edge_server.stop(0)
        await edge.close()
        await stop_network(net)


async def test_the_client_checks_a_manifests_contents_not_only_its_signature(
    llama: LoadedModel, tmp_path: Path
) -> None:
    # Forgeries an edge can make from signed manifests (the re-attack's findings): the signature covers
    # the content digest and the block keys, not the token ids or which request a manifest answers.
    private, public = _keys(tmp_path)
    net = await start_network(llama, tmp_path / "store", signing_key=private)
    real = net.edge.manifest
    try:
        await net.origin.publish("doc", TEXT)
        await net.origin.publish("doc", TEXT + "\n\nA second version.")
        await net.origin.publish("other", TEXT + "\n\nAnother document.")
        async with KVClient(ClientConfig((net.edge_address,), trust=(public,))) as client:
            honest = await client.manifest("doc", token_ids=True)
            assert honest.version == 2 and len(honest.token_ids) == honest.token_count

            async def reversed_ids(document: str, version: int, token_ids: bool = False) -> pb.Manifest:
                manifest = await real(document, version, token_ids)
                manifest.token_ids.reverse()
                return manifest

            async def another_document(document: str, version: int, token_ids: bool = False) -> pb.Manifest:
                return await real("other", version, token_ids)

            async def first_version(document: str, version: int, token_ids: bool = False) -> pb.Manifest:
                return await real(document, 1, token_ids)

            forgeries = [
                (reversed_ids, ("doc", 0), "token ids that are not those"),
                (another_document, ("doc", 0), "the manifest of 'other'"),
                (first_version, ("doc", 2), "with the manifest of 'doc' v1"),
            ]
            for forged, (document, version), refusal in forgeries:
                net.edge.manifest = forged  # type: ignore[method-assign]
                with pytest.raises(DigestMismatch, match=refusal):
                    await client.manifest(document, version, token_ids=True)
    finally:
        net.edge.manifest = real  # type: ignore[method-assign]
        await stop_network(net)


async def test_a_trust_edge_drops_forged_blocks_on_its_own_disk_and_loads_them_again(
    llama: LoadedModel, tmp_path: Path
) -> None:
    """Whoever holds an edge's host rewrites its disk tier (bytes and digests; the signature cannot be
    made anew): an edge with --trust verifies what it reads from its own disk in full, drops what no
    trusted signature covers and loads it again, so agents get the publisher's cache through it (it
    checked only the signer id before, and every fetch through it failed)."""
    private, public = _keys(tmp_path)
    net = await start_network(llama, tmp_path / "store", signing_key=private)
    disk = tmp_path / "edge-disk"
    doc = document_ids(llama.tokenizer, TEXT)
    config = EdgeConfig(origin=net.origin_server.address, listen="127.0.0.1:0", disk_dir=disk, trust=(public,))
    edge, edge_server = await start_edge(config)
    try:
        await net.origin.publish("doc", TEXT)
        async with KVClient(ClientConfig((edge_server.address,), trust=(public,))) as client:
            assert (await client.fetch(llama, doc)).cached_tokens == len(doc)
        await edge.settle()
        await edge_server.stop(0)
        await edge.close()
        forged = _forge_disk(disk / "blocks")
        assert forged > 0
        edge, edge_server = await start_edge(config)
        async with KVClient(ClientConfig((edge_server.address,), trust=(public,))) as client:
            fetched = await client.fetch(llama, doc)
        assert fetched.cached_tokens == len(doc) and _same(fetched.layers, adapter.prefill(llama.model, doc))
        assert edge.voucher.dropped == forged and edge.origin_fetches == forged  # each loaded again, once
    finally:
        await edge_server.stop(0)
        await edge.close()
        await stop_network(net)
