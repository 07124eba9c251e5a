"""`kvcdn loadtest network`: the edge network's benchmark, on real processes (`kvcdn up`'s launcher).

Four parts, each printed as a table:
1. cold herd: many agents fetch one document nobody has fetched yet, all at once, through 3 edges;
   the edges' metrics count the origin transfers (each block should cross once, to its owner) and
   every agent's cache is verified frame by frame;
2. Zipf tiers: a Zipf workload over more documents than the edges' tiers hold; hit ratio per tier
   (memory, disk, origin, joined an in-flight load) from the edges' metrics;
3. edge memory: the resident memory of a fresh edge while it streams, cold, a document 2x and then
   (another fresh edge) 4x the size of its memory tier: the growth should not follow the object;
4. cold pulls (kvcdn.loadtest.coldpulls): a document fetched through an edge that has none of it,
   whose loads from the origin travel over the origin's bulk port (the default) or over gRPC
   (`kvcdn edge --grpc-pulls`), and straight from the origin, side by side on one origin.
"""

from __future__ import annotations

import asyncio
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rich.console import Console

from kvcdn.client.api import KVClient
from kvcdn.errors import InvalidArgument
from kvcdn.loadtest.bench import sample_corpus, text_of_length
from kvcdn.loadtest.bench_report import figures_table
from kvcdn.loadtest.coldpulls import pulls_part
from kvcdn.loadtest.run import LoadConfig, publish_corpus, run_load, summarize
from kvcdn.model.loading import LoadedModel
from kvcdn.model.options import ModelOptions
from kvcdn.model.prompt import document_ids
from kvcdn.ops.launcher import Cluster
from kvcdn.ops.stats import EdgeStats, edge_stats, metrics_url, rpcs_started
from kvcdn.spec.placement import DEFAULT_REPLICAS
from kvcdn.wire.stub import CacheReader

__all__ = ["cold_herd", "edge_memory", "run_network_bench", "zipf_tiers"]

PARTS = ("herd", "zipf", "memory", "pulls")
"""The benchmark's parts, in the order they run (`--parts`)."""

MiB = 1 << 20


def _total(stats: list[EdgeStats], name: str) -> float:
    return sum(float(getattr(s, name)) for s in stats)


@dataclass(frozen=True)
class HerdResult:
    agents: int
    tokens: int
    blocks: int
    cache_mb: float
    ok: int
    origin_pulls: float
    pulls_per_edge: list[float]
    wall_s: float
    gb_served: float
    """Payload bytes the edges sent, to the agents and to each other."""
    gb_between_edges: float
    """Of those, what edges loaded from each other (a replica from a block's primary)."""
    warm_ok: int
    """Agents whose second (warm) fetch was complete."""
    warm_origin_rpcs: float
    """RPCs the origin started during the warm pass (the goal: none)."""


async def cold_herd(model: LoadedModel, origin: str, edges: list[str], agents: int, tokens: int) -> HerdResult:
    """`agents` concurrent fetches of one freshly published document (one client each), then the same
    again warm, counting the origin's RPCs during the warm pass."""
    text = text_of_length(model, f"Cold herd document {time.time_ns()}.\n\n" + sample_corpus(), tokens)
    async with CacheReader(origin) as reader:
        manifest = (await reader.publish(f"herd-{time.time_ns()}", text)).manifest
    ids = document_ids(model.tokenizer, text)
    before = await edge_stats(edges)
    clients = [KVClient(edges) for _ in range(agents)]
    try:
        t0 = time.perf_counter()
        fetched = await asyncio.gather(*(c.fetch(model, ids) for c in clients), return_exceptions=True)
        wall_s = time.perf_counter() - t0
        after = await edge_stats(edges)
        origin_metrics = await metrics_url(origin)
        origin_before = await rpcs_started(origin_metrics)
        warm = await asyncio.gather(*(c.fetch(model, ids) for c in clients), return_exceptions=True)
        warm_origin_rpcs = await rpcs_started(origin_metrics) - origin_before
    finally:
        for c in clients:
            await c.close()
    ok = [f for f in fetched if not isinstance(f, BaseException) and f.cached_tokens == len(ids)]
    warm_ok = [f for f in warm if not isinstance(f, BaseException) and f.cached_tokens == len(ids)]
    pulls = [a.origin_fetches - b.origin_fetches for a, b in zip(after, before, strict=True)]
    return HerdResult(
        agents=agents,
        tokens=len(ids),
        blocks=len(manifest.blocks),
        cache_mb=sum(b.n_bytes for b in manifest.blocks) / 1e6,
        ok=len(ok),
        origin_pulls=sum(pulls),
        pulls_per_edge=pulls,
        wall_s=wall_s,
        gb_served=(_total(after, "bytes_served") - _total(before, "bytes_served")) / 1e9,
        gb_between_edges=(_total(after, "bytes_from_peers") - _total(before, "bytes_from_peers")) / 1e9,
        warm_ok=len(warm_ok),
        warm_origin_rpcs=warm_origin_rpcs,
    )


async def zipf_tiers(model: LoadedModel, config: LoadConfig) -> dict[str, Any]:
    ids = await publish_corpus(model, config)
    return summarize(await run_load(model, config, ids))


@dataclass(frozen=True)
class MemoryResult:
    object_mb: float
    memory_tier_mb: float
    rss_before_mb: float
    rss_peak_mb: float
    """Largest of the edge's RSS samples taken while the fetch ran."""
    rss_after_mb: float
    samples: int
    """RSS samples taken while the fetch ran (at least one, the last after it ended)."""
    fetch_s: float
    exact: bool


def rss_mb(pid: int) -> float:
    """Resident memory of process `pid`, MiB (FileNotFoundError when there is no such process)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise FileNotFoundError(f"process {pid} reports no resident memory (a zombie?)")


async def edge_memory(
    model: LoadedModel, origin: str, edge: str, edge_pid: int, mem_bytes: int, factor: int
) -> MemoryResult:
    """Stream, cold, a document `factor` times the edge's memory tier while sampling the RSS of the
    edge process `edge_pid` (raw: the object's size on the wire is its computed size)."""
    tokens = factor * mem_bytes // model.geometry.token_bytes
    text = text_of_length(model, f"Big document {time.time_ns()}.\n\n" + sample_corpus() * 4, tokens)
    async with CacheReader(origin) as reader:
        await reader.publish(f"big-{time.time_ns()}", text)
    ids = document_ids(model.tokenizer, text)
    before = rss_mb(edge_pid)
    samples: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        while True:
            samples.append(rss_mb(edge_pid))
            if stop.wait(0.02):
                samples.append(rss_mb(edge_pid))
                return

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        async with KVClient([edge]) as client:
            fetched = await client.fetch(model, ids, ("raw",))
    finally:
        stop.set()
        sampler.join()
    return MemoryResult(
        object_mb=fetched.n_bytes / MiB,
        memory_tier_mb=mem_bytes / MiB,
        rss_before_mb=before,
        rss_peak_mb=max(samples),
        rss_after_mb=rss_mb(edge_pid),
        samples=len(samples),
        fetch_s=fetched.fetch_s,
        exact=fetched.cached_tokens == len(ids),
    )


@dataclass(frozen=True)
class NetworkBenchConfig:
    """What `kvcdn loadtest network` runs: a cold herd, a Zipf workload over small tiers, and the edge's
    memory while it streams objects larger than its memory tier."""

    agents: int = 200
    """Agents in the cold herd."""
    herd_tokens: int = 512
    """Length of the cold herd's document."""
    zipf: LoadConfig = field(
        default_factory=lambda: LoadConfig(
            edges=(), origin="", agents=16, documents=24, zipf_s=1.1, min_tokens=256, max_tokens=1024, duration_s=20.0
        )
    )
    """The Zipf part (its edges and origin are filled in once the network is up)."""
    mem_bytes: int = 64 << 20
    """Each edge's memory tier."""
    disk_bytes: int = 192 << 20
    """Each edge's disk tier."""
    markdown: bool = False
    parts: tuple[str, ...] = PARTS
    """Which parts to run (PARTS)."""
    pull_tokens: int = 3774
    """Length of the cold-pull part's documents."""
    pull_repeats: int = 5
    """Documents of the cold-pull part (each fetched cold once along each path), after two warm-up ones."""

    def __post_init__(self) -> None:
        if self.agents < 1 or self.herd_tokens < 1:
            raise InvalidArgument("--agents and --herd-tokens must be at least 1")
        if not self.parts or set(self.parts) - set(PARTS):
            raise InvalidArgument(f"--parts takes a comma list of {', '.join(PARTS)}")
        if self.pull_tokens < 1 or self.pull_repeats < 1:
            raise InvalidArgument("--pull-tokens and --pull-repeats must be at least 1")


def run_network_bench(config: NetworkBenchConfig, model: LoadedModel, options: ModelOptions) -> int:
    """`kvcdn loadtest network`: `model` (loaded from `options`) is the agents'; the origin loads the same."""
    console = Console(width=None if Console().is_terminal else 160)
    out: list[Any] = []
    ok = True
    with tempfile.TemporaryDirectory(prefix="kvcdn-netbench-") as tmp:
        root = Path(tmp)
        if {"herd", "zipf"} & set(config.parts):
            ok &= _network_parts(config, model, options, root, console, out)
        if "memory" in config.parts:
            ok &= _memory_part(config, model, options, root, console, out)
        if "pulls" in config.parts:
            ok &= pulls_part(
                config.pull_tokens, config.pull_repeats, config.markdown, model, options, root, console, out
            )
    for part in out:
        if isinstance(part, str):
            print(part + "\n")
        else:
            console.print(part)
    return 0 if ok else 1


def _network_parts(
    config: NetworkBenchConfig, model: LoadedModel, options: ModelOptions, root: Path, console: Console, out: list[Any]
) -> bool:
    """Parts 1 and 2 (those of `config.parts`) on an origin and 3 edges with small tiers."""
    ok = True
    mem, disk = config.mem_bytes, config.disk_bytes
    with console.status("starting an origin and 3 edges with small tiers ..."):
        cluster = Cluster(
            store_dir=root / "store",
            edges=3,
            origin_args=options.flags(),
            edge_args=["--mem-bytes", str(mem), "--disk-bytes", str(disk)],
            edge_disk_root=root / "disk",
        ).start()
    try:
        if "herd" in config.parts:
            with console.status(f"cold herd: {config.agents} agents, one document ..."):
                herd = asyncio.run(
                    cold_herd(model, cluster.origin_address, cluster.edge_addresses, config.agents, config.herd_tokens)
                )
            ok &= herd.ok == herd.agents and herd.origin_pulls <= DEFAULT_REPLICAS * herd.blocks
            ok &= herd.warm_ok == herd.agents and herd.warm_origin_rpcs == 0
            out.append(
                figures_table(
                    f"1. cold herd: {herd.agents} concurrent agents, one cold document, 3 edges",
                    [
                        ("document", f"{herd.tokens} tokens, {herd.blocks} blocks, {herd.cache_mb:.1f} MB"),
                        ("caches complete and verified", f"{herd.ok}/{herd.agents}"),
                        ("origin block transfers (edges' metrics)", f"{herd.origin_pulls:.0f}"),
                        ("  per edge", ", ".join(f"{p:.0f}" for p in herd.pulls_per_edge)),
                        ("  allowed: R x blocks", f"{DEFAULT_REPLICAS * herd.blocks}"),
                        (
                            "served by the edges: to agents / to each other",
                            f"{herd.gb_served - herd.gb_between_edges:.2f} / {herd.gb_between_edges:.2f} GB"
                            f" in {herd.wall_s:.1f} s",
                        ),
                        ("warm pass: caches complete", f"{herd.warm_ok}/{herd.agents}"),
                        ("  RPCs the origin answered (goal: 0)", f"{herd.warm_origin_rpcs:.0f}"),
                    ],
                    config.markdown,
                )
            )
        if "zipf" in config.parts:
            zipf = replace(config.zipf, edges=tuple(cluster.edge_addresses), origin=cluster.origin_address)
            doing = f"Zipf: {zipf.documents} documents, {zipf.agents} agents, {zipf.duration_s:.0f} s ..."
            with console.status(doing):
                report = asyncio.run(zipf_tiers(model, zipf))
            corpus_mb = sum(report["document_tokens"]) * model.geometry.token_bytes / 1e6
            e = report["edges"]
            ok &= report["fetches_failed"] == 0
            out.append(
                figures_table(
                    f"2. Zipf (s={zipf.zipf_s}) over {zipf.documents} documents, tiers smaller than the corpus",
                    [
                        (
                            "corpus",
                            f"{corpus_mb:.0f} MB ({corpus_mb * DEFAULT_REPLICAS:.0f} MB with R={DEFAULT_REPLICAS})",
                        ),
                        ("tiers per edge x 3", f"memory {mem / 1e6:.0f} MB, disk {disk / 1e6:.0f} MB"),
                        ("fetches ok / failed", f"{report['fetches_ok']} / {report['fetches_failed']}"),
                        ("block requests from memory", f"{e['memory_hit_ratio']:.1%}"),
                        ("from disk", f"{e['disk_hit_ratio']:.1%}"),
                        ("from a peer edge (owner)", f"{e['peer_ratio']:.1%}"),
                        ("from the origin", f"{e['origin_ratio']:.1%}"),
                        ("joined a load in flight", f"{e['coalesced_ratio']:.1%}"),
                        ("memory evictions", f"{e['evictions']:.0f}"),
                        (
                            "egress edge -> agents / origin -> edges",
                            f"{e['bytes_served'] / 1e9:.2f} / {e['bytes_from_origin'] / 1e9:.2f} GB",
                        ),
                    ],
                    config.markdown,
                )
            )
    finally:
        cluster.stop()
    return ok


def _memory_part(
    config: NetworkBenchConfig, model: LoadedModel, options: ModelOptions, root: Path, console: Console, out: list[Any]
) -> bool:
    """Part 3: a fresh edge's memory while it streams objects 2x and 4x its memory tier."""
    ok = True
    mem, origin_args = config.mem_bytes, options.flags()
    rows = []
    for factor in (2, 4):
        with console.status(f"one fresh edge, streaming a document {factor}x its memory tier ..."):
            single = Cluster(
                store_dir=root / f"store-x{factor}",
                edges=1,
                origin_args=origin_args,
                edge_args=["--mem-bytes", str(mem)],
            ).start()
            try:
                r = asyncio.run(
                    edge_memory(
                        model,
                        single.origin_address,
                        single.edge_addresses[0],
                        single.process("edge0").pid,
                        mem,
                        factor,
                    )
                )
            finally:
                single.stop()
        ok &= r.exact
        rows += [
            (
                f"object {factor}x the tier",
                f"{r.object_mb:.0f} MiB, cold fetch {r.fetch_s:.2f} s, {'exact' if r.exact else 'INCOMPLETE'}",
            ),
            (
                "  edge RSS before / peak / after",
                f"{r.rss_before_mb:.0f} / {r.rss_peak_mb:.0f} / {r.rss_after_mb:.0f} MiB",
            ),
            ("  peak growth", f"{r.rss_peak_mb - r.rss_before_mb:.0f} MiB (tier {r.memory_tier_mb:.0f} MiB)"),
        ]
    out.append(
        figures_table("3. edge memory while streaming objects larger than its memory tier", rows, config.markdown)
    )
    return ok
