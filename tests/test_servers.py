"""Server plumbing every operator relies on: health, reflection, ports, and the CLI's size parsing."""

from __future__ import annotations

import argparse
import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from kvcdn.errors import InvalidArgument, Unavailable, error_for
from kvcdn.flags import parse_size
from kvcdn.wire.metrics import ServerMetrics
from kvcdn.wire.readside import ReadService
from kvcdn.wire.rpc import start_server
from kvcdn.wire.stub import CacheReader
from tests.conftest import Network


async def _reflect(
    address: str, request: reflection_pb2.ServerReflectionRequest, version: str = "v1alpha"
) -> reflection_pb2.ServerReflectionResponse:
    """One reflection answer through protocol `version` (v1 is v1alpha's messages under another
    package name)."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.stream_stream(
            f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )(iter([request]), timeout=5)
        async for response in call:
            return response  # type: ignore[no-any-return]
    raise AssertionError("no reflection answer")


async def _services(address: str, version: str = "v1alpha") -> set[str]:
    response = await _reflect(address, reflection_pb2.ServerReflectionRequest(list_services=""), version)
    return {s.name for s in response.list_services_response.service}


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
async def test_reflection_answers_both_protocol_versions_and_describes_kvcdn(network: Network, version: str) -> None:
    services = await _services(network.edge_address, version)
    assert {"kvcdn.v1.KVCache", "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"} <= (
        services
    )
    request = reflection_pb2.ServerReflectionRequest(file_containing_symbol="kvcdn.v1.KVCache")
    files = (await _reflect(network.edge_address, request, version)).file_descriptor_response.file_descriptor_proto
    assert files and any(b"LookupPrefix" in f for f in files)


async def test_origin_and_edge_expose_health_and_reflection(network: Network) -> None:
    for address in (network.origin_server.address, network.edge_address):
        async with grpc.aio.insecure_channel(address) as channel:
            for service in ("", "kvcdn.v1.KVCache"):
                resp = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=5
                )
                assert resp.status == health_pb2.HealthCheckResponse.SERVING
    assert {"kvcdn.v1.KVCache", "kvcdn.v1.Publisher", "grpc.health.v1.Health"} <= await _services(
        network.origin_server.address
    )
    edge_services = await _services(network.edge_address)
    assert "kvcdn.v1.KVCache" in edge_services and "kvcdn.v1.Publisher" not in edge_services


async def test_servers_report_the_ports_they_bound(network: Network) -> None:
    assert network.edge_server.port > 0 and network.edge_server.bulk_port > 0
    assert network.origin_server.bulk_port not in (0, network.edge_server.bulk_port)
    async with CacheReader(network.edge_address) as edge, CacheReader(network.origin_server.address) as origin:
        edge_info, origin_info = await edge.info(), await origin.info()
    assert edge_info.role == "edge" and edge_info.bulk_port == network.edge_server.bulk_port
    assert origin_info.role == "origin" and origin_info.bulk_port == network.origin_server.bulk_port


@pytest.mark.parametrize("listen", ["nonsense", "127.0.0.1:notaport", "203.0.113.1:0"])
async def test_a_bad_listen_address_is_a_clear_error(network: Network, listen: str) -> None:
    with pytest.raises(InvalidArgument):
        await start_server(listen, ReadService(network.edge, ServerMetrics()))


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1048576", 1 << 20), ("512MiB", 512 << 20), ("2GiB", 2 << 30), ("1.5G", 1_500_000_000), ("10kb", 10_000)],
)
def test_sizes_parse_with_units(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "5 parsecs", "-3"])
def test_bad_sizes_are_rejected_with_an_example(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="512MiB"):
        parse_size(text)


async def test_streams_starting_together_ask_a_server_for_its_bulk_port_once(network: Network) -> None:
    registry = network.edge_server.metrics.registry
    labels = {"grpc_type": "unary", "grpc_service": "kvcdn.v1.KVCache", "grpc_method": "GetInfo", "grpc_code": "OK"}
    before = registry.get_sample_value("grpc_server_handled_total", labels)
    async with CacheReader(network.edge_address) as edge:
        addresses = await asyncio.gather(*(edge.bulk_address() for _ in range(10)))
    assert len(set(addresses)) == 1 and addresses[0] is not None
    assert before is not None and registry.get_sample_value("grpc_server_handled_total", labels) == before + 1


def test_a_call_the_server_cancelled_is_retryable_elsewhere() -> None:
    err = error_for(grpc.StatusCode.CANCELLED, "GOAWAY received", "edge:1")
    assert isinstance(err, Unavailable) and str(err) == "edge:1: GOAWAY received"
