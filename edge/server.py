"""Starting and running the edge's gRPC server."""

from __future__ import annotations

import logging

from kvcdn.edge.config import EdgeConfig
from kvcdn.edge.disk import DiskTier
from kvcdn.edge.edge import Edge
from kvcdn.edge.peers import reader_for
from kvcdn.edge.tiers import MemoryTier, Tier, tier_stats
from kvcdn.wire.auth import Authorizer
from kvcdn.wire.metrics import EdgeMetrics, ServerMetrics, Stat
from kvcdn.wire.ratelimit import RateLimiter
from kvcdn.wire.readside import ReadService, serve_stream
from kvcdn.wire.rpc import Server, start_server
from kvcdn.wire.serving import serve_until_stopped

__all__ = ["build_edge", "edge_stats", "run_edge", "serve_edge", "start_edge"]

log = logging.getLogger(__name__)


def edge_stats(edge: Edge) -> list[Stat]:
    """The edge's counters, for kvcdn.wire.metrics (read at scrape time)."""
    return [
        (EdgeMetrics.ORIGIN_FETCHES, edge.origin_fetches),
        (EdgeMetrics.BYTES_FROM_ORIGIN, edge.bytes_from_origin),
        (EdgeMetrics.PEER_FETCHES, edge.peer_fetches),
        (EdgeMetrics.BYTES_FROM_PEERS, edge.bytes_from_peers),
        (EdgeMetrics.ADMISSIONS_REFUSED, edge.admissions_refused),
        (EdgeMetrics.PULLS_IN_FLIGHT, edge.loads_in_flight),
        (EdgeMetrics.INVALIDATION_SEQ, edge.invalidated_seq),
        (EdgeMetrics.INVALIDATED_BLOCKS, edge.invalidated_blocks),
        (EdgeMetrics.PINNED_BYTES, edge.pins.used),
        (EdgeMetrics.UNTRUSTED_DROPPED, edge.voucher.dropped),
        (EdgeMetrics.STREAMS_CUT, edge.pins.streams_cut),
        (EdgeMetrics.BLOCK_BUFFER_BYTES, edge.buffers.pooled_bytes),
        *(stat for tier in edge.tiers for stat in tier_stats(tier)),
        *edge.tolls.stats(),
    ]


def build_edge(config: EdgeConfig) -> Edge:
    """An edge with the tiers `config` asks for, in front of its origin (not serving yet)."""
    tiers: list[Tier] = [MemoryTier(config.mem_bytes)]
    if config.disk_dir is not None:
        tiers.append(DiskTier(config.disk_dir, config.disk_bytes))
    return Edge(config, reader_for(config, config.origin), tiers)


async def serve_edge(edge: Edge) -> Server:
    """Start serving `edge` as its config says; the caller stops the returned server, then
    `await edge.close()` (closed here if it cannot start)."""
    config = edge.config
    try:
        auth = Authorizer.from_file(config.tokens, closed_reads=True) if config.tokens is not None else None
        if config.disk_dir is not None:
            await edge.feed.catch_up(config.origin_timeout_s)
        server = await start_server(
            config.listen,
            ReadService(
                edge,
                ServerMetrics(lambda: edge_stats(edge)),
                auth,
                RateLimiter(config.rate_limit) if config.rate_limit > 0 else None,
            ),
            bulk_stream=lambda request, trailers: serve_stream(edge, request, trailers),
            bulk_port=config.bulk_port,
            metrics_port=config.metrics_port,
            tls=config.tls,
        )
    except BaseException:
        await edge.close()
        raise
    try:
        edge.start(server.address)
    except BaseException:
        await server.stop(0)
        await edge.close()
        raise
    log.info("edge serving on %s in front of origin %s", server.address, config.origin)
    return server


async def start_edge(config: EdgeConfig) -> tuple[Edge, Server]:
    """Build and serve an edge (`build_edge`, `serve_edge`)."""
    edge = build_edge(config)
    return edge, await serve_edge(edge)


async def run_edge(config: EdgeConfig, port_file: str | None = None) -> None:
    edge, server = await start_edge(config)
    try:
        await serve_until_stopped(server, port_file)
    finally:
        await edge.close()
