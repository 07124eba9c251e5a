"""Faults with real processes: an edge process that stalls is skipped and the stream resumes on the
next replica; the rebuilt cache is byte-identical to a local prefill."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from kvcdn.client import CacheReader, ClientConfig, KVClient
from kvcdn.model import adapter
from kvcdn.model.prompt import document_ids
from kvcdn.ops.launcher import Cluster
from tests.conftest import SAMPLES, disk_tier, tiny_llama


async def test_a_stalled_edge_process_is_skipped_and_the_cache_is_exact(
    tiny_dirs: dict[str, Path], tmp_path: Path
) -> None:
    model, args = tiny_llama(tiny_dirs)
    text = (SAMPLES / "mpl-2.0.txt").read_text()[:4000]
    doc = document_ids(model.tokenizer, text)
    with Cluster(store_dir=tmp_path / "store", edges=2, origin_args=args, start_timeout_s=120) as cluster:
        async with CacheReader(cluster.origin_address) as origin:
            manifest = (await origin.publish("mpl", text)).manifest
        assert len(manifest.blocks) > 1
        config = ClientConfig(tuple(cluster.edge_addresses), timeout_s=2.0, stream_timeout_s=2.0)
        async with KVClient(config) as client:
            primary = client.placement.route(manifest.blocks[0].key)[0]
            stalled = cluster.process(f"edge{cluster.edge_addresses.index(primary)}")
            os.kill(stalled.pid, signal.SIGSTOP)
            try:
                fetched = await client.fetch(model, doc)
            finally:
                os.kill(stalled.pid, signal.SIGCONT)
        assert fetched.cached_tokens == len(doc)
        # The lookup found the primary stalled (one timeout); every stream then went to the replica.
        assert fetched.edges_used == [a for a in cluster.edge_addresses if a != primary]
        for (k, v), (rk, rv) in zip(fetched.layers, adapter.prefill(model.model, doc), strict=True):
            assert torch.equal(k, rk) and torch.equal(v, rv)


async def test_an_edge_killed_during_a_fetch_costs_nothing_but_a_retry(
    tiny_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGKILL of an edge process while a fetch is streaming: the runs it owns come from the replica
    and the cache is byte-identical to a local prefill."""
    from kvcdn.client import api

    model, args = tiny_llama(tiny_dirs)
    text = (SAMPLES / "gpl-3.0.txt").read_text()[:9000]
    doc = document_ids(model.tokenizer, text)
    with Cluster(store_dir=tmp_path / "store", edges=2, origin_args=args, start_timeout_s=120) as cluster:
        async with CacheReader(cluster.origin_address) as origin:
            manifest = (await origin.publish("gpl", text)).manifest
        async with KVClient(ClientConfig(tuple(cluster.edge_addresses), timeout_s=5.0)) as client:
            owners = [client.placement.owners(b.key)[0] for b in manifest.blocks]
            first = owners[0]
            victim = next(a for a in owners if a != first)  # owns a later run of this document
            process = cluster.process(f"edge{cluster.edge_addresses.index(victim)}")
            killed: list[int] = []
            once = threading.Lock()  # the runs stream in parallel, each on a thread of its own

            class KillOnFirstFrame(api.KVAssembler):
                def regions(self, block_start: int, block_tokens: int, offset: int, length: int) -> list[Any]:
                    with once:
                        if not killed:  # the fetch is streaming its first frame: kill the other edge now
                            os.kill(process.pid, signal.SIGKILL)
                            killed.append(process.wait(10))
                    return super().regions(block_start, block_tokens, offset, length)

            monkeypatch.setattr(api, "KVAssembler", KillOnFirstFrame)
            fetched = await client.fetch(model, doc)
        assert killed == [-signal.SIGKILL]
        assert fetched.cached_tokens == len(doc)
        assert victim in fetched.edges_used and first in fetched.edges_used
        for (k, v), (rk, rv) in zip(fetched.layers, adapter.prefill(model.model, doc), strict=True):
            assert torch.equal(k, rk) and torch.equal(v, rv)


async def test_an_edge_killed_while_writing_its_disk_tier_restarts_clean(
    tiny_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """SIGKILL of an edge process while it pulls blocks and writes them to disk, plus the debris such
    a kill can leave (a temporary file, a block file cut short): the restarted edge indexes only
    whole, verified blocks, and serves the document exactly."""
    from kvcdn.edge import EdgeConfig, start_edge

    model, args = tiny_llama(tiny_dirs)
    text = (SAMPLES / "gpl-3.0.txt").read_text()[:9000]
    doc = document_ids(model.tokenizer, text)
    disk_root = tmp_path / "disk"
    with Cluster(
        store_dir=tmp_path / "store", edges=1, origin_args=args, edge_disk_root=disk_root, start_timeout_s=120
    ) as cluster:
        async with CacheReader(cluster.origin_address) as origin:
            manifest = (await origin.publish("gpl", text)).manifest
        edge_process = cluster.process("edge0")
        async with KVClient([cluster.edge_addresses[0]]) as client:
            fetch = asyncio.ensure_future(client.fetch(model, doc))
            blocks_dir = disk_root / "edge0" / "blocks"
            for _ in range(30_000):
                if any(blocks_dir.rglob("*.blk")):
                    break  # the edge has written its first whole block
                await asyncio.sleep(0.002)
            os.kill(edge_process.pid, signal.SIGKILL)
            edge_process.wait(10)
            await asyncio.gather(fetch, return_exceptions=True)
        files = sorted(blocks_dir.rglob("*.blk"))
        assert files, "the edge was killed before it wrote a block: the fault did not happen"
        # what a kill in the middle of a write leaves behind
        (blocks_dir / ".tmp-killed").write_bytes(b"half a block")
        files[0].write_bytes(files[0].read_bytes()[:100])

        edge, server = await start_edge(
            EdgeConfig(origin=cluster.origin_address, listen="127.0.0.1:0", disk_dir=disk_root / "edge0")
        )
        try:
            assert not (blocks_dir / ".tmp-killed").exists()
            held = disk_tier(edge).stats().blocks
            assert held <= len(files) - 1  # the block cut short is not indexed
            for key in disk_tier(edge).held():  # every indexed block reads back verified
                assert await disk_tier(edge).get(key) is not None
            async with KVClient([server.address]) as client:
                fetched = await client.fetch(model, doc)
            assert fetched.cached_tokens == len(doc) and disk_tier(edge).corrupt == 0
            assert edge.origin_fetches == len(manifest.blocks) - held  # what survived is not pulled again
            for (k, v), (rk, rv) in zip(fetched.layers, adapter.prefill(model.model, doc), strict=True):
                assert torch.equal(k, rk) and torch.equal(v, rv)
        finally:
            await server.stop(0)
            await edge.close()
