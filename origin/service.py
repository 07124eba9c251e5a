"""Translates the origin's gRPC requests to Origin calls and back; nothing else. The read side is
kvcdn.wire.readside's, shared with the edges."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import grpc

from kvcdn.origin.origin import Origin
from kvcdn.v1 import kvcdn_pb2 as pb
from kvcdn.v1 import kvcdn_pb2_grpc as pb_grpc
from kvcdn.wire.auth import Authorizer
from kvcdn.wire.bulk import Trailers
from kvcdn.wire.frames import Frame
from kvcdn.wire.metrics import ServerMetrics
from kvcdn.wire.ratelimit import RateLimiter
from kvcdn.wire.readside import ReadService
from kvcdn.wire.rpc import feed_errors, rpc_errors

__all__ = ["OriginService"]


class _OriginReads:
    """The origin as kvcdn.wire.readside.Reads: it answers from its own store (no peers to name)."""

    def __init__(self, origin: Origin) -> None:
        self.origin = origin

    async def info(self) -> pb.ServerInfo:
        return self.origin.info()

    async def manifest(self, document: str, version: int, token_ids: bool = False) -> pb.Manifest:
        return await self.origin.manifest(document, version, token_ids)

    async def lookup(
        self, fingerprint: str, keys: Sequence[bytes], codecs: Sequence[str] = (), from_peer: bool = False
    ) -> list[pb.BlockInfo]:
        return self.origin.lookup(fingerprint, keys, codecs)

    def stream(
        self,
        fingerprint: str,
        keys: Sequence[bytes],
        start_frame: int,
        from_peer: bool = False,
        load: pb.Load | None = None,
        trailers: Trailers | None = None,
    ) -> AsyncIterator[Frame]:
        """The origin charges nothing (edges do): a priced deployment closes its reads (`--closed-reads`)
        so that only edges, on their `edge` tokens, stream from it."""
        return self.origin.stream(fingerprint, keys, start_frame)


class OriginService(ReadService, pb_grpc.PublisherServicer, pb_grpc.InvalidationsServicer):
    """KVCache (the shared read side), Publisher and Invalidations."""

    def __init__(
        self,
        origin: Origin,
        metrics: ServerMetrics,
        auth: Authorizer | None = None,
        limiter: RateLimiter | None = None,
    ) -> None:
        super().__init__(_OriginReads(origin), metrics, auth, limiter)
        self.origin = origin

    @rpc_errors
    async def Publish(self, request: pb.PublishRequest, context: grpc.aio.ServicerContext) -> pb.PublishResponse:
        price = request.price if request.HasField("price") else None
        result = await self.origin.publish(request.document, request.text, request.codecs, price)
        return pb.PublishResponse(
            manifest=result.manifest, computed_blocks=result.computed_blocks, prefill_s=result.prefill_s
        )

    @rpc_errors
    async def Purge(self, request: pb.PurgeRequest, context: grpc.aio.ServicerContext) -> pb.PurgeResponse:
        versions, blocks, seq = await self.origin.purge(request.document, request.version)
        return pb.PurgeResponse(versions=versions, blocks_removed=blocks, seq=seq)

    @rpc_errors
    async def Revoke(self, request: pb.RevokeRequest, context: grpc.aio.ServicerContext) -> pb.RevokeResponse:
        return pb.RevokeResponse(seq=await self.origin.revoke(request.revocation))

    @feed_errors
    async def Watch(
        self, request: pb.WatchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.InvalidationEvent]:
        async for event in self.origin.watch(request.after_seq):
            yield event
