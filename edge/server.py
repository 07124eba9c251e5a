"""Starting and running the edge's gRPC server."""

from __future__ import annotations

import logging

from kvcdn.edge.config import EdgeConfig
from kvcdn.edge.disk import DiskTier
from kvcdn.edge.edge import Edge
from kvcdn.edge.service import EdgeService
from kvcdn.spec.placement import Placement, parse_edges, resolve_edges
from kvcdn.wire.metrics import ServerMetrics
from kvcdn.wire.rpc import Server, start_server
from kvcdn.wire.serving import serve_until_stopped
from kvcdn.wire.stub import CacheReader

__all__ = ["run_edge", "start_edge"]

log = logging.getLogger(__name__)


async def start_edge(config: EdgeConfig) -> tuple[Edge, Server]:
    """Start an edge; the caller stops the returned server, then `await edge.close()`."""
    origin = CacheReader(config.origin, config.origin_timeout_s, 10 * config.origin_timeout_s)
    disk = DiskTier(config.disk_dir, config.disk_bytes) if config.disk_dir is not None else None
    edge = Edge(origin, config.mem_bytes, disk)
    if disk is not None:
        await edge.catch_up(config.origin_timeout_s)
    server = await start_server(
        config.listen,
        EdgeService(edge, ServerMetrics(edge.stats)),
        bulk_stream=lambda fp, keys, start: edge.stream(fp, keys, start),
        bulk_port=config.bulk_port,
        metrics_port=config.metrics_port,
    )
    edge.bulk_port, edge.metrics_port = server.bulk_port, server.metrics_port
    if config.peers:
        try:
            ring = Placement(resolve_edges(parse_edges(config.peers)), config.replicas)
            edge.join_ring(ring, config.advertise or server.address)
            edge.peer_timeout_s = config.peer_timeout_s
        except BaseException:
            await server.stop(0)
            await edge.close()
            raise
    edge.start_following()
    log.info("edge serving on %s in front of origin %s", server.address, config.origin)
    return edge, server


async def run_edge(config: EdgeConfig, port_file: str | None = None) -> None:
    edge, server = await start_edge(config)
    try:
        await serve_until_stopped(server, port_file)
    finally:
        await edge.close()
