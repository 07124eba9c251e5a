"""Prometheus metrics of one server: its own registry (so several servers can share a process, as in
tests) with the standard process and platform collectors, RPC counts and latencies recorded at the gRPC
boundary (kvcdn.wire.rpc) under the names of the gRPC ecosystem's server metrics, bulk stream traffic,
and whatever the component's domain exposes through a collector read at scrape time.

Conventions, for Prometheus users: every series a server will ever export exists from its first
scrape (labels pre-initialised); what varies by tier, source or transport is a label, not part of a
name; no `*_created` series. The full list is in docs/architecture.md (the metrics table)."""

from __future__ import annotations

import contextlib
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    make_wsgi_app,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = [
    "BULK_METHOD",
    "PAYLOAD_BYTES_SERVED",
    "STREAMS_IN_FLIGHT",
    "TRANSPORTS",
    "WIRE_BYTES_SERVED",
    "DomainCollector",
    "EdgeMetrics",
    "Method",
    "Metric",
    "OriginMetrics",
    "ServerMetrics",
    "Stat",
    "TierMetrics",
]

log = logging.getLogger(__name__)

# `*_created` series double the number of series and no dashboard reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)

TRANSPORTS = ("grpc", "bulk")
"""How block frames leave a server: gRPC StreamBlocks, or the bulk TCP stream."""


@dataclass(frozen=True)
class Metric:
    """One series a kvcdn server exports from its domain counters: a family name and, where the family
    is split by tier or source, that label."""

    name: str
    """Name without the `kvcdn_` prefix; counters end in `_total`."""
    kind: Literal["counter", "gauge"]
    help: str
    labels: tuple[tuple[str, str], ...] = ()

    @property
    def sample(self) -> str:
        """The family's name as a scrape shows it."""
        return f"kvcdn_{self.name}"

    @property
    def key(self) -> tuple[str, tuple[tuple[str, str], ...]]:
        """The series as a scrape shows it: sample name and sorted labels."""
        return self.sample, tuple(sorted(self.labels))


Stat = tuple[Metric, float]
"""A domain series and its current value."""


@dataclass(frozen=True)
class Method:
    """An RPC as the gRPC server metrics label it."""

    service: str
    name: str
    type: Literal["unary", "server_stream"]
    feed: bool = False
    """A stream that stays open as long as its follower (the invalidation feed): counted when it
    starts and ends, but no block stream in flight and no latency to time."""


BULK_METHOD = Method("kvcdn.v1.Bulk", "StreamBlocks", "server_stream")
"""The bulk TCP stream, counted with the gRPC methods under a service name of its own."""

PAYLOAD_BYTES_SERVED = Metric(
    "payload_bytes_served_total", "counter", "Block payload bytes sent to clients (what they receive), by transport"
)
WIRE_BYTES_SERVED = Metric(
    "wire_bytes_served_total",
    "counter",
    "Bytes of frames sent to clients, payload plus frame headers, by transport",
)
STREAMS_IN_FLIGHT = Metric("streams_in_flight", "gauge", "Block streams being served, by transport")


@dataclass(frozen=True)
class TierMetrics:
    """The series of one edge tier (`tier` names it: memory, disk), label `tier`."""

    tier: str

    def _series(self, name: str, kind: Literal["counter", "gauge"], help: str) -> Metric:
        return Metric(name, kind, help, (("tier", self.tier),))

    @property
    def hits(self) -> Metric:
        return self._series("edge_tier_hits_total", "counter", "Blocks served from a tier")

    @property
    def misses(self) -> Metric:
        return self._series("edge_tier_misses_total", "counter", "Blocks asked of a tier that it did not hold")

    @property
    def evictions(self) -> Metric:
        return self._series("edge_tier_evictions_total", "counter", "Blocks evicted from a tier")

    @property
    def corrupt(self) -> Metric:
        return self._series("edge_tier_corrupt_total", "counter", "Blocks of a tier that failed their digest (dropped)")

    @property
    def bytes(self) -> Metric:
        return self._series("edge_tier_bytes", "gauge", "Bytes held by a tier")

    @property
    def blocks(self) -> Metric:
        return self._series("edge_tier_blocks", "gauge", "Blocks held by a tier")


def _source(name: str, kind: Literal["counter", "gauge"], help: str, source: str) -> Metric:
    return Metric(name, kind, help, (("source", source),))


class EdgeMetrics:
    """What an edge exports besides the RPC metrics."""

    MEMORY = TierMetrics("memory")
    DISK = TierMetrics("disk")
    ORIGIN_FETCHES = _source("edge_block_loads_total", "counter", "Blocks loaded from upstream, by source", "origin")
    PEER_FETCHES = _source("edge_block_loads_total", "counter", "Blocks loaded from upstream, by source", "peer")
    BYTES_FROM_ORIGIN = _source(
        "edge_loaded_bytes_total", "counter", "Frame payload bytes loaded from upstream, by source", "origin"
    )
    BYTES_FROM_PEERS = _source(
        "edge_loaded_bytes_total", "counter", "Frame payload bytes loaded from upstream, by source", "peer"
    )
    ADMISSIONS_REFUSED = Metric(
        "edge_admissions_refused_total",
        "counter",
        "Loaded blocks a full tier did not keep (asked for once, never missed before)",
    )
    PULLS_IN_FLIGHT = Metric("edge_pulls_in_flight", "gauge", "Block loads in progress (disk, peers or origin)")
    INVALIDATION_SEQ = Metric("edge_invalidation_seq", "gauge", "Last invalidation event applied")
    INVALIDATED_BLOCKS = Metric("edge_invalidated_blocks_total", "counter", "Blocks dropped by invalidations")
    PINNED_BYTES = Metric("edge_pinned_bytes", "gauge", "Bytes of blocks the streams in flight hold (--pinned-bytes)")
    BLOCK_BUFFER_BYTES = Metric(
        "edge_block_buffer_bytes", "gauge", "Bytes of reusable block buffers loads land in (kvcdn.edge.buffers)"
    )
    STREAMS_CUT = Metric(
        "edge_stalled_streams_cut_total",
        "counter",
        "Streams ended because their reader stalled while others needed room",
    )
    UNTRUSTED_DROPPED = Metric(
        "edge_untrusted_blocks_dropped_total",
        "counter",
        "Blocks on this edge's disk that no trusted signature covered (with --trust), dropped and loaded again",
    )


class OriginMetrics:
    """What an origin exports besides the RPC metrics."""

    PUBLISHES = Metric("origin_publishes_total", "counter", "Publish requests accepted")
    PREFILL_RUNS = Metric("origin_prefill_runs_total", "counter", "Prefill runs (one per publish that computed)")
    PREFILL_SECONDS = Metric("origin_prefill_seconds_total", "counter", "Seconds spent in prefill")
    BLOCKS_COMPUTED = Metric("origin_blocks_computed_total", "counter", "Blocks computed and stored")
    READ_CACHE_BYTES = Metric("origin_read_cache_bytes", "gauge", "Bytes of encoded blocks held in memory")
    BLOCKS_QUARANTINED = Metric(
        "origin_blocks_quarantined_total", "counter", "Stored blocks that failed their digests (moved to quarantine)"
    )
    BLOCKS_REPAIRED = Metric(
        "origin_blocks_repaired_total", "counter", "Quarantined blocks recomputed from their documents' token ids"
    )
    METADATA_QUARANTINED = Metric(
        "origin_metadata_quarantined_total",
        "counter",
        "Damaged manifest files and invalidation-feed records set aside (the rest is served)",
    )


class DomainCollector(Collector):
    """Turns a component's own counters into metric families at scrape time, so the domain keeps plain
    ints; series of one family (a tier, a source) become its labelled samples."""

    def __init__(self, stats: Callable[[], Iterable[Stat]]) -> None:
        self._stats = stats

    def collect(self) -> Iterable[CounterMetricFamily | GaugeMetricFamily]:
        families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}
        for metric, value in self._stats():
            family = families.get(metric.sample)
            if family is None:
                kind = CounterMetricFamily if metric.kind == "counter" else GaugeMetricFamily
                family = kind(metric.sample, metric.help, labels=[k for k, _ in metric.labels])
                families[metric.sample] = family
            family.add_metric([v for _, v in metric.labels], value)
        return families.values()


class _Handler(WSGIRequestHandler):
    timeout = 10.0
    """Seconds one read of a scrape's request may wait (the whole connection has _Scrapes.deadline_s)."""

    def log_message(self, format: str, *args: object) -> None:  # scrapes are not news
        pass


class _Scrapes(WSGIServer):
    """`/metrics` over a fixed pool: `workers` threads answer, `waiting` more connections wait their
    turn, any beyond are closed as they are accepted; every connection has `deadline_s` in all from
    its accept (a scrape that sends a byte every few seconds once held a thread forever)."""

    workers = 4
    waiting = 16
    deadline_s = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="kvcdn-metrics")
        self._deadlines: dict[socket.socket, float] = {}
        self._lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            if len(self._deadlines) >= self.workers + self.waiting:
                self.shutdown_request(request)
                return
            self._deadlines[request] = time.monotonic() + self.deadline_s
        self._pool.submit(self._answer, request, client_address)

    def _answer(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            with self._lock:
                self._deadlines.pop(request, None)
            self.shutdown_request(request)

    def service_actions(self) -> None:
        """Cut off the connections past their deadline (called by serve_forever every 0.5 s): the
        thread serving one sees its socket end; one still waiting finds it ended."""
        now = time.monotonic()
        with self._lock:
            late = [sock for sock, deadline in self._deadlines.items() if deadline < now]
        for sock in late:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A scrape that broke off (cut at its deadline, or gone): no traceback, a DEBUG line."""
        log.debug("scrape from %s ended: %s", client_address, sys.exc_info()[1])

    def server_close(self) -> None:
        super().server_close()
        self._pool.shutdown(wait=False, cancel_futures=True)


class _Scrapes6(_Scrapes):
    address_family = socket.AF_INET6


def _family(metric: Metric) -> str:
    """The name prometheus_client takes for the family (it appends `_total` to counters itself)."""
    return metric.sample.removesuffix("_total")


class ServerMetrics:
    """The metrics of one kvcdn server and, once started, its `/metrics` HTTP endpoint.

    RPCs are counted as the gRPC ecosystem's server interceptors count them (`grpc_server_started_total`,
    `grpc_server_handled_total` by `grpc_code`, `grpc_server_handling_seconds`), labelled
    `grpc_service`, `grpc_method`, `grpc_type`; the bulk stream counts as service `kvcdn.v1.Bulk`."""

    def __init__(self, stats: Callable[[], Iterable[Stat]] | None = None) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        labels = ["grpc_type", "grpc_service", "grpc_method"]
        self.started = Counter("grpc_server_started", "RPCs started on the server", labels, registry=self.registry)
        self.handled = Counter(
            "grpc_server_handled",
            "RPCs completed on the server, by final status code",
            [*labels, "grpc_code"],
            registry=self.registry,
        )
        self.handling_seconds = Histogram(
            "grpc_server_handling_seconds",
            "RPC latency until the server's last message (feeds excluded)",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        by = ["transport"]
        r = self.registry
        self.payload_bytes = Counter(_family(PAYLOAD_BYTES_SERVED), PAYLOAD_BYTES_SERVED.help, by, registry=r)
        self.wire_bytes = Counter(_family(WIRE_BYTES_SERVED), WIRE_BYTES_SERVED.help, by, registry=r)
        self.streams_in_flight = Gauge(_family(STREAMS_IN_FLIGHT), STREAMS_IN_FLIGHT.help, by, registry=r)
        for transport in TRANSPORTS:
            for family in (self.payload_bytes, self.wire_bytes, self.streams_in_flight):
                family.labels(transport)
        if stats is not None:
            self.registry.register(DomainCollector(stats))
        self._http: tuple[WSGIServer, threading.Thread] | None = None

    def declare(self, methods: Sequence[Method]) -> None:
        """Pre-initialise the series of every method this server answers (status OK)."""
        for m in methods:
            labels = (m.type, m.service, m.name)
            self.started.labels(*labels)
            self.handled.labels(*labels, "OK")
            if not m.feed:
                self.handling_seconds.labels(*labels)

    def start_http(self, host: str, port: int) -> int:
        """Serve `/metrics` on host:port (0: any free port); returns the bound port. Scrapes are
        answered by a bounded pool, each connection within a total deadline (`_Scrapes`), so half-open
        or trickling scrapes cannot pile up threads."""
        server_class = _Scrapes6 if ":" in host else _Scrapes
        server = make_server(host, port, make_wsgi_app(self.registry), server_class, handler_class=_Handler)
        thread = threading.Thread(target=server.serve_forever, name="kvcdn-metrics", daemon=True)
        thread.start()
        self._http = (server, thread)
        return int(server.server_port)

    def stop(self) -> None:
        if self._http is not None:
            server, thread = self._http
            server.shutdown()
            server.server_close()
            thread.join(5)
            self._http = None
