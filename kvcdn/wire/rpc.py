"""gRPC plumbing shared by every kvcdn server and client: limits, service registration with the
zero-copy StreamBlocks method, health and reflection, and the domain-error-to-status boundary."""

from __future__ import annotations

import contextlib
import functools
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf.message import DecodeError
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from kvcdn.errors import InvalidArgument, KVCDNError
from kvcdn.v1 import kvcdn_pb2 as pb
from kvcdn.v1 import kvcdn_pb2_grpc as pb_grpc
from kvcdn.wire.auth import Authorizer, token_of
from kvcdn.wire.bulk import BulkServer, StreamFn, start_bulk_server
from kvcdn.wire.frames import payload_size
from kvcdn.wire.limits import DEFAULT_GRPC_LIMITS, GrpcLimits
from kvcdn.wire.metrics import BULK_METHOD, Method, ServerMetrics
from kvcdn.wire.ratelimit import RateLimiter, check_call, peer_host
from kvcdn.wire.tls import TLSFiles

__all__ = [
    "CHANNEL_OPTIONS",
    "STREAM_BLOCKS",
    "KVCacheHandlers",
    "Server",
    "feed_errors",
    "rpc_errors",
    "start_server",
    "stream_errors",
]

log = logging.getLogger(__name__)

# Frames are ~1 MiB; leave room for framing and keep gRPC's guard against runaway messages.
MAX_MESSAGE_BYTES = 8 << 20
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]
STREAM_BLOCKS = "/kvcdn.v1.KVCache/StreamBlocks"
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"

_FEEDS = {"Watch"}
METHODS: dict[str, Method] = {
    method.name: Method(
        service.full_name,
        method.name,
        "server_stream" if method.server_streaming else "unary",
        feed=method.name in _FEEDS,
    )
    for service in pb.DESCRIPTOR.services_by_name.values()
    for method in service.methods
}
"""Every kvcdn RPC by method name (names are unique across kvcdn's services), as metrics label it."""

Req = TypeVar("Req")
Resp = TypeVar("Resp")


async def _abort(context: grpc.aio.ServicerContext, exc: Exception, method: str) -> None:
    if isinstance(exc, KVCDNError):
        log.debug("%s failed: %s %s", method, exc.code.name, exc)
        await context.abort(exc.code, str(exc), tuple(exc.trailers.items()))
    incident = secrets.token_hex(4)
    log.error("%s failed unexpectedly (incident %s)", method, incident, exc_info=exc)
    # The details stay in the server's log: a message could disclose paths, keys or internals.
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error (incident {incident} in the server's log)")


@contextlib.asynccontextmanager
async def _boundary(servicer: Any, context: grpc.aio.ServicerContext, method: str) -> AsyncIterator[None]:
    """Where a servicer method meets gRPC: its credentials are checked (`servicer.auth`, if any) and
    its caller's rate (`servicer.limiter`, if any), domain errors become their status (anything else
    INTERNAL), and every call is counted when it starts and by final status, with its latency (feeds:
    none)."""
    metrics: ServerMetrics = servicer.metrics
    auth: Authorizer | None = getattr(servicer, "auth", None)
    limiter: RateLimiter | None = getattr(servicer, "limiter", None)
    m = METHODS[method]
    labels = (m.type, m.service, m.name)
    metrics.started.labels(*labels).inc()
    code = grpc.StatusCode.OK
    started = time.perf_counter()
    try:
        check_call(auth, limiter, peer_host(context.peer()), token_of(context.invocation_metadata()), method)
        yield
    except grpc.aio.AbortError:
        code = grpc.StatusCode.UNKNOWN
        raise
    except Exception as exc:
        code = exc.code if isinstance(exc, KVCDNError) else grpc.StatusCode.INTERNAL
        await _abort(context, exc, method)
    finally:
        metrics.handled.labels(*labels, code.name).inc()
        if not m.feed:
            metrics.handling_seconds.labels(*labels).observe(time.perf_counter() - started)


class _Undecodable:
    """A request whose bytes are not its message (bad UTF-8 in a string, a truncated field): handed
    to the servicer method, whose error boundary answers INVALID_ARGUMENT after the credential and
    rate checks, as for any other bad request (gRPC's own deserializer would answer UNKNOWN and log a
    traceback per request)."""

    def __init__(self, message: str) -> None:
        self.message = message


def _parse_leniently(message: Any) -> Callable[[bytes], Any]:
    """A request deserializer for `message` (a protobuf class) that never raises."""

    def parse(data: bytes) -> Any:
        try:
            return message.FromString(data)
        except DecodeError:
            return _Undecodable(message.DESCRIPTOR.name)

    return parse


def _decoded(request: Any) -> None:
    if isinstance(request, _Undecodable):
        raise InvalidArgument(f"the request is not a well-formed {request.message} (malformed, or a string not UTF-8)")


def rpc_errors(
    fn: Callable[[Any, Req, grpc.aio.ServicerContext], Awaitable[Resp]],
) -> Callable[[Any, Req, grpc.aio.ServicerContext], Awaitable[Resp]]:
    """Map domain errors raised by a unary servicer method onto their gRPC status."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Req, context: grpc.aio.ServicerContext) -> Resp:
        async with _boundary(self, context, fn.__name__):
            _decoded(request)
            return await fn(self, request, context)
        raise AssertionError("unreachable: the boundary re-raises or aborts")

    return wrapper


def stream_errors(
    fn: Callable[[Any, Req, grpc.aio.ServicerContext], AsyncIterator[Resp]],
) -> Callable[[Any, Req, grpc.aio.ServicerContext], AsyncIterator[Resp]]:
    """Map domain errors raised by a streaming servicer method onto their gRPC status."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Req, context: grpc.aio.ServicerContext) -> AsyncIterator[Resp]:
        metrics: ServerMetrics = self.metrics
        payload = metrics.payload_bytes.labels("grpc")
        wire = metrics.wire_bytes.labels("grpc")
        in_flight = metrics.streams_in_flight.labels("grpc")
        in_flight.inc()
        try:
            async with _boundary(self, context, fn.__name__):
                _decoded(request)
                async for item in fn(self, request, context):
                    if isinstance(item, bytes):
                        payload.inc(payload_size(item))
                        wire.inc(len(item))
                    yield item
        finally:
            in_flight.dec()

    return wrapper


def feed_errors(
    fn: Callable[[Any, Req, grpc.aio.ServicerContext], AsyncIterator[Resp]],
) -> Callable[[Any, Req, grpc.aio.ServicerContext], AsyncIterator[Resp]]:
    """`stream_errors` for a feed that stays open as long as its follower (the invalidation feed): its
    calls are counted when they end, but it is no block stream in flight and has no latency to time."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Req, context: grpc.aio.ServicerContext) -> AsyncIterator[Resp]:
        async with _boundary(self, context, fn.__name__):
            _decoded(request)
            async for item in fn(self, request, context):
                yield item

    return wrapper


class KVCacheHandlers(Protocol):
    """The KVCache service as kvcdn servers implement it: StreamBlocks yields encoded frames, and
    `metrics` is where the error-mapping decorators record each call."""

    metrics: ServerMetrics

    def GetInfo(self, request: pb.GetInfoRequest, context: Any, /) -> Awaitable[pb.ServerInfo]: ...
    def GetManifest(self, request: pb.GetManifestRequest, context: Any, /) -> Awaitable[pb.Manifest]: ...
    def LookupPrefix(self, request: pb.LookupPrefixRequest, context: Any, /) -> Awaitable[pb.LookupPrefixResponse]: ...
    def StreamBlocks(self, request: pb.StreamBlocksRequest, context: Any, /) -> AsyncIterator[bytes]: ...


@dataclass
class _Ports:
    """What a server bound besides its gRPC port, filled in before it starts serving."""

    bulk: int = 0
    metrics: int = 0


def _handlers(name: str, servicer: Any, behaviours: dict[str, Any] | None = None) -> grpc.GenericRpcHandler:
    """Handlers for every method of the kvcdn service `name`, read off its descriptor, each request
    parsed leniently (`_Undecodable`) and answered by `servicer`'s method of that name (or by
    `behaviours`' entry). StreamBlocks yields frames already encoded as `Frame` bytes
    (kvcdn.wire.frames): no serializer."""
    service = pb.DESCRIPTOR.services_by_name[name]
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in service.methods:
        parse = _parse_leniently(GetMessageClass(method.input_type))
        behaviour = (behaviours or {}).get(method.name) or getattr(servicer, method.name)
        serialize = None if method.name == "StreamBlocks" else GetMessageClass(method.output_type).SerializeToString
        make = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(behaviour, request_deserializer=parse, response_serializer=serialize)
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


def _kvcache_handlers(servicer: KVCacheHandlers, ports: _Ports) -> grpc.GenericRpcHandler:
    """The KVCache service's handlers; GetInfo answers with the ports this server bound (transport
    facts the domain does not know)."""

    async def get_info(request: pb.GetInfoRequest, context: grpc.aio.ServicerContext) -> pb.ServerInfo:
        info = await servicer.GetInfo(request, context)
        info.bulk_port, info.metrics_port = ports.bulk, ports.metrics
        return info

    return _handlers("KVCache", servicer, {"GetInfo": get_info})


def _add_reflection(server: grpc.aio.Server, names: list[str]) -> None:
    """Server reflection under both package names clients use: `grpc.reflection.v1` (grpcurl and
    current tools) and `grpc.reflection.v1alpha`. The two protocols are the same messages field for
    field, so one servicer answers both."""
    servicer = reflection.aio.ReflectionServicer([*names, reflection.SERVICE_NAME, REFLECTION_V1])
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    v1 = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    handler = grpc.method_handlers_generic_handler(REFLECTION_V1, {"ServerReflectionInfo": v1})
    server.add_generic_rpc_handlers((handler,))


class Server:
    """A started grpc.aio server, the port it bound, its bulk frame server and its metrics endpoint."""

    def __init__(
        self,
        server: grpc.aio.Server,
        port: int,
        host: str,
        bulk: BulkServer | None,
        metrics: ServerMetrics,
        metrics_port: int,
    ) -> None:
        self.grpc = server
        self.port = port
        self.host = host
        self.bulk = bulk
        self.metrics = metrics
        self.metrics_port = metrics_port
        """Port of the `/metrics` HTTP endpoint; 0 when it is off."""
        self.on_stop: list[Callable[[], Awaitable[None]]] = []
        """Called when the server has stopped (what it served closes)."""

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics" if self.metrics_port else ""

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def bulk_port(self) -> int:
        return self.bulk.port if self.bulk else 0

    async def stop(self, grace_s: float = 1.0) -> None:
        if self.bulk:
            await self.bulk.stop()
        await self.grpc.stop(grace_s)
        self.metrics.stop()
        for close in self.on_stop:
            await close()


async def start_server(
    listen: str,
    kvcache: KVCacheHandlers,
    publisher: pb_grpc.PublisherServicer | None = None,
    invalidations: pb_grpc.InvalidationsServicer | None = None,
    bulk_stream: StreamFn | None = None,
    bulk_port: int = 0,
    metrics_port: int = -1,
    tls: TLSFiles | None = None,
    limits: GrpcLimits = DEFAULT_GRPC_LIMITS,
) -> Server:
    """Build, bind and start a server with the KVCache service (plus Publisher on the origin),
    health checking and reflection, the bulk frame stream of `bulk_stream` on `bulk_port` and the
    `/metrics` endpoint of `kvcache.metrics` on `metrics_port`, both on the same host (0: any free
    port; -1: none), the gRPC port within `limits`. `listen` may use port 0; the bound ports are
    returned."""
    host, _, port_text = listen.rpartition(":")
    if not host or not port_text.isdigit():
        raise InvalidArgument(f"--listen {listen!r} is not HOST:PORT")
    server = grpc.aio.server(options=[*CHANNEL_OPTIONS, *limits.options()])
    ports = _Ports()
    server.add_generic_rpc_handlers((_kvcache_handlers(kvcache, ports),))
    names = [pb.DESCRIPTOR.services_by_name["KVCache"].full_name]
    for name, servicer in (("Publisher", publisher), ("Invalidations", invalidations)):
        if servicer is not None:
            server.add_generic_rpc_handlers((_handlers(name, servicer),))
            names.append(pb.DESCRIPTOR.services_by_name[name].full_name)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    _add_reflection(server, [*names, health.SERVICE_NAME])
    served = [m for m in METHODS.values() if m.service in names]
    kvcache.metrics.declare([*served, BULK_METHOD] if bulk_stream is not None else served)
    try:
        port = server.add_secure_port(listen, tls.server_credentials()) if tls else server.add_insecure_port(listen)
    except RuntimeError:
        port = 0
    if port == 0:
        raise InvalidArgument(f"cannot bind {listen}: the address is in use or not local")
    host = host.strip("[]")
    bulk = None
    bound_metrics = 0
    try:
        if bulk_stream is not None and bulk_port >= 0:
            bulk = await start_bulk_server(
                host,
                bulk_port,
                bulk_stream,
                kvcache.metrics,
                tls=tls.server_context() if tls is not None else None,
                auth=getattr(kvcache, "auth", None),
                limiter=getattr(kvcache, "limiter", None),
            )
        if metrics_port >= 0:
            try:
                bound_metrics = kvcache.metrics.start_http(host, metrics_port)
            except OSError as exc:
                raise InvalidArgument(f"cannot bind the metrics port {host}:{metrics_port}: {exc.strerror}") from None
    except BaseException:
        if bulk is not None:
            await bulk.stop()
        await server.stop(0)
        raise
    ports.bulk, ports.metrics = bulk.port if bulk is not None else 0, bound_metrics
    await server.start()
    for name in ("", *names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return Server(server, port, host, bulk, kvcache.metrics, bound_metrics)
