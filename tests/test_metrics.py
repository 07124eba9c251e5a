"""Every server exports Prometheus metrics whose counters match what the test did."""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvcdn.client import CacheReader, KVClient
from kvcdn.errors import NotFound
from kvcdn.model.loading import LoadedModel
from kvcdn.model.prompt import document_ids
from kvcdn.ops.stats import edge_stats
from kvcdn.ops.stats import scrape as _scrape
from tests.conftest import SAMPLES, start_network, stop_network


async def _types(url: str) -> dict[str, str]:
    def get() -> str:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return str(resp.read().decode())

    return {family.name: family.type for family in text_string_to_metric_families(await asyncio.to_thread(get))}


async def test_metrics_count_what_the_network_did(llama: LoadedModel, tmp_path: Path) -> None:
    net = await start_network(llama, tmp_path / "store", metrics=True)
    try:
        text = (SAMPLES / "gpl-2.0.txt").read_text()[:2000]
        manifest = (await net.origin.publish("gpl", text)).manifest
        n_blocks = len(manifest.blocks)
        doc = document_ids(llama.tokenizer, text)
        async with KVClient([net.edge_address]) as client:
            first = await client.fetch(llama, doc)
            await client.fetch(llama, doc)
        async with CacheReader(net.edge_address) as reader:
            with pytest.raises(NotFound):
                await reader.manifest("missing")

        edge = await _scrape(net.edge_server.metrics_url)
        memory, origin_source = (("tier", "memory"),), (("source", "origin"),)
        assert edge[("kvcdn_edge_block_loads_total", origin_source)] == n_blocks
        assert edge[("kvcdn_edge_block_loads_total", (("source", "peer"),))] == 0
        assert edge[("kvcdn_edge_tier_misses_total", memory)] == n_blocks
        assert edge[("kvcdn_edge_tier_hits_total", memory)] == n_blocks
        assert edge[("kvcdn_edge_tier_blocks", memory)] == n_blocks
        assert edge[("kvcdn_edge_loaded_bytes_total", origin_source)] == first.n_bytes
        # Payload bytes served reconcile exactly with what the client received; frames add headers.
        served = edge[("kvcdn_payload_bytes_served_total", (("transport", "bulk"),))]
        assert served == 2 * first.n_bytes
        assert served < edge[("kvcdn_wire_bytes_served_total", (("transport", "bulk"),))] < 1.05 * served
        assert edge[("kvcdn_payload_bytes_served_total", (("transport", "grpc"),))] == 0  # pre-initialised

        def rpc(service: str, method: str, kind: str = "unary") -> tuple[tuple[str, str], ...]:
            return (("grpc_method", method), ("grpc_service", service), ("grpc_type", kind))

        lookup, manifest_rpc = rpc("kvcdn.v1.KVCache", "LookupPrefix"), rpc("kvcdn.v1.KVCache", "GetManifest")
        bulk = rpc("kvcdn.v1.Bulk", "StreamBlocks", "server_stream")
        assert edge[("grpc_server_started_total", lookup)] == 2
        assert edge[("grpc_server_handled_total", (("grpc_code", "OK"), *lookup))] == 2
        assert edge[("grpc_server_handled_total", (("grpc_code", "NOT_FOUND"), *manifest_rpc))] == 1
        assert edge[("grpc_server_handled_total", (("grpc_code", "OK"), *manifest_rpc))] == 0  # pre-initialised
        assert edge[("grpc_server_handled_total", (("grpc_code", "OK"), *bulk))] == 2
        assert edge[("grpc_server_handling_seconds_count", lookup)] == 2
        assert edge[("kvcdn_streams_in_flight", (("transport", "bulk"),))] == 0
        assert edge[("process_resident_memory_bytes", ())] > 0 and edge[("process_open_fds", ())] > 0
        assert not [name for name, _ in edge if name.endswith("_created")]
        types = await _types(net.edge_server.metrics_url)
        assert types["grpc_server_started"] == types["grpc_server_handled"] == "counter"
        assert types["grpc_server_handling_seconds"] == "histogram"
        assert types["kvcdn_payload_bytes_served"] == types["kvcdn_edge_tier_hits"] == "counter"
        assert types["kvcdn_streams_in_flight"] == types["kvcdn_edge_tier_bytes"] == "gauge"

        origin = await _scrape(net.origin_server.metrics_url)
        assert origin[("kvcdn_origin_blocks_computed_total", ())] == n_blocks
        assert origin[("kvcdn_origin_prefill_runs_total", ())] == 1
        # the edge's invalidation feed (Watch) stays open, yet no block stream is in flight
        watch = rpc("kvcdn.v1.Invalidations", "Watch", "server_stream")
        assert origin[("kvcdn_streams_in_flight", (("transport", "grpc"),))] == 0
        assert origin[("grpc_server_started_total", watch)] == 1
        assert ("grpc_server_handling_seconds_count", watch) not in origin
        # The edge pulled each block from the origin once, over its bulk port, reusing the infos of the
        # one lookup it forwarded (the second client lookup was answered from the edge's memory).
        streams = rpc("kvcdn.v1.KVCache", "StreamBlocks", "server_stream")
        assert origin[("grpc_server_handled_total", (("grpc_code", "OK"), *bulk))] == n_blocks
        assert origin[("grpc_server_handled_total", (("grpc_code", "OK"), *streams))] == 0  # pre-initialised
        assert origin[("grpc_server_handled_total", (("grpc_code", "OK"), *lookup))] == 1
        assert origin[("kvcdn_payload_bytes_served_total", (("transport", "bulk"),))] == first.n_bytes
        assert origin[("kvcdn_payload_bytes_served_total", (("transport", "grpc"),))] == 0
        stats = await edge_stats([net.edge_address, "127.0.0.1:1"], timeout_s=2)
        assert stats[0].up and stats[0].hits == stats[0].misses == n_blocks and stats[0].hit_ratio == 0.5
        assert stats[0].origin_fetches == n_blocks and stats[0].bytes_served == served
        assert not stats[1].up and "127.0.0.1:1" in stats[1].error
    finally:
        await stop_network(net)


async def test_a_half_open_scrape_is_dropped_and_scrapes_go_on(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    from kvcdn.wire import metrics

    monkeypatch.setattr(metrics._Handler, "timeout", 0.5)
    server = metrics.ServerMetrics()
    port = server.start_http("127.0.0.1", 0)
    try:

        def half_open() -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(b"GET /metr")  # and never the rest
                return sock.recv(1024)

        stalled = [asyncio.to_thread(half_open) for _ in range(8)]
        scraped = await _scrape(f"http://127.0.0.1:{port}/metrics")
        assert ("process_open_fds", ()) in scraped
        assert await asyncio.wait_for(asyncio.gather(*stalled), 4) == [b""] * 8  # closed by the server
    finally:
        server.stop()
