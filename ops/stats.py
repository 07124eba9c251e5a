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
from kvcdn.spec.placement import read_edges
from kvcdn.wire.metrics import PAYLOAD_BYTES_SERVED, STREAMS_IN_FLIGHT, TRANSPORTS, Metric
from kvcdn.wire.metrics import EdgeMetrics as E
from kvcdn.wire.stub import CacheReader
from kvcdn.wire.tls import TLSFiles

__all__ = ["EdgeStats", "edge_stats", "metrics_url", "rpcs_started", "scrape", "stats_table"]


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
    """Block payload bytes sent to clients, over both transports."""
    streams_in_flight: float = 0

    @property
    def hit_ratio(self) -> float:
        """Blocks served from memory or disk over all blocks asked for."""
        total = self.hits + self.misses
        return (self.hits + self.disk_hits) / total if total else 0.0


Scrape = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _scrape(url: str, timeout_s: float) -> Scrape:
    """Every sample's value, by sample name and sorted labels."""
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        text = resp.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _by_transport(m: Scrape, metric: Metric) -> float:
    return sum(m[(metric.sample, (("transport", t),))] for t in TRANSPORTS)


async def metrics_url(address: str, timeout_s: float = 5.0, token: str = "", tls: TLSFiles | None = None) -> str:
    """The `/metrics` URL a server advertises in its ServerInfo (asked with `token` over `tls`)."""
    async with CacheReader(address, timeout_s, token=token, tls=tls) as reader:
        info = await reader.info()
    if not info.metrics_port:
        raise Unavailable(f"{address} exports no metrics (started with --metrics-port -1)")
    return f"http://{address.rpartition(':')[0]}:{info.metrics_port}/metrics"


async def scrape(url: str, timeout_s: float = 5.0) -> Scrape:
    """Every sample a `/metrics` endpoint exports."""
    try:
        return await asyncio.to_thread(_scrape, url, timeout_s)
    except OSError as exc:
        raise Unavailable(f"{url}: {exc}") from None


async def rpcs_started(url: str, timeout_s: float = 5.0) -> float:
    """RPCs the server of a `/metrics` URL has started (bulk streams included), its followers'
    invalidation feeds aside."""
    return sum(
        value
        for (name, labels), value in (await scrape(url, timeout_s)).items()
        if name == "grpc_server_started_total" and ("grpc_method", "Watch") not in labels
    )


async def _one(address: str, timeout_s: float, token: str, tls: TLSFiles | None) -> EdgeStats:
    try:
        scraped = await scrape(await metrics_url(address, timeout_s, token, tls), timeout_s)
    except KVCDNError as exc:
        return EdgeStats(address, up=False, error=str(exc))

    def m(metric: Metric) -> float:
        return scraped[metric.key]

    def optional(metric: Metric) -> float:  # an edge without a disk tier exports no disk series
        return scraped.get(metric.key, 0.0)

    try:
        return EdgeStats(
            address,
            up=True,
            memory_blocks=m(E.MEMORY.blocks),
            memory_bytes=m(E.MEMORY.bytes),
            hits=m(E.MEMORY.hits),
            misses=m(E.MEMORY.misses),
            disk_blocks=optional(E.DISK.blocks),
            disk_bytes=optional(E.DISK.bytes),
            disk_hits=optional(E.DISK.hits),
            evictions=m(E.MEMORY.evictions),
            origin_fetches=m(E.ORIGIN_FETCHES),
            bytes_from_origin=m(E.BYTES_FROM_ORIGIN),
            peer_fetches=m(E.PEER_FETCHES),
            bytes_from_peers=m(E.BYTES_FROM_PEERS),
            bytes_served=_by_transport(scraped, PAYLOAD_BYTES_SERVED),
            streams_in_flight=_by_transport(scraped, STREAMS_IN_FLIGHT),
        )
    except KeyError as exc:
        name = exc.args[0][0]
        return EdgeStats(address, up=False, error=f"{address} exports no metric {name}: is it a kvcdn edge?")


async def edge_stats(
    edges: Sequence[str], timeout_s: float = 5.0, token: str = "", tls: TLSFiles | None = None
) -> list[EdgeStats]:
    """The state of every edge, in the order given (`@FILE` entries: that file's edges; asked with
    `token` over `tls`, as a CacheReader); unreachable edges are reported, not raised."""
    return list(await asyncio.gather(*(_one(a, timeout_s, token, tls) for a in read_edges(edges))))


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
