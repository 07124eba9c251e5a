"""The control plane needs credentials when the origin has a tokens file: anonymous Publish, Purge and
Watch are UNAUTHENTICATED, a token of the wrong role PERMISSION_DENIED; the right tokens work (an edge
follows the feed with its own), reads stay open, and a bad tokens file is one sentence."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from kvcdn.client import CacheReader, KVClient
from kvcdn.errors import InvalidArgument, PermissionDenied, Unauthenticated
from kvcdn.model.loading import LoadedModel
from kvcdn.model.prompt import document_ids
from kvcdn.wire.auth import Authorizer, read_token, write_tokens
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
