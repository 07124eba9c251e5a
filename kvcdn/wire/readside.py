"""The read side of the KVCache service, one servicer for every server that serves caches (an edge,
an origin): it translates GetInfo, GetManifest, LookupPrefix and StreamBlocks to `Reads` calls and
back; nothing else. kvcdn.wire.rpc registers it (frames pass through encoded) and maps its errors."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Protocol

import grpc

from kvcdn.v1 import kvcdn_pb2 as pb
from kvcdn.wire.auth import Authorizer
from kvcdn.wire.bulk import Trailers
from kvcdn.wire.frames import Frame, as_bytes
from kvcdn.wire.metrics import ServerMetrics
from kvcdn.wire.ratelimit import RateLimiter
from kvcdn.wire.rpc import rpc_errors, stream_errors

__all__ = ["ReadService", "Reads", "serve_stream"]


class Reads(Protocol):
    """What a server that serves caches answers (kvcdn.edge.edge.Edge; an origin through its adapter)."""

    async def info(self) -> pb.ServerInfo: ...

    async def manifest(self, document: str, version: int, token_ids: bool = False) -> pb.Manifest: ...

    async def lookup(
        self, fingerprint: str, keys: Sequence[bytes], codecs: Sequence[str] = (), from_peer: bool = False
    ) -> list[pb.BlockInfo]: ...

    def stream(
        self,
        fingerprint: str,
        keys: Sequence[bytes],
        start_frame: int,
        from_peer: bool = False,
        load: pb.Load | None = None,
        trailers: Trailers | None = None,
    ) -> AsyncIterator[Frame]: ...


def serve_stream(reads: Reads, request: pb.StreamBlocksRequest, trailers: Trailers) -> AsyncIterator[Frame]:
    """`reads`' frames for a StreamBlocks request (gRPC or bulk), its trailers filled in as it goes."""
    return reads.stream(
        request.fingerprint,
        request.keys,
        request.start_frame,
        from_peer=request.from_peer,
        load=request.load if request.HasField("load") else None,
        trailers=trailers,
    )


class ReadService:
    """KVCache over `reads`, with the checks kvcdn.wire.rpc's decorators run around every call."""

    def __init__(
        self, reads: Reads, metrics: ServerMetrics, auth: Authorizer | None = None, limiter: RateLimiter | None = None
    ) -> None:
        self.reads = reads
        self.metrics = metrics
        self.auth = auth
        """Checks the callers' tokens (kvcdn.wire.rpc calls it); None: anyone who reaches the port."""
        self.limiter = limiter
        """Each caller's rate of calls (None: unlimited)."""

    @rpc_errors
    async def GetInfo(self, request: pb.GetInfoRequest, context: grpc.aio.ServicerContext) -> pb.ServerInfo:
        return await self.reads.info()

    @rpc_errors
    async def GetManifest(self, request: pb.GetManifestRequest, context: grpc.aio.ServicerContext) -> pb.Manifest:
        return await self.reads.manifest(request.document, request.version, request.token_ids)

    @rpc_errors
    async def LookupPrefix(
        self, request: pb.LookupPrefixRequest, context: grpc.aio.ServicerContext
    ) -> pb.LookupPrefixResponse:
        blocks = await self.reads.lookup(request.fingerprint, request.keys, request.codecs, from_peer=request.from_peer)
        return pb.LookupPrefixResponse(blocks=blocks)

    @stream_errors
    async def StreamBlocks(
        self, request: pb.StreamBlocksRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        trailers: Trailers = {}
        async for frame in serve_stream(self.reads, request, trailers):
            yield as_bytes(frame)
        if trailers:
            context.set_trailing_metadata(tuple(trailers.items()))
