"""Many agents at once against a cold network of three edges: every block crosses from the origin
once (to its owner), however many agents ask at the same moment, and every agent's cache is exact."""

from __future__ import annotations

import asyncio
from pathlib import Path

import torch

from kvcdn.client import KVClient
from kvcdn.edge import EdgeConfig, start_edge
from kvcdn.model import adapter
from kvcdn.model.loading import LoadedModel
from kvcdn.model.prompt import document_ids
from tests.conftest import SAMPLES, start_network, stop_network

AGENTS = 50
FETCHES_PER_AGENT = 4  # 200 concurrent fetches in all


async def test_200_concurrent_cold_fetches_pull_each_block_from_the_origin_once(
    llama: LoadedModel, tmp_path: Path
) -> None:
    net = await start_network(llama, tmp_path / "store")
    extra = [await start_edge(EdgeConfig(origin=net.origin_server.address, listen="127.0.0.1:0")) for _ in range(2)]
    edges = {net.edge_address: net.edge} | {server.address: edge for edge, server in extra}
    clients: list[KVClient] = []
    try:
        text = (SAMPLES / "apache-2.0.txt").read_text()[:2000]
        manifest = (await net.origin.publish("apache", text)).manifest
        doc = document_ids(llama.tokenizer, text)
        clients = [KVClient(list(edges)) for _ in range(AGENTS)]
        fetched = await asyncio.wait_for(
            asyncio.gather(*(c.fetch(llama, doc) for c in clients for _ in range(FETCHES_PER_AGENT))), 120
        )
        assert len(fetched) == AGENTS * FETCHES_PER_AGENT
        assert all(f.cached_tokens == len(doc) for f in fetched)
        owners = {b.key: clients[0].placement.owners(b.key)[0] for b in manifest.blocks}
        # One origin transfer per block, made by its owner; nothing pulled twice or by a non-owner.
        assert sum(e.origin_fetches for e in edges.values()) == len(manifest.blocks)
        for address, edge in edges.items():
            assert edge.origin_fetches == sum(owner == address for owner in owners.values())
        reference = adapter.prefill(llama.model, doc)
        for f in fetched[:: len(fetched) // 5]:
            for (k, v), (rk, rv) in zip(f.layers, reference, strict=True):
                assert torch.equal(k, rk) and torch.equal(v, rv)
    finally:
        for c in clients:
            await c.close()
        for edge, server in extra:
            await server.stop(0)
            await edge.close()
        await stop_network(net)
