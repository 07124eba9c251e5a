"""Edges join and leave while agents fetch: edges and clients follow a list file (`@PATH`, as a
Kubernetes ConfigMap is mounted), no fetch fails, and only the blocks whose owners changed travel,
from edge to edge rather than again from the origin."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import torch

from kvcdn.client import ClientConfig, KVClient
from kvcdn.edge import EdgeConfig, start_edge
from kvcdn.edge.edge import Edge
from kvcdn.edge.peers import HANDOFF_S
from kvcdn.model import adapter
from kvcdn.model.loading import LoadedModel
from kvcdn.model.prompt import document_ids
from kvcdn.ops.launcher import free_ports
from kvcdn.wire.rpc import Server
from tests.conftest import SAMPLES, memory_tier, start_network, stop_network

REFRESH_S = 0.05


async def _until(condition: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(REFRESH_S)


async def test_edges_join_and_leave_while_agents_fetch_and_only_moved_blocks_travel(
    llama: LoadedModel, tmp_path: Path
) -> None:
    net = await start_network(llama, tmp_path / "store")
    listed = tmp_path / "edges"
    addresses = [f"127.0.0.1:{port}" for port in free_ports("127.0.0.1", 5)]
    listed.write_text("\n".join(addresses[:4]) + "\n")
    edges: dict[str, tuple[Edge, Server]] = {}

    async def start(address: str) -> None:
        edges[address] = await start_edge(
            EdgeConfig(
                origin=net.origin_server.address,
                listen=address,
                peers=(f"@{listed}",),
                membership_refresh_s=REFRESH_S,
            )
        )

    texts = [(SAMPLES / name).read_text()[:2500] for name in ("apache-2.0.txt", "gpl-3.0.txt", "mpl-2.0.txt")]
    docs = [document_ids(llama.tokenizer, text) for text in texts]
    references = [adapter.prefill(llama.model, doc) for doc in docs]
    keys = [b.key for i, text in enumerate(texts) for b in (await net.origin.publish(f"doc{i}", text)).manifest.blocks]
    failures: list[BaseException] = []
    fetches = 0
    stop = asyncio.Event()
    agents: list[asyncio.Task[None]] = []
    clients = [KVClient(ClientConfig((f"@{listed}",), membership_refresh_s=REFRESH_S)) for _ in range(3)]

    async def agent(client: KVClient, first: int) -> None:
        nonlocal fetches
        i = first
        while not stop.is_set():
            try:
                fetched = await client.fetch(llama, docs[i % len(docs)])
                for (k, v), (rk, rv) in zip(fetched.layers, references[i % len(docs)], strict=True):
                    assert torch.equal(k, rk) and torch.equal(v, rv)
                fetches += 1
            except Exception as exc:  # any failed fetch fails the test
                failures.append(exc)
            i += 1

    def origin_sends() -> int:
        return sum(edge.origin_fetches for edge, _ in edges.values())

    def everyone_sees(ring: list[str]) -> bool:
        return all(
            edge.peers is not None and edge.peers.ring.nodes == sorted(ring) for edge, _ in edges.values()
        ) and all(client.placement.nodes == sorted(ring) for client in clients)

    try:
        for address in addresses[:4]:
            await start(address)
        agents = [asyncio.create_task(agent(client, i)) for i, client in enumerate(clients)]
        await _until(lambda: fetches >= 6, "every document was fetched twice")
        assert origin_sends() == len(keys)  # each block crossed from the origin once, to its primary

        # An edge joins: its share of the blocks comes from their previous owners, none from the origin.
        await start(addresses[4])
        listed.write_text("\n".join(addresses) + "\n")
        await _until(lambda: everyone_sees(addresses), "edges and agents follow the edge that joined")
        before = fetches
        await _until(lambda: fetches >= before + 6, "agents fetched every document again")
        joined, ring = edges[addresses[4]][0], clients[0].placement
        assert joined.peers is not None and joined.peers.membership.changes == 1  # listed after it started
        held = {k for k in keys if k in memory_tier(joined)}
        assert held and held <= {k for k in keys if addresses[4] in ring.owners(k)}  # only blocks it owns
        assert origin_sends() == len(keys)  # moved edge to edge
        assert joined.peer_fetches >= len({k for k in keys if ring.owners(k)[0] == addresses[4]} & held)
        primary = next(k for k in keys if ring.owners(k)[0] == addresses[4])
        before_ring = joined.peers.membership.previous
        assert before_ring is not None  # it started on the list of 4
        old_owners = before_ring.owners(primary)
        assert joined.peers.sources(primary) == [a for a in old_owners if a not in joined.peers.suspects]
        joined.peers.membership.changed_at -= HANDOFF_S  # long after the change: from the origin again
        assert joined.peers.sources(primary) == []

        # An edge leaves: listed out first, stopped once everyone has moved on; its blocks go elsewhere.
        leaving = addresses[0]
        listed.write_text("\n".join(addresses[1:]) + "\n")
        await _until(lambda: everyone_sees(addresses[1:]), "edges and agents follow the edge that left")
        edge, server = edges.pop(leaving)
        owned_by_leaving = {k for k in keys if leaving in ring.owners(k)}
        await server.stop(0)
        await edge.close()
        sent = origin_sends()
        before = fetches
        await _until(lambda: fetches >= before + 6, "agents fetched every document again")
        assert origin_sends() - sent <= len(owned_by_leaving)  # at most the blocks that lost an owner
    finally:
        stop.set()
        await asyncio.gather(*agents, return_exceptions=True)
        for client in clients:
            await client.close()
        for edge, server in edges.values():
            await server.stop(0)
            await edge.close()
        await stop_network(net)
    assert not failures, f"{len(failures)} of {fetches + len(failures)} fetches failed: {failures[:3]}"
    assert fetches >= 18
