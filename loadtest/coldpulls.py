"""`kvcdn loadtest network`, part 4: cold pulls. An agent fetches a document no edge holds through an
edge that loads it from the origin over gRPC (`kvcdn edge --grpc-pulls`), through one that loads it
over the origin's bulk port (the default), and straight from the origin (the floor no edge load is
in the way of), each on its own copy of the document, side by side in one run."""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from kvcdn.client.api import KVClient
from kvcdn.loadtest.baseline import cpu_seconds
from kvcdn.loadtest.bench import sample_corpus, text_of_length
from kvcdn.loadtest.bench_report import figures_table
from kvcdn.model.loading import LoadedModel
from kvcdn.model.options import ModelOptions
from kvcdn.model.prompt import document_ids
from kvcdn.ops.launcher import Cluster
from kvcdn.wire.stub import CacheReader

__all__ = ["PULL_PATHS", "PullResult", "cold_pulls", "pulls_part"]


@dataclass(frozen=True)
class PullResult:
    tokens: int
    cache_mb: float
    fetch_s: dict[str, list[float]]
    """Cold fetch seconds, one a document (the warm-up documents not counted), by path: "grpc" through
    the edge that loads over gRPC, "bulk" through the one that loads over the origin's bulk port,
    "origin" straight from the origin (what no edge load is in the way of)."""
    edge_cpu_s: dict[str, list[float]]
    """CPU seconds the edge process spent on each of those fetches ("grpc", "bulk")."""
    exact: bool


PULL_PATHS = ("grpc", "bulk", "origin")
WARM_UP = 2
"""Documents fetched before the counted ones: the first connections and allocations, and the edges'
memory tiers (1.5 documents) filled, so the counted fetches reuse evicted memory as a serving edge does."""


async def cold_pulls(
    model: LoadedModel, addresses: dict[str, str], edge_pids: dict[str, int], tokens: int, repeats: int
) -> PullResult:
    """`repeats` documents of `tokens` tokens (after WARM_UP documents, not counted), each published
    and then fetched once along each path of `addresses` (PULL_PATHS: an edge cold for it, or the
    origin; the order rotates), raw: an edge's fetch waits on its loads from the origin, which run
    ahead of the stream (cut-through). `edge_pids`: the edge processes whose CPU each fetch costs."""
    fetch_s: dict[str, list[float]] = {path: [] for path in addresses}
    edge_cpu_s: dict[str, list[float]] = {path: [] for path in edge_pids}
    exact = True
    cache_mb = 0.0
    for i in range(WARM_UP + repeats):
        text = text_of_length(model, f"Cold pull {i} {time.time_ns()}.\n\n" + sample_corpus(), tokens)
        async with CacheReader(addresses["origin"]) as reader:
            await reader.publish(f"pull-{i}-{time.time_ns()}", text)
        ids = document_ids(model.tokenizer, text)
        paths = list(addresses)
        for path in paths[i % len(paths) :] + paths[: i % len(paths)]:
            cpu_before = cpu_seconds([edge_pids[path]]) if path in edge_pids else 0.0
            async with KVClient([addresses[path]]) as client:
                fetched = await client.fetch(model, ids, ("raw",))
            exact &= fetched.cached_tokens == len(ids)
            cache_mb = fetched.n_bytes / 1e6
            if i < WARM_UP:
                continue
            fetch_s[path].append(fetched.fetch_s)
            if path in edge_pids:
                edge_cpu_s[path].append(cpu_seconds([edge_pids[path]]) - cpu_before)
    return PullResult(tokens, cache_mb, fetch_s, edge_cpu_s, exact)


def pulls_part(
    tokens: int,
    repeats: int,
    markdown: bool,
    model: LoadedModel,
    options: ModelOptions,
    root: Path,
    console: Console,
    out: list[Any],
) -> bool:
    """Part 4: cold fetches through an edge that loads over gRPC, one that loads over bulk, and from
    the origin itself. The edges run as in steady state: a memory tier of 1.5 documents, so every new
    document evicts the last one and reuses its memory instead of faulting in fresh pages (which, on
    a small VM, costs a growing edge more than its loads do: docs/measurements.md)."""
    mem = int(1.5 * tokens * model.geometry.token_bytes)
    with console.status(f"cold pulls: {repeats} documents of {tokens} tokens, two edges ..."):
        cluster = Cluster(
            store_dir=root / "store-pulls",
            edges=2,
            origin_args=options.flags(),
            peers=False,
            edge_args=["--mem-bytes", str(mem)],
            edge_args_by_index={0: ["--grpc-pulls"]},
        ).start()
        try:
            grpc_edge, bulk_edge = cluster.edge_addresses
            addresses = {"grpc": grpc_edge, "bulk": bulk_edge, "origin": cluster.origin_address}
            pids = {"grpc": cluster.process("edge0").pid, "bulk": cluster.process("edge1").pid}
            r = asyncio.run(cold_pulls(model, addresses, pids, tokens, repeats))
        finally:
            cluster.stop()
    median = {path: statistics.median(times) for path, times in r.fetch_s.items()}
    cpu = {path: statistics.median(times) for path, times in r.edge_cpu_s.items()}
    ratio = median["grpc"] / median["bulk"]
    names = {
        "grpc": "edge loads over gRPC (`--grpc-pulls`)",
        "bulk": "edge loads over the origin's bulk port (default)",
        "origin": "straight from the origin (no edge)",
    }
    rows = [(f"{names[p]}: cold fetch s", ", ".join(f"{t:.3f}" for t in r.fetch_s[p])) for p in PULL_PATHS]
    rows += [
        (
            "median gRPC / median bulk",
            f"{median['grpc']:.3f} / {median['bulk']:.3f} s = {ratio:.2f}x",
        ),
        ("median from the origin", f"{median['origin']:.3f} s"),
        ("edge CPU s a fetch, median gRPC / bulk", f"{cpu['grpc']:.3f} / {cpu['bulk']:.3f}"),
        ("caches complete", "yes" if r.exact else "NO"),
    ]
    title = (
        f"4. cold pulls: {r.tokens:,}-token documents ({r.cache_mb:.1f} MB raw), each cold at the edge, "
        f"edges' memory tier {mem / 1e6:.0f} MB (1.5 documents)"
    )
    out.append(figures_table(title, rows, markdown))
    return r.exact
