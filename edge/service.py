"""Translates the edge's gRPC requests to Edge calls and back; nothing else."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from kvcdn.edge.edge import Edge
from kvcdn.v1 import kvcdn_pb2 as pb
from kvcdn.wire.auth import Authorizer
from kvcdn.wire.frames import as_bytes
from kvcdn.wire.metrics import ServerMetrics
from kvcdn.wire.ratelimit import RateLimiter
from kvcdn.wire.rpc import rpc_errors, stream_errors

__all__ = ["EdgeService"]


class EdgeService:
    """KVCache, registered by kvcdn.wire.rpc with pass-through frames."""

    def __init__(
        self, edge: Edge, metrics: ServerMetrics, auth: Authorizer | None = None, limiter: RateLimiter | None = None
    ) -> None:
        self.edge = edge
        self.metrics = metrics
        self.auth = auth
        """Checks the callers' tokens where reads are closed (kvcdn.wire.rpc calls it); None: open."""
        self.limiter = limiter
        """Each caller's rate of calls (None: unlimited)."""

    @rpc_errors
    async def GetInfo(self, request: pb.GetInfoRequest, context: grpc.aio.ServicerContext) -> pb.ServerInfo:
        return await self.edge.info()

    @rpc_errors
    async def GetManifest(self, request: pb.GetManifestRequest, context: grpc.aio.ServicerContext) -> pb.Manifest:
        return await self.edge.manifest(request.document, request.version, request.token_ids)

    @rpc_errors
    async def LookupPrefix(
        self, request: pb.LookupPrefixRequest, context: grpc.aio.ServicerContext
    ) -> pb.LookupPrefixResponse:
        blocks = await self.edge.lookup(request.fingerprint, request.keys, request.codecs, from_peer=request.from_peer)
        return pb.LookupPrefixResponse(blocks=blocks)

    @stream_errors
    async def StreamBlocks(
        self, request: pb.StreamBlocksRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        async for frame in self.edge.stream(
            request.fingerprint, request.keys, request.start_frame, from_peer=request.from_peer
        ):
            yield as_bytes(frame)
