"""`kvcdn stats`: one table of the edges' state, read from each edge's Prometheus endpoint (which its
ServerInfo advertises), so operators see tiers, hit ratios and origin traffic at a glance."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families
from rich.table import Table

from kvcdn.errors import KVCDNError, Unavailable
from kvcdn.wire.metrics import BYTES_SERVED, STREAMS_IN_FLIGHT
from kvcdn.wire.metrics import EdgeMetrics as E
from kvcdn.wire.stub import CacheReader

__all__ = ["EdgeStats", "edge_stats", "stats_table"]


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
    try:
        return EdgeStats(
            address,
            up=True,
            memory_blocks=m[E.MEMORY.blocks.sample],
            memory_bytes=m[E.MEMORY.bytes.sample],
            hits=m[E.MEMORY.hits.sample],
            misses=m[E.MEMORY.misses.sample],
            # an edge without a disk tier exports no disk metrics
            disk_blocks=m.get(E.DISK.blocks.sample, 0.0),
            disk_bytes=m.get(E.DISK.bytes.sample, 0.0),
            disk_hits=m.get(E.DISK.hits.sample, 0.0),
            evictions=m[E.MEMORY.evictions.sample],
            origin_fetches=m[E.ORIGIN_FETCHES.sample],
            bytes_from_origin=m[E.BYTES_FROM_ORIGIN.sample],
            peer_fetches=m[E.PEER_FETCHES.sample],
            bytes_from_peers=m[E.BYTES_FROM_PEERS.sample],
            # labelled by transport: no sample until the first stream
            bytes_served=m.get(BYTES_SERVED.sample, 0.0),
            streams_in_flight=m.get(STREAMS_IN_FLIGHT.sample, 0.0),
        )
    except KeyError as exc:
        return EdgeStats(address, up=False, error=f"{address} exports no metric {exc.args[0]}: is it a kvcdn edge?")


async def edge_stats(edges: Sequence[str], timeout_s: float = 5.0) -> list[EdgeStats]:
    """The state of every edge, in the order given; unreachable edges are reported, not raised."""
    return list(await asyncio.gather(*(_one(a, timeout_s) for a in edges)))


_COLUMNS: list[tuple[str, Callable[[EdgeStats], str]]] = [
    ("memory blocks", lambda r: f"{r.memory_blocks:.0f}"),
    ("memory MB", lambda r: f"{r.memory_bytes / 1e6:.1f}"),
    ("memory hits", lambda r: f"{r.hits:.0f}"),
    ("disk blocks", lambda r: f"{r.disk_blocks:.0f}"),
    ("disk MB", lambda r: f"{r.disk_bytes / 1e6:.1f}"),
    ("disk hits", lambda r: f"{r.disk_hits:.0f}"),
    ("hit ratio", lambda r: f"{r.hit_ratio:.0%}"),
    ("evictions", lambda r: f"{r.evictions:.0f}"),
    ("origin fetches", lambda r: f"{r.origin_fetches:.0f}"),
    ("MB from origin", lambda r: f"{r.bytes_from_origin / 1e6:.1f}"),
    ("MB from peers", lambda r: f"{r.bytes_from_peers / 1e6:.1f}"),
    ("MB served", lambda r: f"{r.bytes_served / 1e6:.1f}"),
    ("streams now", lambda r: f"{r.streams_in_flight:.0f}"),
]


def stats_table(rows: Sequence[EdgeStats]) -> Table:
    """One row per edge: tiers, hit ratio, origin and peer traffic; unreachable edges say why."""
    table = Table(title="kvcdn edges")
    table.add_column("edge", no_wrap=True)
    table.add_column("up", no_wrap=True)
    for name, _ in _COLUMNS:
        table.add_column(name, justify="right")
    for r in rows:
        if r.up:
            table.add_row(r.address, "yes", *(fmt(r) for _, fmt in _COLUMNS))
        else:
            table.add_row(r.address, "[red]no[/red]", r.error, *[""] * (len(_COLUMNS) - 1))
    return table
