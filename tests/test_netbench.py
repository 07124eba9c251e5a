"""The edge network benchmark's parts on a tiny in-process network (figures are printed by the
command, never asserted as timings here)."""

from __future__ import annotations

import os
from pathlib import Path

from kvcdn.loadtest.network import cold_herd, edge_memory, rss_mb
from kvcdn.model.loading import LoadedModel
from kvcdn.ops.launcher import Cluster
from kvcdn.ops.stats import edge_stats
from tests.conftest import start_network, stop_network, tiny_llama
from tests.test_peers import peered_edges


async def test_cold_herd_counts_one_origin_transfer_per_block_and_no_origin_rpc_when_warm(
    llama: LoadedModel, tmp_path: Path
) -> None:
    net = await start_network(llama, tmp_path / "store", metrics=True)
    try:
        async with peered_edges(net.origin_server.address, n=2, metrics=True) as (edges, _ring, _servers):
            herd = await cold_herd(llama, net.origin_server.address, list(edges), 30, 100)
        assert herd.ok == 30 and herd.tokens == 100 and herd.blocks == 4
        assert herd.origin_pulls == herd.blocks == sum(herd.pulls_per_edge)
        # payload bytes to the agents, exactly; between the edges, what replicas loaded from primaries:
        # each block once at most (the blocks the agents were given from a replica; which: by the ring)
        to_agents = herd.gb_served - herd.gb_between_edges
        assert round(to_agents * 1e9) == 30 * 100 * llama.geometry.token_bytes
        assert 0 <= herd.gb_between_edges * 1e9 <= herd.cache_mb * 1e6
        assert herd.warm_ok == 30 and herd.warm_origin_rpcs == 0
    finally:
        await stop_network(net)


async def test_edge_memory_samples_the_edge_process_while_it_streams_an_object_larger_than_its_tier(
    tiny_dirs: dict[str, Path], tmp_path: Path
) -> None:
    model, args = tiny_llama(tiny_dirs)
    mem = 1 << 20
    cluster = Cluster(store_dir=tmp_path / "store", edges=1, origin_args=args, edge_args=["--mem-bytes", str(mem)])
    with cluster:
        edge_pid = cluster.process("edge0").pid
        r = await edge_memory(model, cluster.origin_address, cluster.edge_addresses[0], edge_pid, mem, 16)
        [stats] = await edge_stats(cluster.edge_addresses)
        edge_now_mb = rss_mb(edge_pid)
    assert r.exact and abs(r.object_mb - 16 * r.memory_tier_mb) < 0.05 * r.memory_tier_mb
    assert r.samples >= 2 and 0 < r.rss_before_mb <= r.rss_peak_mb
    # the samples are the edge's: near what that process holds now, far from this one (which holds
    # torch and the model: hundreds of MiB more than an edge)
    assert abs(r.rss_after_mb - edge_now_mb) < r.object_mb < rss_mb(os.getpid()) - r.rss_peak_mb
    # The edge process, not this one, was sampled: it streamed the object through its tier, which kept
    # its budget, and it grew by less than the object (measured: ~5 MiB for this 16 MiB object).
    assert stats.up and stats.memory_bytes <= mem < stats.bytes_from_origin
    assert r.rss_peak_mb - r.rss_before_mb < r.object_mb
