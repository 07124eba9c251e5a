"""Prometheus metrics of one server: its own registry (so several servers can share a process, as in
tests), RPC counts and latencies recorded at the gRPC boundary (kvcdn.wire.rpc), bulk stream traffic, and
whatever the component's domain exposes through a collector read at scrape time."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["DomainCollector", "ServerMetrics", "Stat"]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)

Stat = tuple[str, str, str, float]
"""(name without the kvcdn_ prefix, "counter" or "gauge", help text, value)."""


class DomainCollector(Collector):
    """Turns a component's own counters into metrics at scrape time, so the domain keeps plain ints."""

    def __init__(self, stats: Callable[[], Iterable[Stat]]) -> None:
        self._stats = stats

    def collect(self) -> Iterable[CounterMetricFamily | GaugeMetricFamily]:
        for name, kind, help_text, value in self._stats():
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            yield family(f"kvcdn_{name}", help_text, value=value)


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
            "kvcdn_bytes_served", "Frame bytes sent to clients, by transport", ["transport"], registry=self.registry
        )
        self.streams_in_flight = Gauge(
            "kvcdn_streams_in_flight", "Block streams being served, by transport", ["transport"], registry=self.registry
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
