"""What an edge keeps of its origin's answers: a herd asking for one manifest costs the origin one
call, an unknown document asked again and again costs it one call a `miss_ttl_s`, numbered versions
are kept, the latest for `manifest_cache_s`, and a purge forgets what was kept of its document."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from kvcdn.client import CacheReader
from kvcdn.edge import EdgeConfig, start_edge
from kvcdn.errors import NotFound
from kvcdn.model.loading import LoadedModel
from tests.conftest import SAMPLES, start_network, stop_network

TEXT = (SAMPLES / "apache-2.0.txt").read_text()[:1500]


async def test_manifest_questions_reach_the_origin_once(llama: LoadedModel, tmp_path: Path) -> None:
    net = await start_network(llama, tmp_path / "store")
    config = EdgeConfig(origin=net.origin_server.address, listen="127.0.0.1:0", manifest_cache_s=0.5, miss_ttl_s=0.5)
    edge, server = await start_edge(config)
    try:
        await net.origin.publish("doc", TEXT)
        async with CacheReader(server.address) as reader:
            herd = await asyncio.gather(*(reader.manifest("doc") for _ in range(20)))
            assert {m.version for m in herd} == {1} and edge.answers.manifest_calls == 1
            for _ in range(10):  # an unknown document, asked again and again
                with pytest.raises(NotFound, match="has not been published"):
                    await reader.manifest("nope")
            assert edge.answers.manifest_calls == 2
            await net.origin.publish("doc", TEXT + " A second version.")
            assert (await reader.manifest("doc")).version == 1  # the latest, as kept
            assert (await reader.manifest("doc", 1)).version == 1
            await asyncio.sleep(0.6)
            assert (await reader.manifest("doc")).version == 2  # kept no longer than manifest_cache_s
            with pytest.raises(NotFound):
                await reader.manifest("nope")  # asked again once its miss_ttl_s passed
            calls = edge.answers.manifest_calls
            assert (await reader.manifest("doc", 1)).version == 1 and edge.answers.manifest_calls == calls
            # A purge reaches the edge through the feed: what was kept of the document is forgotten.
            await net.origin.purge("doc", 0)
            for _ in range(50):
                if edge.invalidated_seq:
                    break
                await asyncio.sleep(0.05)
            with pytest.raises(NotFound):
                await reader.manifest("doc", 1)
    finally:
        await server.stop(0)
        await edge.close()
        await stop_network(net)
