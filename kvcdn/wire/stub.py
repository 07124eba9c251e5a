"""A thin async stub for one kvcdn server (origin or edge): each call has a deadline, every failure
comes back as a kvcdn.errors type, and StreamBlocks yields frames as raw `Frame` bytes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import aclosing
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvcdn.errors import from_rpc_error
from kvcdn.store.singleflight import SingleFlight
from kvcdn.v1 import kvcdn_pb2 as pb
from kvcdn.v1 import kvcdn_pb2_grpc as pb_grpc
from kvcdn.wire.auth import bearer
from kvcdn.wire.rpc import CHANNEL_OPTIONS, STREAM_BLOCKS
from kvcdn.wire.tls import TLSFiles

__all__ = ["CacheReader"]


class CacheReader:
    """Calls to one server. Create and use it inside the event loop that runs it."""

    def __init__(
        self,
        address: str,
        timeout_s: float = 30.0,
        stream_timeout_s: float = 300.0,
        token: str = "",
        tls: TLSFiles | None = None,
    ) -> None:
        self.address = address
        self.token = token
        self._credentials = bearer(token)
        """Metadata every call carries: Publish, Purge and Watch need a token where the server has a
        tokens file, reads where it closes them (kvcdn.wire.auth)."""
        self.timeout_s = timeout_s
        self.stream_timeout_s = stream_timeout_s
        self._channel = (
            grpc.aio.secure_channel(address, tls.channel_credentials(), options=CHANNEL_OPTIONS)
            if tls is not None
            else grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        )
        self._kv = pb_grpc.KVCacheStub(self._channel)
        self._publisher = pb_grpc.PublisherStub(self._channel)
        self._invalidations = pb_grpc.InvalidationsStub(self._channel)
        self._info: pb.ServerInfo | None = None
        self._info_calls: SingleFlight[str, asyncio.Future[pb.ServerInfo]] = SingleFlight()
        self._stream = self._channel.unary_stream(
            STREAM_BLOCKS,
            request_serializer=pb.StreamBlocksRequest.SerializeToString,
            response_deserializer=None,  # raw bytes: kvcdn.wire.frames.decode_frame slices them
        )

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, call: Any) -> Any:
        """Await a unary call, turning a failure into its kvcdn.errors type."""
        try:
            return await call
        except grpc.RpcError as err:
            raise from_rpc_error(err, self.address) from None

    async def _drain(self, call: Any) -> AsyncGenerator[Any, None]:
        """Iterate a server-streaming call, turning a failure into its kvcdn.errors type; the call is
        cancelled when the caller stops early."""
        try:
            async for item in call:
                yield item
        except grpc.RpcError as err:
            raise from_rpc_error(err, self.address) from None
        finally:
            call.cancel()

    async def __aenter__(self) -> CacheReader:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def info(self) -> pb.ServerInfo:
        info: pb.ServerInfo = await self._call(self._kv.GetInfo(pb.GetInfoRequest(), timeout=self.timeout_s))
        self._info = info
        return info

    async def health(self, service: str = "") -> str:
        """The server's answer on the standard gRPC health service (`SERVING`, `NOT_SERVING`, ...)
        for `service` ("": the server as a whole)."""
        stub = health_pb2_grpc.HealthStub(self._channel)
        answer = await self._call(stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout_s))
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status))

    async def bulk_address(self) -> tuple[str, int] | None:
        """(host, port) of the server's bulk frame stream, or None when it offers none (asked once,
        however many streams start at the same moment)."""
        info = self._info or await self._info_calls.do("info", self.info)
        if not info.bulk_port:
            return None
        return self.address.rpartition(":")[0].strip("[]"), info.bulk_port

    async def manifest(self, document: str, version: int = 0, token_ids: bool = False) -> pb.Manifest:
        """The manifest of `document` (version 0: the latest), with its token ids if `token_ids`."""
        request = pb.GetManifestRequest(document=document, version=version, token_ids=token_ids)
        call = self._kv.GetManifest(request, timeout=self.timeout_s, metadata=self._credentials)
        manifest: pb.Manifest = await self._call(call)
        return manifest

    async def lookup(
        self, fingerprint: str, keys: Sequence[bytes], codecs: Sequence[str] = (), from_peer: bool = False
    ) -> list[pb.BlockInfo]:
        """The longest cached prefix of `keys` in the first of `codecs` (empty: raw) that holds it
        (`from_peer`: an edge asking another edge, see LookupPrefixRequest.from_peer)."""
        request = pb.LookupPrefixRequest(fingerprint=fingerprint, keys=keys, codecs=codecs, from_peer=from_peer)
        resp = await self._call(self._kv.LookupPrefix(request, timeout=self.timeout_s, metadata=self._credentials))
        return list(resp.blocks)

    async def stream(
        self,
        fingerprint: str,
        keys: Sequence[bytes],
        start_frame: int = 0,
        from_peer: bool = False,
        load: pb.Load | None = None,
        trailers: list[tuple[str, bytes]] | None = None,
    ) -> AsyncIterator[bytes]:
        """Encoded frames of `keys` in order, from frame `start_frame` of the first key (`from_peer`:
        an edge asking another edge, see StreamBlocksRequest.from_peer), as part of `load` where
        given; a stream that completes adds its trailing metadata to `trailers`."""
        request = pb.StreamBlocksRequest(
            fingerprint=fingerprint, keys=keys, start_frame=start_frame, from_peer=from_peer, load=load
        )
        call = self._stream(request, timeout=self.stream_timeout_s, metadata=self._credentials)
        async with aclosing(self._drain(call)) as frames:
            async for raw in frames:
                yield raw
        if trailers is not None:
            for key, value in await call.trailing_metadata() or ():
                trailers.append((key, value if isinstance(value, bytes) else value.encode()))

    async def publish(
        self,
        document: str,
        text: str,
        codecs: Sequence[str] = (),
        timeout_s: float = 1800.0,
        price: pb.Price | None = None,
    ) -> pb.PublishResponse:
        """Publish `text` as `document`, offered raw and in `codecs` (empty: the origin's default), at
        `price` (None: free)."""
        request = pb.PublishRequest(document=document, text=text, codecs=codecs, price=price)
        resp: pb.PublishResponse = await self._call(
            self._publisher.Publish(request, timeout=timeout_s, metadata=self._credentials)
        )
        return resp

    async def purge(self, document: str, version: int = 0) -> pb.PurgeResponse:
        resp: pb.PurgeResponse = await self._call(
            self._publisher.Purge(
                pb.PurgeRequest(document=document, version=version),
                timeout=self.timeout_s,
                metadata=self._credentials,
            )
        )
        return resp

    async def revoke(self, revocation: str) -> int:
        """Relay a grant issuer's signed revocation list to the edges; the feed event's seq."""
        request = pb.RevokeRequest(revocation=revocation)
        resp = await self._call(self._publisher.Revoke(request, timeout=self.timeout_s, metadata=self._credentials))
        return int(resp.seq)

    async def watch(self, after_seq: int) -> AsyncIterator[pb.InvalidationEvent]:
        """The origin's invalidation events after `after_seq`, as they happen (no deadline)."""
        call = self._invalidations.Watch(pb.WatchRequest(after_seq=after_seq), metadata=self._credentials)
        async with aclosing(self._drain(call)) as events:
            async for event in events:
                yield event
