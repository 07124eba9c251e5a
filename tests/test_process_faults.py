"""Faults with real processes: an edge process that stalls is skipped and the stream resumes on the
next replica; the rebuilt cache is byte-identical to a local prefill."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import torch

from kvcdn import adapter
from kvcdn.client import CacheReader, ClientConfig, KVClient
from kvcdn.launcher import Cluster
from kvcdn.models import LoadedModel
from kvcdn.prompt import document_ids
from tests.conftest import SAMPLES


async def test_a_stalled_edge_process_is_skipped_and_the_cache_is_exact(
    tiny_dirs: dict[str, Path], tmp_path: Path
) -> None:
    from kvcdn.models import load_model

    model: LoadedModel = load_model(str(tiny_dirs["llama"]), dtype="float32", device="cpu")
    text = (SAMPLES / "mpl-2.0.txt").read_text()[:4000]
    doc = document_ids(model.tokenizer, text)
    args = ["--model", str(tiny_dirs["llama"]), "--dtype", "float32", "--device", "cpu"]
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
