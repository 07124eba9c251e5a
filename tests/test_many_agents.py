"""Many agents at once against a cold network of three edges: every block crosses from the origin
once (to the owner it is streamed from), however many agents ask at the same moment, and every
agent's cache is exact."""

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
        # One origin transfer per block, made by the owner every client streams it from (the same for
        # all: KVClient.runs); nothing pulled twice or by an edge no client asked.
        sent_by = {b.key: run.edge for run in clients[0].runs(list(manifest.blocks)) for b in run.blocks}
        assert all(sent_by[b.key] in clients[0].placement.owners(b.key) for b in manifest.blocks)
        assert sum(e.origin_fetches for e in edges.values()) == len(manifest.blocks)
        for address, edge in edges.items():
            assert edge.origin_fetches == sum(edge_address == address for edge_address in sent_by.values())
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
