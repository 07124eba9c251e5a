"""Prometheus metrics of one server: its own registry (so several servers can share a process, as in
tests), RPC counts and latencies recorded at the gRPC boundary (kvcdn.wire.rpc), bulk stream traffic, and
whatever the component's domain exposes through a collector read at scrape time."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = [
    "BYTES_SERVED",
    "STREAMS_IN_FLIGHT",
    "DomainCollector",
    "EdgeMetrics",
    "Metric",
    "OriginMetrics",
    "ServerMetrics",
    "Stat",
    "TierMetrics",
]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)


@dataclass(frozen=True)
class Metric:
    """One metric a kvcdn server exports."""

    name: str
    """Name without the `kvcdn_` prefix; counters end in `_total`."""
    kind: Literal["counter", "gauge"]
    help: str

    @property
    def sample(self) -> str:
        """The sample's name as a scrape shows it."""
        return f"kvcdn_{self.name}"


Stat = tuple[Metric, float]
"""A domain metric and its current value."""

BYTES_SERVED = Metric("bytes_served_total", "counter", "Frame bytes sent to clients, by transport")
STREAMS_IN_FLIGHT = Metric("streams_in_flight", "gauge", "Block streams being served, by transport")


@dataclass(frozen=True)
class TierMetrics:
    """The metrics of one edge tier (`tier` names it: memory, disk)."""

    tier: str

    @property
    def hits(self) -> Metric:
        return Metric(f"edge_block_hits_{self.tier}_total", "counter", f"Blocks served from the {self.tier} tier")

    @property
    def misses(self) -> Metric:
        return Metric(f"edge_block_misses_{self.tier}_total", "counter", f"Blocks missing from the {self.tier} tier")

    @property
    def evictions(self) -> Metric:
        return Metric(f"edge_evictions_{self.tier}_total", "counter", f"Blocks evicted from the {self.tier} tier")

    @property
    def corrupt(self) -> Metric:
        return Metric(
            f"edge_corrupt_{self.tier}_total",
            "counter",
            f"{self.tier.title()} blocks that failed their digest (dropped)",
        )

    @property
    def bytes(self) -> Metric:
        return Metric(f"edge_{self.tier}_bytes", "gauge", f"Bytes held by the {self.tier} tier")

    @property
    def blocks(self) -> Metric:
        return Metric(f"edge_{self.tier}_blocks", "gauge", f"Blocks held by the {self.tier} tier")


class EdgeMetrics:
    """What an edge exports besides the RPC metrics."""

    MEMORY = TierMetrics("memory")
    DISK = TierMetrics("disk")
    ORIGIN_FETCHES = Metric("edge_origin_fetches_total", "counter", "Blocks pulled from the origin")
    BYTES_FROM_ORIGIN = Metric("edge_bytes_from_origin_total", "counter", "Frame bytes pulled from the origin")
    PEER_FETCHES = Metric("edge_peer_fetches_total", "counter", "Blocks loaded from their owner edges")
    BYTES_FROM_PEERS = Metric("edge_bytes_from_peers_total", "counter", "Frame bytes loaded from owner edges")
    ADMISSIONS_REFUSED = Metric(
        "edge_admissions_refused_total",
        "counter",
        "Loaded blocks a full tier did not keep (asked for once, never missed before)",
    )
    PULLS_IN_FLIGHT = Metric("edge_pulls_in_flight", "gauge", "Block loads in progress (disk, peers or origin)")
    INVALIDATION_SEQ = Metric("edge_invalidation_seq", "gauge", "Last invalidation event applied")
    INVALIDATED_BLOCKS = Metric("edge_invalidated_blocks_total", "counter", "Blocks dropped by invalidations")


class OriginMetrics:
    """What an origin exports besides the RPC metrics."""

    PUBLISHES = Metric("origin_publishes_total", "counter", "Publish requests accepted")
    PREFILL_RUNS = Metric("origin_prefill_runs_total", "counter", "Prefill runs (one per publish that computed)")
    PREFILL_SECONDS = Metric("origin_prefill_seconds_total", "counter", "Seconds spent in prefill")
    BLOCKS_COMPUTED = Metric("origin_blocks_computed_total", "counter", "Blocks computed and stored")
    READ_CACHE_BYTES = Metric("origin_read_cache_bytes", "gauge", "Bytes of encoded blocks held in memory")


class DomainCollector(Collector):
    """Turns a component's own counters into metrics at scrape time, so the domain keeps plain ints."""

    def __init__(self, stats: Callable[[], Iterable[Stat]]) -> None:
        self._stats = stats

    def collect(self) -> Iterable[CounterMetricFamily | GaugeMetricFamily]:
        for metric, value in self._stats():
            family = CounterMetricFamily if metric.kind == "counter" else GaugeMetricFamily
            yield family(metric.sample, metric.help, value=value)


class ServerMetrics:
    """The metrics of one kvcdn server and, once started, its `/metrics` HTTP endpoint."""

    def __init__(self, stats: Callable[[], Iterable[Stat]] | None = None) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "kvcdn_requests",
            "RPCs handled, by method and final status code",
            ["method", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "kvcdn_request_seconds",
            "RPC latency, by method (streams: until the last frame)",
            ["method"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.bytes_served = Counter(
            BYTES_SERVED.sample.removesuffix("_total"), BYTES_SERVED.help, ["transport"], registry=self.registry
        )
        self.streams_in_flight = Gauge(
            STREAMS_IN_FLIGHT.sample, STREAMS_IN_FLIGHT.help, ["transport"], registry=self.registry
        )
        if stats is not None:
            self.registry.register(DomainCollector(stats))
        self._http: tuple[WSGIServer, threading.Thread] | None = None

    def start_http(self, host: str, port: int) -> int:
        """Serve `/metrics` on host:port (0: any free port); returns the bound port."""
        self._http = start_http_server(port, addr=host, registry=self.registry)
        return int(self._http[0].server_port)

    def stop(self) -> None:
        if self._http is not None:
            server, thread = self._http
            server.shutdown()
            server.server_close()
            thread.join(5)
            self._http = None
