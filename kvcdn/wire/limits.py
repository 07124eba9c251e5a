"""What a server process grants the network, port by port, so that no flood (an attacker's or a
stampede's) takes a resource every honest caller needs: file descriptors split between the ports,
the gRPC port's connection cap and handshake deadline. (The bulk port's limits are
kvcdn.wire.bulk.BulkLimits; `/metrics`' are in kvcdn.wire.metrics.)

gRPC's own server caps connections as a whole, not per address: a per-address cap on the gRPC port
belongs to the host's firewall (deploy/README.md gives the rule)."""

from __future__ import annotations

import resource
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DEFAULT_GRPC_LIMITS", "GrpcLimits", "descriptor_share"]


def descriptor_share(share: float, most: int = 4096) -> int:
    """`share` of the process's file-descriptor limit (at least 32, at most `most`). The bulk port
    takes half and the gRPC port a quarter, leaving a quarter for disk files, upstream channels and
    the metrics endpoint, so no port's accept loop is the one that runs the process out."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(32, min(most, int(soft * share))) if soft > 0 else most


@dataclass(frozen=True)
class GrpcLimits:
    """What the gRPC port grants the connections that reach it (gRPC core's server arguments)."""

    connections: int = field(default_factory=lambda: descriptor_share(0.25))
    """Connections open at once; a connection over the cap is closed as it is accepted."""
    handshake_s: float = 10.0
    """Time a new connection has to finish its TLS handshake and HTTP/2 preface (gRPC's default is
    120 s: 300 half-sent prefaces held every descriptor for a minute)."""
    idle_s: float = 300.0
    """A connection with no call for this long is sent GOAWAY (clients reconnect on their next call)."""

    def options(self) -> list[tuple[str, Any]]:
        return [
            ("grpc.max_allowed_incoming_connections", self.connections),
            ("grpc.server_handshake_timeout_ms", int(self.handshake_s * 1000)),
            ("grpc.max_connection_idle_ms", int(self.idle_s * 1000)),
        ]


DEFAULT_GRPC_LIMITS = GrpcLimits()
