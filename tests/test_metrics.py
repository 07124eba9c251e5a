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
from tests.conftest import SAMPLES, start_network, stop_network


async def _scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    def get() -> str:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return str(resp.read().decode())

    text = await asyncio.to_thread(get)
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


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
        assert edge[("kvcdn_edge_origin_fetches_total", ())] == n_blocks
        assert edge[("kvcdn_edge_block_misses_memory_total", ())] == n_blocks
        assert edge[("kvcdn_edge_block_hits_memory_total", ())] == n_blocks
        assert edge[("kvcdn_edge_memory_blocks", ())] == n_blocks
        assert edge[("kvcdn_edge_bytes_from_origin_total", ())] >= first.n_bytes
        served = edge[("kvcdn_bytes_served_total", (("transport", "bulk"),))]
        assert 2 * first.n_bytes <= served < 2 * first.n_bytes * 1.1
        assert edge[("kvcdn_requests_total", (("code", "OK"), ("method", "LookupPrefix")))] == 2
        assert edge[("kvcdn_requests_total", (("code", "NOT_FOUND"), ("method", "GetManifest")))] == 1
        assert edge[("kvcdn_requests_total", (("code", "OK"), ("method", "BulkStreamBlocks")))] == 2
        assert edge[("kvcdn_streams_in_flight", (("transport", "bulk"),))] == 0
        assert edge[("kvcdn_request_seconds_count", (("method", "LookupPrefix"),))] == 2

        origin = await _scrape(net.origin_server.metrics_url)
        assert origin[("kvcdn_origin_blocks_computed_total", ())] == n_blocks
        assert origin[("kvcdn_origin_prefill_runs_total", ())] == 1
        # the edge's invalidation feed (Watch) stays open, yet no block stream is in flight
        assert origin.get(("kvcdn_streams_in_flight", (("transport", "grpc"),)), 0.0) == 0
        assert ("kvcdn_request_seconds_count", (("method", "Watch"),)) not in origin
        # The edge pulled each block from the origin once, over gRPC, reusing the infos of the one
        # lookup it forwarded (the second client lookup was answered from the edge's memory).
        assert origin[("kvcdn_requests_total", (("code", "OK"), ("method", "StreamBlocks")))] == n_blocks
        assert origin[("kvcdn_requests_total", (("code", "OK"), ("method", "LookupPrefix")))] == 1
        stats = await edge_stats([net.edge_address, "127.0.0.1:1"], timeout_s=2)
        assert stats[0].up and stats[0].hits == stats[0].misses == n_blocks and stats[0].hit_ratio == 0.5
        assert stats[0].origin_fetches == n_blocks and stats[0].bytes_served == served
        assert not stats[1].up and "127.0.0.1:1" in stats[1].error
    finally:
        await stop_network(net)
