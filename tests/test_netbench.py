"""The edge network benchmark's parts on a tiny in-process network (figures are printed by the
command, never asserted as timings here)."""

from __future__ import annotations

import os
from pathlib import Path

from kvcdn.edge import EdgeConfig, start_edge
from kvcdn.loadtest.network import cold_herd, edge_memory
from kvcdn.model.loading import LoadedModel
from tests.conftest import memory_tier, start_network, stop_network


async def test_cold_herd_counts_one_origin_transfer_per_block(llama: LoadedModel, tmp_path: Path) -> None:
    net = await start_network(llama, tmp_path / "store", metrics=True)
    extra, server = await start_edge(EdgeConfig(origin=net.origin_server.address, listen="127.0.0.1:0", metrics_port=0))
    try:
        herd = await cold_herd(llama, net.origin_server.address, [net.edge_address, server.address], 30, 100)
        assert herd.ok == 30 and herd.tokens == 100 and herd.blocks == 4
        assert herd.origin_pulls == herd.blocks == sum(herd.pulls_per_edge)
        assert herd.gb_served * 1e9 > 30 * 100 * llama.geometry.token_bytes
    finally:
        await server.stop(0)
        await extra.close()
        await stop_network(net)


async def test_edge_memory_streams_an_object_twice_the_tier_exactly(llama: LoadedModel, tmp_path: Path) -> None:
    net = await start_network(llama, tmp_path / "store", max_document_tokens=4000)
    mem = 256 * llama.geometry.token_bytes
    edge, server = await start_edge(EdgeConfig(origin=net.origin_server.address, listen="127.0.0.1:0", mem_bytes=mem))
    try:
        r = await edge_memory(llama, net.origin_server.address, server.address, os.getpid(), mem, 2)
        assert r.exact
        assert abs(r.object_mb - 2 * r.memory_tier_mb) < 0.05 * r.memory_tier_mb
        assert r.rss_peak_mb >= r.rss_before_mb > 0
        assert (
            memory_tier(edge).stats().bytes <= mem < edge.bytes_from_origin
        )  # streamed through, the tier kept its budget
    finally:
        await server.stop(0)
        await edge.close()
        await stop_network(net)
