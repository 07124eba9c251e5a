"""Starting and running the origin's gRPC server."""

from __future__ import annotations

import asyncio
import logging

from kvcdn.model.loading import LoadedModel, load_model
from kvcdn.origin.config import OriginConfig
from kvcdn.origin.origin import Origin
from kvcdn.origin.service import OriginService
from kvcdn.wire.auth import Authorizer
from kvcdn.wire.metrics import OriginMetrics, ServerMetrics, Stat
from kvcdn.wire.ratelimit import RateLimiter
from kvcdn.wire.readside import serve_stream
from kvcdn.wire.rpc import Server, start_server
from kvcdn.wire.serving import serve_until_stopped

__all__ = ["origin_stats", "run_origin", "start_origin"]

log = logging.getLogger(__name__)


def origin_stats(origin: Origin) -> list[Stat]:
    """The origin's counters, for kvcdn.wire.metrics (read at scrape time)."""
    return [
        (OriginMetrics.PUBLISHES, origin.publishes),
        (OriginMetrics.PREFILL_RUNS, origin.prefill_runs),
        (OriginMetrics.PREFILL_SECONDS, origin.prefill_s_total),
        (OriginMetrics.BLOCKS_COMPUTED, origin.blocks_computed),
        (OriginMetrics.READ_CACHE_BYTES, origin.read_cache_bytes),
        (OriginMetrics.BLOCKS_QUARANTINED, origin.blocks.quarantined),
        (OriginMetrics.METADATA_QUARANTINED, origin.manifests.quarantined + origin.events.damaged),
        (OriginMetrics.BLOCKS_REPAIRED, origin.blocks_repaired),
    ]


async def start_origin(config: OriginConfig, model: LoadedModel) -> tuple[Origin, Server]:
    """Start an origin for an already loaded model; the caller stops the returned server."""
    origin = Origin(config, model)
    await origin.start()
    try:
        auth = Authorizer.from_file(config.tokens, config.closed_reads) if config.tokens is not None else None
        limiter = RateLimiter(config.rate_limit) if config.rate_limit > 0 else None
        service = OriginService(origin, ServerMetrics(lambda: origin_stats(origin)), auth, limiter)
        server = await start_server(
            config.listen,
            service,
            publisher=service,
            invalidations=service,
            bulk_stream=lambda request, trailers: serve_stream(service.reads, request, trailers),
            bulk_port=config.bulk_port,
            metrics_port=config.metrics_port,
            tls=config.tls,
        )
    except BaseException:
        await origin.close()
        raise
    server.on_stop.append(origin.close)
    log.info("origin serving %s on %s (fingerprint %s…)", model.name, server.address, origin.fingerprint[:16])
    return origin, server


def load_origin_model(config: OriginConfig) -> LoadedModel:
    return load_model(
        config.model,
        dtype=config.dtype,
        device=config.device,
        models_dir=config.models_dir,
        block_tokens=config.block_tokens,
        frame_bytes=config.frame_bytes,
    )


async def run_origin(config: OriginConfig, port_file: str | None = None) -> None:
    """Load the model, serve until SIGINT/SIGTERM, then stop gracefully."""
    model = await asyncio.get_running_loop().run_in_executor(None, load_origin_model, config)
    _, server = await start_origin(config, model)
    await serve_until_stopped(server, port_file)
