"""The control plane needs credentials when the origin has a tokens file: anonymous Publish, Purge and
Watch are UNAUTHENTICATED, a token of the wrong role PERMISSION_DENIED; the right tokens work (an edge
follows the feed with its own), reads stay open unless closed, and then every read path (gRPC on the
origin and the edge, the bulk port) needs a token; a bad tokens file is one sentence."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from kvcdn.client import CacheReader, ClientConfig, KVClient
from kvcdn.errors import InvalidArgument, PermissionDenied, Unauthenticated
from kvcdn.model import adapter
from kvcdn.model.loading import LoadedModel
from kvcdn.model.prompt import document_ids
from kvcdn.model.receiving import KVAssembler
from kvcdn.origin import OriginConfig
from kvcdn.wire.auth import Authorizer, read_token, write_tokens
from kvcdn.wire.receiver import Progress, receive_into
from kvcdn.wire.rpc import Server
from tests.conftest import SAMPLES, start_network, stop_network

TEXT = (SAMPLES / "mpl-2.0.txt").read_text()[:1500]


async def test_publish_purge_and_watch_need_the_right_token(llama: LoadedModel, tmp_path: Path) -> None:
    table, files = write_tokens(tmp_path / "keys")
    publisher, edge_token = read_token(files["publisher"]), read_token(files["edge"])
    net = await start_network(llama, tmp_path / "store", tokens=table, edge_token=edge_token)
    origin = net.origin_server.address
    try:
        async with CacheReader(origin) as anonymous, CacheReader(origin, token=edge_token) as as_edge:
            with pytest.raises(Unauthenticated, match="needs credentials"):
                await anonymous.publish("doc", TEXT)
            with pytest.raises(Unauthenticated, match="not one this server knows"):
                await CacheReader(origin, token="x" * 40).publish("doc", TEXT)
            with pytest.raises(PermissionDenied, match="edge token may not call Publish"):
                await as_edge.publish("doc", TEXT)
            with pytest.raises(Unauthenticated):
                await anonymous.purge("doc")
            with pytest.raises(Unauthenticated):
                async for _ in anonymous.watch(0):
                    pass
        async with CacheReader(origin, token=publisher) as as_publisher:
            manifest = (await as_publisher.publish("doc", TEXT)).manifest
            # Reads stay open: an anonymous agent fetches the cache through the edge.
            doc = document_ids(llama.tokenizer, TEXT)
            async with KVClient([net.edge_address]) as client:
                assert (await client.fetch(llama, doc)).cached_tokens == len(doc)
            assert (await as_publisher.purge("doc")).blocks_removed == len(manifest.blocks)
        # The edge followed the feed with its edge token and dropped the purged blocks.
        for _ in range(100):
            if net.edge.invalidated_blocks == len(manifest.blocks):
                break
            await asyncio.sleep(0.05)
        assert net.edge.invalidated_blocks == len(manifest.blocks)
    finally:
        await stop_network(net)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("", "holds no token"),
        ("admin 0123456789abcdef0123\n", "role 'admin'"),
        ("publisher short\n", "shorter than 16"),
        ("publisher a b c\n", "line 1: expected `ROLE TOKEN`"),
    ],
)
def test_a_bad_tokens_file_is_one_sentence(tmp_path: Path, content: str, match: str) -> None:
    path = tmp_path / "tokens"
    path.write_text(content)
    with pytest.raises(InvalidArgument, match=match):
        Authorizer.from_file(path)


def _bulk_bytes(server: Server) -> float:
    value = server.metrics.registry.get_sample_value("kvcdn_payload_bytes_served_total", {"transport": "bulk"})
    return value or 0.0


async def test_closed_reads_need_a_token_on_every_read_path(llama: LoadedModel, tmp_path: Path) -> None:
    table, files = write_tokens(tmp_path / "keys")
    tokens = {role: read_token(path) for role, path in files.items()}
    net = await start_network(
        llama, tmp_path / "store", tokens=table, edge_token=tokens["edge"], edge_tokens=table, closed_reads=True
    )
    fingerprint = llama.fingerprint_hex
    try:
        manifest = (await net.origin.publish("doc", TEXT)).manifest
        keys = [b.key for b in manifest.blocks]
        doc = document_ids(llama.tokenizer, TEXT)
        for address in (net.origin_server.address, net.edge_address):
            async with CacheReader(address) as anonymous:
                assert (await anonymous.info()).fingerprint == fingerprint  # GetInfo stays open
                with pytest.raises(Unauthenticated, match="GetManifest needs credentials"):
                    await anonymous.manifest("doc")
                with pytest.raises(Unauthenticated, match="LookupPrefix needs credentials"):
                    await anonymous.lookup(fingerprint, keys)
                with pytest.raises(Unauthenticated, match="StreamBlocks needs credentials"):
                    async for _ in anonymous.stream(fingerprint, keys):
                        pass
            with pytest.raises(Unauthenticated, match="not one this server knows"):
                await CacheReader(address, token="y" * 40).manifest("doc")
            async with CacheReader(address, token=tokens["reader"]) as reader:
                assert (await reader.manifest("doc")).version == 1
                if address == net.origin_server.address:
                    with pytest.raises(PermissionDenied, match="reader token may not call Publish"):
                        await reader.publish("doc2", TEXT)
        # The bulk port checks the request's token as gRPC checks metadata.
        for token, error in (("", Unauthenticated), ("z" * 40, Unauthenticated)):
            assembler = KVAssembler(llama.geometry, len(doc), torch.device("cpu"))
            address = ("127.0.0.1", net.edge_server.bulk_port)
            args = (fingerprint, manifest.blocks, llama.geometry, assembler, Progress(), 5.0, None, token)
            with pytest.raises(error, match="StreamBlocks"):
                await asyncio.to_thread(receive_into, address, *args)
        # An agent without a token is told what to do; with one it gets the exact cache over bulk,
        # which the edge loaded from the origin with its own (edge) token.
        async with KVClient([net.edge_address]) as client:
            with pytest.raises(Unauthenticated, match="--token-file"):
                await client.fetch(llama, doc)
        async with KVClient(ClientConfig((net.edge_address,), token=tokens["reader"])) as client:
            fetched = await client.fetch(llama, doc)
        assert fetched.cached_tokens == len(doc) and _bulk_bytes(net.edge_server) == fetched.n_bytes
        for (k, v), (rk, rv) in zip(fetched.layers, adapter.prefill(llama.model, doc), strict=True):
            assert torch.equal(k, rk) and torch.equal(v, rv)
    finally:
        await stop_network(net)


def test_closed_reads_without_a_tokens_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="closed reads need a tokens file"):
        OriginConfig(store_dir=tmp_path, closed_reads=True)


def test_an_origin_beyond_loopback_needs_tokens_or_says_insecure(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"0\.0\.0\.0:7070 without --tokens.*--insecure"):
        OriginConfig(store_dir=tmp_path, listen="0.0.0.0:7070")
    with pytest.raises(InvalidArgument, match="without --tokens"):
        OriginConfig(store_dir=tmp_path, listen="[::]:7070")
    OriginConfig(store_dir=tmp_path, listen="0.0.0.0:7070", tokens=tmp_path / "tokens")  # closed: fine
    OriginConfig(store_dir=tmp_path, listen="0.0.0.0:7070", insecure=True)  # open, as asked
    OriginConfig(store_dir=tmp_path, listen="127.0.0.1:7070")  # loopback: only this machine reaches it


def test_a_client_of_edges_beyond_this_machine_without_trust_warns_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kvcdn.client import config

    monkeypatch.setattr(config, "_warned_untrusted", False)
    ClientConfig(("127.0.0.1:7080", "localhost:7082"))  # loopback: nothing to say
    assert not [r for r in caplog.records if "without --trust" in r.getMessage()]
    ClientConfig(("10.0.0.5:7080",))
    ClientConfig(("edge.example:7080",))
    warned = [r for r in caplog.records if "without --trust" in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelname == "WARNING" and "10.0.0.5:7080" in warned[0].getMessage()
    caplog.clear()
    ClientConfig(("10.0.0.5:7080",), trust=(Path("publisher.pub"),))
    assert not caplog.records
