"""Edges that know the ring: a block an edge does not own comes from its owners (resuming on the
next source if one fails), owners and peer-asked edges go to the origin only, and the origin sends
each block once however many edges are asked for it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from kvcdn.client import KVClient
from kvcdn.edge import EdgeConfig, start_edge
from kvcdn.edge.edge import Edge
from kvcdn.errors import InvalidArgument
from kvcdn.model import adapter
from kvcdn.model.loading import LoadedModel
from kvcdn.model.prompt import document_ids
from kvcdn.ops.launcher import free_ports
from kvcdn.spec.placement import Placement
from kvcdn.wire.rpc import Server
from kvcdn.wire.stub import CacheReader
from tests.conftest import SAMPLES, start_network, stop_network

Edges = dict[str, Edge]


@asynccontextmanager
async def peered_edges(
    origin: str, n: int = 3, peer_timeout_s: float = 1.0, metrics: bool = False
) -> AsyncIterator[tuple[Edges, Placement, dict[str, Server]]]:
    """n edges in front of `origin` that know their ring (`--peers`); stopped on exit."""
    addresses = [f"127.0.0.1:{port}" for port in free_ports("127.0.0.1", n)]
    started = [
        await start_edge(
            EdgeConfig(
                origin=origin,
                listen=a,
                peers=tuple(addresses),
                peer_timeout_s=peer_timeout_s,
                metrics_port=0 if metrics else -1,
            )
        )
        for a in addresses
    ]
    edges = {server.address: edge for edge, server in started}
    ring = Placement(addresses)
    assert all(edge.peers is not None and edge.peers.ring.nodes == ring.nodes for edge in edges.values())
    try:
        yield edges, ring, {server.address: server for _, server in started}
    finally:
        for edge, server in started:
            await server.stop(0)
            await edge.close()


async def test_edges_load_blocks_they_do_not_own_from_the_owners(llama: LoadedModel, tmp_path: Path) -> None:
    net = await start_network(llama, tmp_path / "store")
    try:
        async with peered_edges(net.origin_server.address) as (edges, ring, _servers):
            text = (SAMPLES / "apache-2.0.txt").read_text()[:3000]
            manifest = (await net.origin.publish("apache", text)).manifest
            doc = document_ids(llama.tokenizer, text)
            reference = adapter.prefill(llama.model, doc)
            keys = [b.key for b in manifest.blocks]
            x, y = list(edges)[:2]

            # An agent that knows only edge x: x serves everything, loading what it does not own from owners.
            async with KVClient([x]) as client:
                fetched = await client.fetch(llama, doc)
            for (k, v), (rk, rv) in zip(fetched.layers, reference, strict=True):
                assert torch.equal(k, rk) and torch.equal(v, rv)
            primary_elsewhere = [k for k in keys if ring.owners(k)[0] != x]
            assert any(x not in ring.owners(k) for k in keys), "the test document should have blocks x does not own"
            assert any(x == ring.owners(k)[1] for k in keys), "... and blocks x holds as a replica"
            assert edges[x].peer_fetches == len(primary_elsewhere)
            assert edges[x].origin_fetches == len(keys) - len(primary_elsewhere)
            # each block crossed from the origin once, to its primary owner
            for address, edge in edges.items():
                assert edge.origin_fetches == sum(ring.owners(k)[0] == address for k in keys)
                if address != x:
                    assert edge.peer_fetches == 0

            # Another edge asked for the same document: owners are warm now, the origin sends nothing more.
            async with KVClient([y]) as client:
                assert (await client.fetch(llama, doc)).cached_tokens == len(doc)
            assert sum(e.origin_fetches for e in edges.values()) == len(keys)
    finally:
        await stop_network(net)


def _origin_rpcs(server: Server) -> dict[str, float]:
    """RPCs the origin has started, by method (the edges' invalidation feed aside)."""
    return {
        s.labels["grpc_method"]: s.value
        for metric in server.metrics.registry.collect()
        if metric.name == "grpc_server_started"
        for s in metric.samples
        if s.name.endswith("_total") and s.labels["grpc_method"] != "Watch"
    }


async def test_warm_fetches_from_any_edge_cost_the_origin_nothing(llama: LoadedModel, tmp_path: Path) -> None:
    net = await start_network(llama, tmp_path / "store", metrics=True, codecs=("lossless",))
    try:
        async with peered_edges(net.origin_server.address) as (edges, ring, _servers):
            text = (SAMPLES / "gpl-3.0.txt").read_text()[:3000]
            manifest = (await net.origin.publish("gpl3", text)).manifest
            doc = document_ids(llama.tokenizer, text)
            keys = [b.key for b in manifest.blocks]
            assert len({ring.owners(k)[0] for k in keys}) > 1, "the document's blocks should spread over edges"
            async with KVClient(list(edges)) as client:  # cold: the owners pull every block once
                cold = await client.fetch(llama, doc)
            for edge in edges.values():
                await edge.settle()
            before = _origin_rpcs(net.origin_server)
            pulls = sum(e.origin_fetches for e in edges.values())

            # Agents that know the whole ring, and agents that know one edge each: every lookup is
            # answered by an edge's tiers and its peers' (from_peer lookups), every block by its owner.
            for known in [list(edges), *([address] for address in edges)]:
                async with KVClient(known) as client:
                    warm = await client.fetch(llama, doc)
                assert warm.cached_tokens == len(doc) and warm.codec == "lossless"
                for (k, v), (ck, cv) in zip(warm.layers, cold.layers, strict=True):
                    assert torch.equal(k, ck) and torch.equal(v, cv)
            assert _origin_rpcs(net.origin_server) == before
            assert sum(e.origin_fetches for e in edges.values()) == pulls
    finally:
        await stop_network(net)


async def test_a_warm_lookup_asks_no_peer_and_a_purge_ends_that(llama: LoadedModel, tmp_path: Path) -> None:
    """An edge answers a lookup from the infos it was told by an earlier one (its peers' or the
    origin's) without asking its peers again, and a purge drops them: the next lookup asks afresh."""
    net = await start_network(llama, tmp_path / "store")
    try:
        async with peered_edges(net.origin_server.address) as (edges, ring, _servers):
            text = (SAMPLES / "gpl-3.0.txt").read_text()[:3000]
            keys = [b.key for b in (await net.origin.publish("gpl3", text)).manifest.blocks]
            doc = document_ids(llama.tokenizer, text)
            asked: list[str] = []  # peers asked which blocks they hold (from_peer lookups)
            for address, edge in edges.items():

                async def counting(*args: Any, _lookup: Any = edge.lookup, _at: str = address, **kw: Any) -> Any:
                    asked.extend([_at] if kw.get("from_peer") else [])
                    return await _lookup(*args, **kw)

                edge.lookup = counting  # type: ignore[method-assign]
            x = ring.route(keys[0])[0]  # where the agent looks up; the blocks stream from their owners
            assert any(x not in ring.owners(k) for k in keys), "the document should have blocks x does not hold"
            async with KVClient(list(edges)) as client:
                assert (await client.fetch(llama, doc)).cached_tokens == len(doc)  # cold: x asks around
                for edge in edges.values():
                    await edge.settle()
                cold = len(asked)
                assert cold > 0
                assert (await client.fetch(llama, doc)).cached_tokens == len(doc)
                assert len(asked) == cold  # warm: x knew every block's info
                async with CacheReader(net.origin_server.address) as origin:
                    purged = await origin.purge("gpl3")
                for _ in range(500):  # the purge reaches x through its feed
                    if edges[x].invalidated_seq >= purged.seq:
                        break
                    await asyncio.sleep(0.02)
                assert (await client.fetch(llama, doc)).cached_tokens == 0
    finally:
        await stop_network(net)


async def test_owners_down_fall_back_to_the_origin_and_peer_requests_never_forward(
    llama: LoadedModel, tmp_path: Path
) -> None:
    net = await start_network(llama, tmp_path / "store")
    try:
        async with peered_edges(net.origin_server.address) as (edges, ring, servers):
            text = (SAMPLES / "mpl-2.0.txt").read_text()[:3000]
            manifest = (await net.origin.publish("mpl", text)).manifest
            x = next(iter(edges))
            foreign = [b.key for b in manifest.blocks if x not in ring.owners(b.key)]
            assert len(foreign) >= 2

            # A peer's request at a non-owner goes to the origin, not around the ring.
            frames = [f async for f in edges[x].stream(llama.fingerprint_hex, foreign[:1], 0, from_peer=True)]
            assert frames and edges[x].origin_fetches == 1 and edges[x].peer_fetches == 0

            # With every owner of a block down, x loads it from the origin.
            for address, server in servers.items():
                if address != x:
                    await server.stop(0)
            frames = [f async for f in edges[x].stream(llama.fingerprint_hex, foreign[1:2], 0)]
            assert frames and edges[x].origin_fetches == 2 and edges[x].peer_fetches == 0
    finally:
        await stop_network(net)


async def test_a_peer_list_without_this_edge_is_refused(llama: LoadedModel, tmp_path: Path) -> None:
    net = await start_network(llama, tmp_path / "store")
    try:
        config = EdgeConfig(origin=net.origin_server.address, listen="127.0.0.1:0", peers=("10.9.9.9:7080",))
        with pytest.raises(InvalidArgument, match="does not name this edge"):
            await start_edge(config)
        with pytest.raises(InvalidArgument):
            EdgeConfig(origin="o:1", peers=("not an address",))
    finally:
        await stop_network(net)


async def test_a_stalled_owner_is_skipped_after_the_peer_timeout(llama: LoadedModel, tmp_path: Path) -> None:
    net = await start_network(llama, tmp_path / "store")
    never = asyncio.Event()

    async def stalls(*_: object, **__: object) -> AsyncIterator[bytes]:
        await never.wait()
        yield b""

    try:
        async with peered_edges(net.origin_server.address, peer_timeout_s=0.2) as (edges, ring, _servers):
            text = (SAMPLES / "gpl-2.0.txt").read_text()[:3000]
            manifest = (await net.origin.publish("gpl2", text)).manifest
            x = next(iter(edges))
            foreign = [b.key for b in manifest.blocks if x not in ring.owners(b.key)]
            for address, edge in edges.items():
                if address != x:
                    edge.stream = stalls  # type: ignore[method-assign]
            frames = [f async for f in edges[x].stream(llama.fingerprint_hex, foreign[:2], 0)]
            assert len(frames) == sum(len(b.frame_digests) for b in manifest.blocks if b.key in foreign[:2])
            assert edges[x].origin_fetches == 2 and edges[x].peer_fetches == 0
            # the owners were tried once, then skipped for the next block (no second wait)
            assert edges[x].peers is not None
            assert set(edges[x].peers.suspects.current()) == set(ring.owners(foreign[0]))
    finally:
        never.set()
        await stop_network(net)
