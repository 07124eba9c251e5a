"""Translates the origin's gRPC requests to Origin calls and back; nothing else."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from kvcdn.origin.origin import Origin
from kvcdn.v1 import kvcdn_pb2 as pb
from kvcdn.v1 import kvcdn_pb2_grpc as pb_grpc
from kvcdn.wire.auth import Authorizer
from kvcdn.wire.frames import as_bytes
from kvcdn.wire.metrics import ServerMetrics
from kvcdn.wire.ratelimit import RateLimiter
from kvcdn.wire.rpc import feed_errors, rpc_errors, stream_errors

__all__ = ["OriginService"]


class OriginService(pb_grpc.PublisherServicer, pb_grpc.InvalidationsServicer):
    """KVCache (registered by kvcdn.wire.rpc with pass-through frames), Publisher and Invalidations."""

    def __init__(
        self,
        origin: Origin,
        metrics: ServerMetrics,
        auth: Authorizer | None = None,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.origin = origin
        self.metrics = metrics
        self.auth = auth
        """Who may Publish, Purge and Watch (None: anyone who reaches the port)."""
        self.limiter = limiter
        """Each caller's rate of calls (None: unlimited)."""

    @rpc_errors
    async def GetInfo(self, request: pb.GetInfoRequest, context: grpc.aio.ServicerContext) -> pb.ServerInfo:
        return self.origin.info()

    @rpc_errors
    async def GetManifest(self, request: pb.GetManifestRequest, context: grpc.aio.ServicerContext) -> pb.Manifest:
        return self.origin.manifest(request.document, request.version, request.token_ids)

    @rpc_errors
    async def LookupPrefix(
        self, request: pb.LookupPrefixRequest, context: grpc.aio.ServicerContext
    ) -> pb.LookupPrefixResponse:
        return pb.LookupPrefixResponse(blocks=self.origin.lookup(request.fingerprint, request.keys, request.codecs))

    @stream_errors
    async def StreamBlocks(
        self, request: pb.StreamBlocksRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        async for frame in self.origin.stream(request.fingerprint, request.keys, request.start_frame):
            yield as_bytes(frame)

    @rpc_errors
    async def Publish(self, request: pb.PublishRequest, context: grpc.aio.ServicerContext) -> pb.PublishResponse:
        result = await self.origin.publish(request.document, request.text, request.codecs)
        return pb.PublishResponse(
            manifest=result.manifest, computed_blocks=result.computed_blocks, prefill_s=result.prefill_s
        )

    @rpc_errors
    async def Purge(self, request: pb.PurgeRequest, context: grpc.aio.ServicerContext) -> pb.PurgeResponse:
        versions, blocks, seq = await self.origin.purge(request.document, request.version)
        return pb.PurgeResponse(versions=versions, blocks_removed=blocks, seq=seq)

    @feed_errors
    async def Watch(
        self, request: pb.WatchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.InvalidationEvent]:
        async for event in self.origin.watch(request.after_seq):
            yield event
