"""The Node.js conformance client (conformance/node, written from proto/kvcdn/v1 alone) fetches caches
byte-identical to kvcdn's own client over gRPC and the bulk port, passes the spec's test vectors,
fails over and resumes at a bad frame, and reports kvcdn's status codes. Runs where Node.js and the
client's packages are installed (`make conformance`); skipped, saying so, elsewhere."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from kvcdn.client import KVClient
from kvcdn.edge import EdgeConfig, start_edge
from kvcdn.model.prompt import document_ids
from tests.conftest import Network

ROOT = Path(__file__).resolve().parent.parent
CLIENT = ROOT / "conformance" / "node" / "fetch.mjs"
NODE = shutil.which("node")

pytestmark = pytest.mark.skipif(
    NODE is None or not (CLIENT.parent / "node_modules" / ".package-lock.json").is_file(),  # npm writes it last
    reason="needs Node.js and the conformance client's packages: make conformance",
)


async def _node(*args: str) -> tuple[int, str, str]:
    assert NODE is not None
    proc = await asyncio.create_subprocess_exec(
        NODE, str(CLIENT), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_node_client_passes_the_spec_vectors() -> None:
    rc, out, err = await _node("--vectors", str(ROOT / "proto" / "kvcdn" / "v1" / "testdata" / "vectors.json"))
    assert rc == 0, err
    result = json.loads(out)
    assert result["failures"] == [] and result["checked"] > 30


@pytest.mark.parametrize("transport", ["grpc", "bulk"])
async def test_node_client_fetches_the_bytes_kvcdns_client_fetches(
    network: Network, sample_text: str, tmp_path: Path, transport: str
) -> None:
    model = network.model
    await network.origin.publish("doc", sample_text)
    edge2, server2 = await start_edge(EdgeConfig(origin=network.origin_server.address, listen="127.0.0.1:0"))
    edges = [network.edge_address, server2.address]
    by_address = {network.edge_address: network.edge, server2.address: edge2}
    try:
        ids = document_ids(model.tokenizer, sample_text)
        async with KVClient(edges) as client:
            fetched = await client.fetch(model, ids, ["raw"])
            bad = client.placement.route(fetched_first_key := (await client.lookup(model, ids, ["raw"]))[0].key)[0]
        expected = b"".join(
            t[0].transpose(0, 1).contiguous().view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes()
            for layer in fetched.layers
            for t in layer
        )

        out = tmp_path / "cache.bin"
        rc, stdout, err = await _node(
            "--edges", ",".join(edges), "--doc", "doc", "--transport", transport, "--out", str(out)
        )
        assert rc == 0, err
        summary = json.loads(stdout)
        assert summary["keys_match_manifest"] and summary["codec"] == "raw" and summary["failovers"] == 0
        assert summary["cached_tokens"] == len(ids) == fetched.cached_tokens
        assert summary["payload_bytes"] == fetched.n_bytes
        assert out.read_bytes() == expected

        # The first block's owner flips a byte of its second frame: the client resumes at that frame
        # on the next edge of the route and still writes the same bytes.
        real = by_address[bad].stream

        async def tampers(
            fp: str, keys: Sequence[bytes], start: int, from_peer: bool = False, **kw: Any
        ) -> AsyncIterator[bytes]:
            sent = 0
            async for raw in real(fp, keys, start, from_peer, **kw):
                if keys[0] == fetched_first_key and sent == 1:
                    raw = bytes(raw[:-1]) + bytes([raw[-1] ^ 1])
                yield raw
                sent += 1

        by_address[bad].stream = tampers  # type: ignore[method-assign]
        out.unlink()
        rc, stdout, err = await _node(
            "--edges", ",".join(edges), "--doc", "doc", "--transport", transport, "--out", str(out)
        )
        assert rc == 0, err
        assert json.loads(stdout)["failovers"] >= 1 and out.read_bytes() == expected
    finally:
        await server2.stop(0)
        await edge2.close()


async def test_node_client_reports_kvcdns_status_codes(network: Network) -> None:
    rc, _, err = await _node("--edges", network.edge_address, "--doc", "never-published")
    assert rc == 1 and "NOT_FOUND" in err and "never-published" in err
    rc, _, err = await _node("--edges", network.edge_address)
    assert rc == 2 and "--doc" in err
