"""`kvcdn loadtest run`: simulated agents fetch caches of Zipf-popular documents through the edges.

Each agent is an asyncio task that, in a closed loop (or at a target arrival rate shared by all
agents), picks a document by Zipf popularity and fetches its cache through the real client stub
(`KVClient`: ring routing, bulk streams, BLAKE3 verification of every frame, failover). The run stops
by itself at its duration or request bound. Per-tier hit ratios and the origin's and edges' egress
come from the edges' own Prometheus counters, read before and after the run.

The documents are cut from the bundled license texts, so a run is reproducible from its seed; they
are published at the origin first (publishing content that is already stored computes nothing).
"""

from __future__ import annotations

import asyncio
import bisect
import json
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from kvcdn.client import ClientConfig, KVClient
from kvcdn.errors import DigestMismatch, InvalidArgument, KVCDNError
from kvcdn.loadtest.bench import text_of_length
from kvcdn.model.loading import LoadedModel
from kvcdn.model.prompt import document_ids
from kvcdn.ops.stats import EdgeStats, edge_stats
from kvcdn.wire.stub import CacheReader
from kvcdn.wire.tls import TLSFiles

__all__ = ["LoadConfig", "Zipf", "corpus_documents", "publish_corpus", "run_load", "summarize", "write_report"]

log = logging.getLogger(__name__)


class Zipf:
    """Ranks 0..n-1 with P(k) proportional to 1 / (k+1)^s (s = 0: uniform), from a seeded generator."""

    def __init__(self, n: int, s: float, seed: int) -> None:
        if n < 1:
            raise InvalidArgument("a Zipf workload needs at least one document")
        if s < 0:
            raise InvalidArgument("the Zipf exponent must be >= 0 (0: uniform)")
        weights = [1.0 / (k + 1) ** s for k in range(n)]
        total = sum(weights)
        self.probabilities = [w / total for w in weights]
        self._cumulative: list[float] = []
        acc = 0.0
        for p in self.probabilities:
            acc += p
            self._cumulative.append(acc)
        self._rng = random.Random(seed)

    def sample(self) -> int:
        return min(bisect.bisect_left(self._cumulative, self._rng.random()), len(self._cumulative) - 1)


@dataclass(frozen=True)
class LoadConfig:
    edges: tuple[str, ...]
    origin: str
    """Where the test corpus is published before the run."""
    agents: int = 64
    """Concurrent agents (closed loop), or the cap on fetches in flight (with `rate`)."""
    documents: int = 16
    zipf_s: float = 1.1
    min_tokens: int = 256
    max_tokens: int = 2048
    duration_s: float = 30.0
    max_fetches: int = 0
    """Stop after this many fetches (0: only the duration bounds the run)."""
    rate: float = 0.0
    """Target arrivals per second, Poisson (0: closed loop, each agent fetches again at once)."""
    seed: int = 1
    token: str = ""
    """The caller's token (`--token-file`): a publisher token publishes the corpus where the origin
    has tokens, and any token reads where the edges close reads."""
    trust: tuple[Path, ...] = ()
    """Publisher keys the agents require on every block (`--trust`; empty: no signature checks)."""
    tls: TLSFiles | None = None
    """TLS files to call the origin and edges with (None: plaintext)."""

    def __post_init__(self) -> None:
        if self.agents < 1 or self.documents < 1:
            raise InvalidArgument("--agents and --documents must be at least 1")
        if not 0 < self.duration_s <= 3600:
            raise InvalidArgument("--duration must be between 0 and 3600 seconds")
        if not 1 <= self.min_tokens <= self.max_tokens:
            raise InvalidArgument("--tokens MIN:MAX needs 1 <= MIN <= MAX")
        if self.rate < 0 or self.max_fetches < 0:
            raise InvalidArgument("--rate and --max-fetches must be >= 0")


def corpus_documents(model: LoadedModel, n: int, min_tokens: int, max_tokens: int, seed: int) -> list[str]:
    """n distinct documents cut from the bundled license texts, lengths uniform in [min, max] tokens."""
    root = resources.files("kvcdn.samples")
    texts = sorted(p.name for p in root.iterdir() if p.name.endswith(".txt"))
    corpus = "\n\n".join(root.joinpath(name).read_text() for name in texts)
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        start = rng.randrange(len(corpus) // 2)
        body = f"Load-test document {i}.\n\n" + corpus[start:] + corpus[:start]
        docs.append(text_of_length(model, body, rng.randint(min_tokens, max_tokens)))
    return docs


@dataclass
class Sample:
    at_s: float
    """Start, seconds since the run began."""
    document: int
    ok: bool
    first_frame_s: float = 0.0
    complete_s: float = 0.0
    n_bytes: int = 0
    tokens: int = 0
    error: str = ""
    """gRPC status code name of a failed fetch."""


@dataclass
class LoadResult:
    config: LoadConfig
    model: str
    geometry: dict[str, Any]
    samples: list[Sample]
    wall_s: float
    before: list[EdgeStats]
    after: list[EdgeStats]
    document_tokens: list[int] = field(default_factory=list)
    arrivals_dropped: int = 0
    """Open loop only: arrivals that found `agents` fetches already in flight."""


async def publish_corpus(model: LoadedModel, config: LoadConfig) -> list[list[int]]:
    """Publish the run's documents at the origin; their token ids, by document."""
    docs = corpus_documents(model, config.documents, config.min_tokens, config.max_tokens, config.seed)
    async with CacheReader(config.origin, token=config.token, tls=config.tls) as reader:
        for i, text in enumerate(docs):
            await reader.publish(f"loadtest-{i}", text)
    return [document_ids(model.tokenizer, text) for text in docs]


async def run_load(
    model: LoadedModel,
    config: LoadConfig,
    ids: list[list[int]],
    on_tick: Callable[[list[Sample], float, int], None] | None = None,
) -> LoadResult:
    """Run the agents over the published documents `ids` until the duration or request bound, and
    read the edges' counters before and after."""
    zipf = Zipf(config.documents, config.zipf_s, config.seed)
    samples: list[Sample] = []
    started = 0
    dropped = 0
    in_flight = 0
    before = await edge_stats(config.edges, token=config.token, tls=config.tls)
    t0 = time.perf_counter()
    deadline = t0 + config.duration_s

    def budget_left() -> bool:
        return time.perf_counter() < deadline and (not config.max_fetches or started < config.max_fetches)

    clients = ClientConfig(
        config.edges, max_streams=max(config.agents, 1), token=config.token, trust=config.trust, tls=config.tls
    )
    async with KVClient(clients) as client:

        async def one(doc: int) -> None:
            nonlocal in_flight
            in_flight += 1
            sample = Sample(at_s=time.perf_counter() - t0, document=doc, ok=False)
            try:
                fetched = await client.fetch(model, ids[doc])
                sample.first_frame_s, sample.complete_s = fetched.first_frame_s, fetched.fetch_s
                sample.n_bytes, sample.tokens = fetched.n_bytes, fetched.cached_tokens
                sample.ok = fetched.cached_tokens == len(ids[doc])
                if not sample.ok:
                    sample.error = "PARTIAL"  # the edges answered with less than the published cache
                del fetched
            except KVCDNError as exc:
                sample.error = exc.code.name
            except Exception as exc:  # a failure outside the contract: counted, and the run goes on
                log.exception("fetch of document %d failed", doc)
                sample.error = type(exc).__name__
            finally:
                in_flight -= 1
                samples.append(sample)

        async def agent() -> None:
            nonlocal started
            while budget_left():
                started += 1
                await one(zipf.sample())

        async def arrivals() -> None:
            nonlocal started, dropped
            rng = random.Random(config.seed + 1)
            tasks: set[asyncio.Task[None]] = set()
            while budget_left():
                await asyncio.sleep(rng.expovariate(config.rate))
                if not budget_left():
                    break
                if in_flight >= config.agents:
                    dropped += 1  # over the concurrency cap: the arrival is not served
                    continue
                started += 1
                task = asyncio.create_task(one(zipf.sample()))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.gather(*tasks)

        async def ticker() -> None:
            while True:
                if on_tick is not None:
                    on_tick(samples, time.perf_counter() - t0, in_flight)
                await asyncio.sleep(0.5)

        tick = asyncio.create_task(ticker())
        try:
            if config.rate:
                await arrivals()
            else:
                await asyncio.gather(*(agent() for _ in range(config.agents)))
        finally:
            tick.cancel()
        wall_s = time.perf_counter() - t0
        if on_tick is not None:
            on_tick(samples, wall_s, 0)
    after = await edge_stats(config.edges, token=config.token, tls=config.tls)
    g = model.geometry
    return LoadResult(
        config=config,
        model=model.name,
        geometry={"layers": g.layers, "kv_heads": g.kv_heads, "head_dim": g.head_dim, "dtype": g.dtype},
        samples=samples,
        wall_s=wall_s,
        before=before,
        after=after,
        document_tokens=[len(x) for x in ids],
        arrivals_dropped=dropped,
    )


def _percentiles(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"p50": math.nan, "p90": math.nan, "p99": math.nan}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]

    return {"p50": at(0.50), "p90": at(0.90), "p99": at(0.99)}


_EDGE_COUNTERS = (
    "hits",
    "misses",
    "disk_hits",
    "origin_fetches",
    "peer_fetches",
    "bytes_from_origin",
    "bytes_from_peers",
    "bytes_served",
    "evictions",
)


def summarize(result: LoadResult) -> dict[str, Any]:
    """The report's JSON: throughput, latency percentiles, errors, tiers and egress from the edges."""
    ok = [s for s in result.samples if s.ok]
    n_bytes = sum(s.n_bytes for s in ok)
    # An edge that was down at either end of the run (killed mid-run, say) has no usable delta.
    pairs = [(a, b) for a, b in zip(result.after, result.before, strict=True) if a.up and b.up]
    unread = [a.address for a, b in zip(result.after, result.before, strict=True) if not (a.up and b.up)]
    delta = {name: sum(getattr(a, name) - getattr(b, name) for a, b in pairs) for name in _EDGE_COUNTERS}
    lookups = delta["hits"] + delta["misses"]
    seconds = max(1, math.ceil(result.wall_s))
    timeline = [{"second": t, "fetches": 0, "bytes": 0, "errors": 0} for t in range(seconds)]
    for s in result.samples:
        row = timeline[min(seconds - 1, int(s.at_s + s.complete_s))]
        row["fetches" if s.ok else "errors"] += 1
        row["bytes"] += s.n_bytes
    return {
        "model": result.model,
        "geometry": result.geometry,
        # The run's shape; no secrets (the token) and nothing JSON lacks (paths, TLS files).
        "config": {k: v for k, v in asdict(result.config).items() if k not in ("token", "trust", "tls")},
        "document_tokens": result.document_tokens,
        "wall_s": result.wall_s,
        "fetches_ok": len(ok),
        "fetches_failed": len(result.samples) - len(ok),
        "arrivals_dropped": result.arrivals_dropped,
        "errors_by_code": dict(Counter(s.error for s in result.samples if not s.ok)),
        "digest_failures": sum(1 for s in result.samples if s.error == DigestMismatch.code.name),
        "verified": "every frame of every fetch, BLAKE3 against the origin's manifest",
        "tokens_fetched": sum(s.tokens for s in ok),
        "bytes_fetched": n_bytes,
        "gb_per_s": n_bytes / result.wall_s / 1e9,
        "fetches_per_s": len(ok) / result.wall_s,
        "first_frame_s": _percentiles([s.first_frame_s for s in ok]),
        "complete_s": _percentiles([s.complete_s for s in ok]),
        "fetches_by_document": dict(sorted(Counter(s.document for s in result.samples).items())),
        "edges": {
            "read_from_metrics": not unread,
            "metrics_unread": unread,
            "addresses": list(result.config.edges),
            **delta,
            "memory_hit_ratio": delta["hits"] / lookups if lookups else 0.0,
            "disk_hit_ratio": delta["disk_hits"] / lookups if lookups else 0.0,
            "peer_ratio": delta["peer_fetches"] / lookups if lookups else 0.0,
            "origin_ratio": delta["origin_fetches"] / lookups if lookups else 0.0,
            # misses that joined another request's load (single-flight) instead of making one
            "coalesced_ratio": (delta["misses"] - delta["disk_hits"] - delta["peer_fetches"] - delta["origin_fetches"])
            / lookups
            if lookups
            else 0.0,
        },
        "timeline": timeline,
    }


def markdown(report: dict[str, Any], png_name: str) -> str:
    e = report["edges"]
    ff, cs = report["first_frame_s"], report["complete_s"]
    c = report["config"]
    lines = [
        f"# kvcdn load test: {c['agents']} agents, {c['documents']} documents (Zipf s={c['zipf_s']}), "
        f"{report['wall_s']:.1f} s",
        "",
        "| figure | value |",
        "|---|---:|",
        f"| fetches ok / failed | {report['fetches_ok']} / {report['fetches_failed']} |",
        f"| digest failures | {report['digest_failures']} |",
        f"| throughput | {report['gb_per_s']:.2f} GB/s, {report['fetches_per_s']:.1f} fetches/s |",
        f"| time to first frame p50 / p90 / p99 | {ff['p50'] * 1e3:.0f} / {ff['p90'] * 1e3:.0f} / "
        f"{ff['p99'] * 1e3:.0f} ms |",
        f"| time to complete cache p50 / p90 / p99 | {cs['p50'] * 1e3:.0f} / {cs['p90'] * 1e3:.0f} / "
        f"{cs['p99'] * 1e3:.0f} ms |",
        f"| blocks from memory / disk / peers / origin / joined a load | {e['memory_hit_ratio']:.1%} / "
        f"{e['disk_hit_ratio']:.1%} / {e['peer_ratio']:.1%} / {e['origin_ratio']:.1%} / "
        f"{e['coalesced_ratio']:.1%} |",
        f"| egress edge -> agents | {e['bytes_served'] / 1e9:.2f} GB |",
        f"| egress origin -> edges | {e['bytes_from_origin'] / 1e9:.3f} GB ({e['origin_fetches']:.0f} block pulls) |",
        f"| edge -> edge | {e['bytes_from_peers'] / 1e9:.3f} GB ({e['peer_fetches']:.0f} block loads) |",
        f"| errors by code | {report['errors_by_code'] or 'none'} |",
        *([f"| arrivals dropped (over --agents in flight) | {report['arrivals_dropped']} |"] if c["rate"] else []),
        "",
        f"![throughput and latency]({png_name})",
        "",
    ]
    if not e["read_from_metrics"]:
        lines.insert(
            2,
            f"_Metrics of {', '.join(e['metrics_unread'])} could not be read before and after the run: "
            "the tier and egress figures cover the other edges only._\n",
        )
    return "\n".join(lines)


def _plot(report: dict[str, Any], result: LoadResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    seconds = [row["second"] for row in report["timeline"]]
    left.plot(seconds, [row["bytes"] / 1e9 for row in report["timeline"]], label="GB/s")
    left.set_xlabel("second of the run")
    left.set_ylabel("GB/s completed")
    twin = left.twinx()
    twin.plot(seconds, [row["fetches"] for row in report["timeline"]], color="tab:orange", label="fetches/s")
    twin.set_ylabel("fetches/s")
    left.set_title("throughput")
    left.grid(alpha=0.3)
    ok = [s for s in result.samples if s.ok]
    for name, values in (
        ("first frame", sorted(s.first_frame_s * 1e3 for s in ok)),
        ("complete cache", sorted(s.complete_s * 1e3 for s in ok)),
    ):
        if values:
            right.plot(values, [(i + 1) / len(values) for i in range(len(values))], label=name)
    right.set_xscale("log")
    right.set_xlabel("ms")
    right.set_ylabel("fraction of fetches")
    right.set_title("latency CDF")
    right.grid(True, which="both", alpha=0.3)
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(result: LoadResult, out_dir: Path) -> dict[str, Path]:
    """report.json, report.md and report.png in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report = summarize(result)
    paths = {"json": out_dir / "report.json", "markdown": out_dir / "report.md", "png": out_dir / "report.png"}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    _plot(report, result, paths["png"])
    paths["markdown"].write_text(markdown(report, paths["png"].name))
    return paths


def run_loadtest(config: LoadConfig, model: LoadedModel, report_dir: Path) -> int:
    """`kvcdn loadtest run`: live progress, then the report; exit status 1 on any failed fetch."""
    from rich.console import Console
    from rich.live import Live
    from rich.table import Table

    console = Console()

    def view(samples: list[Sample], elapsed: float, in_flight: int) -> Table:
        ok = [s for s in samples if s.ok]
        recent = [s for s in ok if s.at_s + s.complete_s >= elapsed - 2]
        table = Table("elapsed", "in flight", "fetches ok", "errors", "GB/s (last 2 s)", "p50 complete")
        p50 = _percentiles([s.complete_s for s in ok])["p50"]
        table.add_row(
            f"{min(elapsed, config.duration_s):.0f}/{config.duration_s:.0f} s",
            str(in_flight),
            str(len(ok)),
            str(len(samples) - len(ok)),
            f"{sum(s.n_bytes for s in recent) / 2e9:.2f}",
            "-" if math.isnan(p50) else f"{p50 * 1e3:.0f} ms",
        )
        return table

    with console.status(f"publishing {config.documents} documents at {config.origin} ..."):
        ids = asyncio.run(publish_corpus(model, config))
    with Live(view([], 0.0, 0), console=console, refresh_per_second=4) as live:
        result = asyncio.run(run_load(model, config, ids, lambda s, t, n: live.update(view(s, t, n))))
    paths = write_report(result, report_dir)
    report = json.loads(paths["json"].read_text())
    print(markdown(report, str(paths["png"])))
    print(f"report: {paths['json']} {paths['markdown']} {paths['png']}")
    return 0 if report["fetches_failed"] == 0 and report["fetches_ok"] > 0 else 1
