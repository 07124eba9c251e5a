"""TLS and mutual TLS on the gRPC ports and the bulk stream: an origin and an edge that require client
certificates from a test CA (`kvcdn certs`) serve a client that presents one, bit-identically, over
either transport; callers without a certificate, with another CA or in plaintext get nothing."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from kvcdn.client import CacheReader, ClientConfig, KVClient
from kvcdn.edge import EdgeConfig, start_edge
from kvcdn.errors import Unauthenticated, Unavailable
from kvcdn.model import adapter
from kvcdn.model.loading import LoadedModel
from kvcdn.model.prompt import document_ids
from kvcdn.model.receiving import KVAssembler
from kvcdn.ops.launcher import Cluster
from kvcdn.origin import OriginConfig
from kvcdn.origin.server import start_origin
from kvcdn.wire.auth import read_token
from kvcdn.wire.receiver import Progress, receive_into
from kvcdn.wire.rpc import Server
from kvcdn.wire.tls import TLSFiles, make_test_ca
from tests.conftest import SAMPLES, tiny_llama

TEXT = (SAMPLES / "gpl-3.0.txt").read_text()[:2000]


def _bulk_bytes(server: Server) -> float:
    value = server.metrics.registry.get_sample_value("kvcdn_payload_bytes_served_total", {"transport": "bulk"})
    return value or 0.0


async def test_mutual_tls_round_trip_and_refusals(llama: LoadedModel, tmp_path: Path) -> None:
    files = make_test_ca(tmp_path / "pki", ["127.0.0.1"])
    server_tls = TLSFiles(files["server"], files["server_key"], files["ca"])  # ca: callers need certificates
    client_tls = TLSFiles(files["client"], files["client_key"], files["ca"])
    _origin, origin_server = await start_origin(
        OriginConfig(
            store_dir=tmp_path / "store",
            listen="127.0.0.1:0",
            model=llama.name,
            block_tokens=llama.geometry.block_tokens,
            frame_bytes=llama.geometry.frame_bytes,
            codecs=(),
            tls=server_tls,
        ),
        llama,
    )
    # The edge serves with the server certificate and presents it to the origin (mTLS both ways).
    edge, edge_server = await start_edge(EdgeConfig(origin=origin_server.address, listen="127.0.0.1:0", tls=server_tls))
    try:
        assert origin_server.bulk_port and edge_server.bulk_port
        async with CacheReader(origin_server.address, tls=client_tls) as publisher:
            manifest = (await publisher.publish("doc", TEXT)).manifest
        doc = document_ids(llama.tokenizer, TEXT)
        expected = adapter.prefill(llama.model, doc)
        for bulk in (True, False):  # the bulk stream in TLS, then gRPC's
            before = _bulk_bytes(edge_server)
            async with KVClient(ClientConfig((edge_server.address,), tls=client_tls, bulk=bulk)) as client:
                fetched = await client.fetch(llama, doc)
            assert fetched.cached_tokens == len(doc)
            assert (_bulk_bytes(edge_server) - before == fetched.n_bytes) == bulk
            for (k, v), (rk, rv) in zip(fetched.layers, expected, strict=True):
                assert torch.equal(k, rk) and torch.equal(v, rv)

        other = make_test_ca(tmp_path / "other-pki", ["127.0.0.1"])
        refused = [
            ClientConfig((edge_server.address,), timeout_s=3, tls=TLSFiles(ca=files["ca"])),  # no certificate
            ClientConfig(
                (edge_server.address,), timeout_s=3, tls=TLSFiles(other["client"], other["client_key"], other["ca"])
            ),
            ClientConfig((edge_server.address,), timeout_s=3),  # plaintext
        ]
        for config in refused:
            for bulk in (True, False):
                async with KVClient(replace(config, bulk=bulk)) as client:
                    with pytest.raises(Unavailable):
                        await client.fetch(llama, doc)
        # The bulk port itself, asked directly: a plaintext request or a TLS one without a certificate
        # gets no frame (the fetches above fail at gRPC's GetInfo/lookup before reaching it).
        client_tls_context = client_tls.client_context()
        for tls in (None, TLSFiles(ca=files["ca"]).client_context(), client_tls_context):
            assembler = KVAssembler(llama.geometry, len(doc), torch.device("cpu"))
            args = (llama.fingerprint_hex, manifest.blocks, llama.geometry, assembler, Progress(), 3.0, tls)
            address = ("127.0.0.1", edge_server.bulk_port)
            if tls is client_tls_context:
                await asyncio.to_thread(receive_into, address, *args)  # the control: this one is served
                continue
            with pytest.raises(Unavailable):
                await asyncio.to_thread(receive_into, address, *args)
    finally:
        await edge_server.stop(0)
        await edge.close()
        await origin_server.stop(0)


async def test_a_deployment_with_every_lock_on(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    """Processes as `kvcdn up --closed-reads` runs them, plus mutual TLS on every port: the origin signs,
    edges pull from each other and the origin with their edge token over TLS, and an agent with a reader
    token, the CA and a client certificate gets the exact cache; without the token it gets nothing."""
    model, args = tiny_llama(tiny_dirs)
    text = (SAMPLES / "gpl-3.0.txt").read_text()[:6000]
    doc = document_ids(model.tokenizer, text)
    cluster = Cluster(store_dir=tmp_path / "store", edges=2, origin_args=args, auth=True, closed_reads=True, tls=True)
    with cluster:
        assert cluster.client_tls is not None and cluster.trust_file is not None
        token = read_token(cluster.publisher_token_file)
        async with CacheReader(cluster.origin_address, token=token, tls=cluster.client_tls) as origin:
            await origin.publish("gpl", text)
        config = ClientConfig(
            tuple(cluster.edge_addresses),
            tls=cluster.client_tls,
            trust=(cluster.trust_file,),
            token=read_token(cluster.reader_token_file),
        )
        async with KVClient(config) as client:
            fetched = await client.fetch(model, doc)
        assert fetched.cached_tokens == len(doc)
        for (k, v), (rk, rv) in zip(fetched.layers, adapter.prefill(model.model, doc), strict=True):
            assert torch.equal(k, rk) and torch.equal(v, rv)
        async with KVClient(replace(config, token="")) as client:
            with pytest.raises(Unauthenticated):
                await client.fetch(model, doc)
