"""The wire spec (proto/kvcdn/v1/SPEC.md) holds: its test vectors are what kvcdn computes, its ring
algorithm written out independently places keys exactly as kvcdn's ring does, manifests return the
token ids a client without a tokenizer needs, and the bulk port serves one request per connection."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import socket
import struct
import subprocess
import sys
from bisect import bisect_right
from pathlib import Path

from kvcdn.client import CacheReader
from kvcdn.model.prompt import document_ids
from kvcdn.spec.identity import block_keys, digest, encoded_key, model_fingerprint
from kvcdn.spec.placement import Placement
from kvcdn.v1 import kvcdn_pb2 as pb
from tests.conftest import Network

ROOT = Path(__file__).resolve().parent.parent
VECTORS = json.loads((ROOT / "proto" / "kvcdn" / "v1" / "testdata" / "vectors.json").read_text())


def _spec_route(edges: dict[str, int], key: bytes, vnodes: int = 160) -> list[str]:
    """SPEC.md's ring, written from the text alone."""
    points: dict[int, str] = {}
    for name, weight in edges.items():
        for w in range(vnodes * weight):
            points[int(hashlib.md5(f"{name}-{w}".encode()).hexdigest(), 16)] = name
    ring = sorted(points)
    start = bisect_right(ring, int(hashlib.md5(key.hex().encode()).hexdigest(), 16)) % len(ring)
    route: list[str] = []
    for point in ring[start:] + ring[:start]:
        if points[point] not in route:
            route.append(points[point])
    return route


def test_the_spec_vectors_are_what_kvcdn_computes() -> None:
    check = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "spec_vectors.py"), "--check"], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr
    v = VECTORS["block_keys"]
    keys = block_keys(bytes.fromhex(v["fingerprint_hex"]), v["ids"], v["block_tokens"])
    assert [k.hex() for k in keys] == v["keys_hex"] and len(keys) == 3  # 600 ids: 256 + 256 + 88
    for e in VECTORS["encoded_keys"]:
        assert encoded_key(bytes.fromhex(e["key_hex"]), e["codec"]).hex() == e["encoded_hex"]
    assert digest(VECTORS["frame_digest"]["payload_utf8"].encode()).hex() == VECTORS["frame_digest"]["blake3_hex"]
    f = VECTORS["model_fingerprint"]
    assert hashlib.sha256(f["canonical_json"].encode("ascii")).hexdigest() == f["fingerprint_hex"]
    assert model_fingerprint(**f["inputs"]).hex() == f["fingerprint_hex"]


def test_the_ring_as_the_spec_writes_it_places_keys_like_kvcdn() -> None:
    r = VECTORS["ring"]
    for route in r["routes"]:
        key = bytes.fromhex(route["key_hex"])
        assert _spec_route(r["edges"], key) == route["route"]
        assert route["owners"] == route["route"][: r["replicas"]]
    rng = random.Random(7)
    for n in (1, 2, 5, 9):
        edges = {f"10.1.{rng.randrange(256)}.{i}:{rng.randrange(1024, 65535)}": rng.randint(1, 3) for i in range(n)}
        ring = Placement(edges, replicas=3)
        for _ in range(40):
            key = rng.randbytes(32)
            assert _spec_route(edges, key) == ring.route(key)
            assert ring.owners(key) == ring.route(key)[:3]


async def test_manifests_carry_the_token_ids_when_asked(network: Network, sample_text: str) -> None:
    published = await network.origin.publish("ids", sample_text)
    assert not published.manifest.token_ids  # answers stay small unless asked
    ids = document_ids(network.model.tokenizer, sample_text)
    async with CacheReader(network.edge_address) as edge:
        plain = await edge.manifest("ids")
        full = await edge.manifest("ids", token_ids=True)
    assert not plain.token_ids and list(full.token_ids) == ids
    keys = block_keys(network.model.fingerprint, list(full.token_ids), network.model.geometry.block_tokens)
    assert keys == [b.key for b in full.blocks]


async def test_the_bulk_port_serves_one_request_per_connection_then_closes(network: Network, sample_text: str) -> None:
    manifest = (await network.origin.publish("bulk", sample_text)).manifest
    request = pb.StreamBlocksRequest(
        fingerprint=network.model.fingerprint_hex, keys=[manifest.blocks[0].key]
    ).SerializeToString()

    def exchange() -> bytes:  # a plain blocking client, off the event loop the server runs on
        with socket.create_connection(("127.0.0.1", network.edge_server.bulk_port), timeout=10) as sock:
            sock.sendall(struct.pack("<I", len(request)) + request)
            received = b""
            while chunk := sock.recv(1 << 16):  # b"": the server closed the connection after END
                received += chunk
            return received

    received = await asyncio.to_thread(exchange)
    payload = 0
    pos = 0
    while True:
        header_len, payload_len = struct.unpack_from("<II", received, pos)
        pos += 8
        if header_len == 0xFFFFFFFF:
            break
        header = pb.FrameHeader.FromString(received[pos : pos + header_len])
        assert header.digest == digest(received[pos + header_len : pos + header_len + payload_len])
        pos += header_len + payload_len
        payload += payload_len
    assert payload == manifest.blocks[0].n_bytes and pos == len(received)
