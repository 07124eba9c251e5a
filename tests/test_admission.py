"""The edge's admission rule: a big document read once streams through a full memory tier without
flushing the hot working set; a block that comes back is admitted the second time."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from kvcdn.client import KVClient
from kvcdn.edge import EdgeConfig, start_edge
from kvcdn.loadtest.bench import text_of_length
from kvcdn.model.loading import LoadedModel
from kvcdn.model.prompt import document_ids
from tests.conftest import SAMPLES, memory_tier, start_network, stop_network


async def test_a_one_off_big_document_does_not_flush_the_hot_set(llama: LoadedModel, tmp_path: Path) -> None:
    g = llama.geometry
    block_payload = g.block_tokens * g.token_bytes
    frames = g.frame_count(block_payload)
    # room for 4 encoded blocks, not 5 (frame headers add < 200 bytes a frame)
    mem_bytes = int(4.5 * (block_payload + frames * 200 + 128))
    net = await start_network(llama, tmp_path / "store")
    edge, server = await start_edge(
        EdgeConfig(origin=net.origin_server.address, listen="127.0.0.1:0", mem_bytes=mem_bytes)
    )
    try:
        corpus = (SAMPLES / "gpl-3.0.txt").read_text()
        hot_text = text_of_length(llama, corpus, 2 * g.block_tokens)
        big_text = text_of_length(llama, corpus[5000:], 8 * g.block_tokens)
        hot_keys = [b.key for b in (await net.origin.publish("hot", hot_text)).manifest.blocks]
        big_keys = [b.key for b in (await net.origin.publish("big", big_text)).manifest.blocks]
        assert len(hot_keys) == 2 and len(big_keys) == 8
        hot, big = document_ids(llama.tokenizer, hot_text), document_ids(llama.tokenizer, big_text)
        async with KVClient([server.address]) as client:
            await client.fetch(llama, hot)
            assert all(k in memory_tier(edge) for k in hot_keys)

            once = await client.fetch(llama, big)  # read once: served whole, kept only where there was room
            assert once.cached_tokens == len(big)
            assert edge.admissions_refused == 6 and memory_tier(edge).stats().evictions == 0
            assert all(k in memory_tier(edge) for k in hot_keys)
            # the room for two, taken by the first two loads to finish (they run ahead of the stream at once)
            assert sum(k in memory_tier(edge) for k in big_keys) == 2

            hits = memory_tier(edge).hits
            await client.fetch(llama, hot)
            assert memory_tier(edge).hits == hits + 2  # the hot set survived

            await client.fetch(llama, big)  # back again: now it is admitted, evicting the least recent
            assert edge.admissions_refused == 6 and memory_tier(edge).stats().evictions > 0
            # the room for four, now all big blocks (which four: the loads running ahead finish in any order)
            assert sum(k in memory_tier(edge) for k in big_keys) == 4
            assert not any(k in memory_tier(edge) for k in hot_keys)
            assert edge.origin_fetches == 2 + 8 + 6
    finally:
        await server.stop(0)
        await edge.close()
        await stop_network(net)


async def test_a_block_many_agents_wait_for_is_admitted_on_its_first_load(llama: LoadedModel, tmp_path: Path) -> None:
    g = llama.geometry
    mem_bytes = int(1.5 * (g.block_tokens * g.token_bytes + g.frame_count(g.block_tokens * g.token_bytes) * 200))
    net = await start_network(llama, tmp_path / "store")
    edge, server = await start_edge(
        EdgeConfig(origin=net.origin_server.address, listen="127.0.0.1:0", mem_bytes=mem_bytes)
    )
    try:
        corpus = (SAMPLES / "mpl-2.0.txt").read_text()
        first_text = text_of_length(llama, corpus, g.block_tokens)
        second_text = text_of_length(llama, corpus[3000:], g.block_tokens)
        await net.origin.publish("a", first_text)
        second_key = (await net.origin.publish("b", second_text)).manifest.blocks[0].key
        serve = net.origin.stream

        async def slow(fingerprint: str, keys: Sequence[bytes], start_frame: int = 0) -> AsyncIterator[bytes]:
            await asyncio.sleep(0.5)  # the load is still running when the other three agents ask
            async for raw in serve(fingerprint, keys, start_frame):
                yield raw

        net.origin.stream = slow  # type: ignore[method-assign]
        async with KVClient([server.address]) as client:
            await client.fetch(llama, document_ids(llama.tokenizer, first_text))  # fills the tier
            ids = document_ids(llama.tokenizer, second_text)
            await asyncio.gather(*(client.fetch(llama, ids) for _ in range(4)))  # popular at once
        assert second_key in memory_tier(edge) and edge.admissions_refused == 0 and edge.origin_fetches == 2
    finally:
        await server.stop(0)
        await edge.close()
        await stop_network(net)
