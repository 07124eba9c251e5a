"""`kvcdn stats`: one table of the edges' state, read from each edge's Prometheus endpoint (which its
ServerInfo advertises), so operators see tiers, hit ratios and origin traffic at a glance."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from kvcdn.errors import KVCDNError, Unavailable
from kvcdn.wire.stub import CacheReader

__all__ = ["EdgeStats", "edge_stats"]


@dataclass(frozen=True)
class EdgeStats:
    address: str
    up: bool
    error: str = ""
    memory_blocks: float = 0
    memory_bytes: float = 0
    hits: float = 0
    misses: float = 0
    disk_blocks: float = 0
    disk_bytes: float = 0
    disk_hits: float = 0
    evictions: float = 0
    origin_fetches: float = 0
    bytes_from_origin: float = 0
    peer_fetches: float = 0
    bytes_from_peers: float = 0
    bytes_served: float = 0
    streams_in_flight: float = 0

    @property
    def hit_ratio(self) -> float:
        """Blocks served from memory or disk over all blocks asked for."""
        total = self.hits + self.misses
        return (self.hits + self.disk_hits) / total if total else 0.0


def _scrape(url: str, timeout_s: float) -> dict[str, float]:
    """Metric samples summed over their labels, by sample name."""
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out


async def _one(address: str, timeout_s: float) -> EdgeStats:
    try:
        async with CacheReader(address, timeout_s) as reader:
            info = await reader.info()
        if not info.metrics_port:
            raise Unavailable(f"{address} exports no metrics (started with --metrics-port -1)")
        host = address.rpartition(":")[0]
        url = f"http://{host}:{info.metrics_port}/metrics"
        try:
            m = await asyncio.to_thread(_scrape, url, timeout_s)
        except OSError as exc:
            raise Unavailable(f"{url}: {exc}") from None
    except KVCDNError as exc:
        return EdgeStats(address, up=False, error=str(exc))
    return EdgeStats(
        address,
        up=True,
        memory_blocks=m.get("kvcdn_edge_memory_blocks", 0),
        memory_bytes=m.get("kvcdn_edge_memory_bytes", 0),
        hits=m.get("kvcdn_edge_block_hits_memory_total", 0),
        misses=m.get("kvcdn_edge_block_misses_memory_total", 0),
        disk_blocks=m.get("kvcdn_edge_disk_blocks", 0),
        disk_bytes=m.get("kvcdn_edge_disk_bytes", 0),
        disk_hits=m.get("kvcdn_edge_block_hits_disk_total", 0),
        evictions=m.get("kvcdn_edge_evictions_memory_total", 0),
        origin_fetches=m.get("kvcdn_edge_origin_fetches_total", 0),
        bytes_from_origin=m.get("kvcdn_edge_bytes_from_origin_total", 0),
        peer_fetches=m.get("kvcdn_edge_peer_fetches_total", 0),
        bytes_from_peers=m.get("kvcdn_edge_bytes_from_peers_total", 0),
        bytes_served=m.get("kvcdn_bytes_served_total", 0),
        streams_in_flight=m.get("kvcdn_streams_in_flight", 0),
    )


async def edge_stats(edges: Sequence[str], timeout_s: float = 5.0) -> list[EdgeStats]:
    """The state of every edge, in the order given; unreachable edges are reported, not raised."""
    return list(await asyncio.gather(*(_one(a, timeout_s) for a in edges)))
