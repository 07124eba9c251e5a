"""Starting and running the origin's gRPC server."""

from __future__ import annotations

import asyncio
import logging

from kvcdn.model.loading import LoadedModel, load_model
from kvcdn.origin.config import OriginConfig
from kvcdn.origin.origin import Origin
from kvcdn.origin.service import OriginService
from kvcdn.wire.auth import Authorizer
from kvcdn.wire.metrics import ServerMetrics
from kvcdn.wire.ratelimit import RateLimiter
from kvcdn.wire.readside import serve_stream
from kvcdn.wire.rpc import Server, start_server
from kvcdn.wire.serving import serve_until_stopped

__all__ = ["run_origin", "start_origin"]

log = logging.getLogger(__name__)


async def start_origin(config: OriginConfig, model: LoadedModel) -> tuple[Origin, Server]:
    """Start an origin for an already loaded model; the caller stops the returned server."""
    origin = Origin(config, model)
    await origin.start()
    try:
        auth = Authorizer.from_file(config.tokens, config.closed_reads) if config.tokens is not None else None
        limiter = RateLimiter(config.rate_limit) if config.rate_limit > 0 else None
        service = OriginService(origin, ServerMetrics(origin.stats), auth, limiter)
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
