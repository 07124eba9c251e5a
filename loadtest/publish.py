"""`kvcdn loadtest publish`: how a burst of publishes scales with origin workers.

For each worker count it starts a throwaway PostgreSQL catalog (kvcdn.ops.postgres), that many
`kvcdn origin --catalog` processes on one store folder, warms each worker up, then sends a burst of
distinct documents, all to the first worker, and times it until every publish has answered. The
workers' queue spreads the burst (kvcdn.origin.queue); the table says how many jobs each took.

Each worker stands for one accelerator: on a CPU machine give each `--threads` of the cores (1 by
default), or the workers only share the same cores and nothing can scale."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from tempfile import TemporaryDirectory

from rich.console import Console

from kvcdn.errors import InvalidArgument
from kvcdn.loadtest.bench import sample_corpus
from kvcdn.loadtest.bench_report import grid
from kvcdn.model.options import ModelOptions
from kvcdn.ops.launcher import Cluster
from kvcdn.ops.postgres import LocalPostgres
from kvcdn.wire.stub import CacheReader

__all__ = ["PublishBenchConfig", "PublishRow", "run_publish_bench"]

_CHARS_PER_TOKEN = 4
"""About what the bundled English licences take per token; the table prints the real counts."""


@dataclass(frozen=True)
class PublishBenchConfig:
    workers: tuple[int, ...] = (1, 2)
    """Worker counts to compare, each in a network of its own."""
    documents: int = 8
    """Documents in the burst (each distinct from its first block on)."""
    tokens: int = 1024
    """About how long each document is."""
    threads: int = 1
    """Torch threads of each worker (its share of the CPU, standing for one accelerator)."""
    markdown: bool = False

    def __post_init__(self) -> None:
        if not self.workers or min(self.workers) < 1:
            raise InvalidArgument("--workers must list worker counts of at least 1, e.g. 1,2")
        if self.documents < 1 or self.tokens < 16 or self.threads < 1:
            raise InvalidArgument("--documents and --threads must be at least 1, --tokens at least 16")


@dataclass(frozen=True)
class PublishRow:
    workers: int
    documents: int
    tokens: int
    """Tokens of all documents together."""
    seconds: float
    jobs: dict[str, int]
    """Jobs each worker ran during the burst, by its name."""


def burst_texts(n: int, tokens: int, tag: str) -> list[str]:
    """n distinct texts of about `tokens` tokens (a different opening each, so no block is shared)."""
    corpus = sample_corpus()
    size = tokens * _CHARS_PER_TOKEN
    return [f"{tag} document {i}. " + corpus[(i * size) % len(corpus) :][:size] for i in range(n)]


async def _publish_all(address: str, texts: list[str], tag: str) -> tuple[float, int]:
    """Publish every text at once to `address`; the seconds until the last answered, and tokens."""
    async with CacheReader(address, timeout_s=1800) as stub:
        start = time.perf_counter()
        answers = await asyncio.gather(*(stub.publish(f"{tag}-{i}", t, codecs=("raw",)) for i, t in enumerate(texts)))
        return time.perf_counter() - start, sum(a.manifest.token_count for a in answers)


def _jobs(pg: LocalPostgres, database: str, since_id: int) -> tuple[dict[str, int], int]:
    import psycopg

    with psycopg.connect(pg.url(database)) as conn:
        rows = conn.execute(
            "SELECT worker, count(*), max(id) FROM kvcdn_jobs WHERE id > %s AND state = 'done' GROUP BY worker",
            (since_id,),
        ).fetchall()
    return {w: int(n) for w, n, _ in rows}, max([since_id, *(int(m) for _, _, m in rows)])


def measure(config: PublishBenchConfig, options: ModelOptions, n_workers: int, pg: LocalPostgres) -> PublishRow:
    database = f"kvcdn_publish_{n_workers}_{uuid.uuid4().hex[:8]}"  # a fresh catalog per row
    url = pg.create_database(database)
    with TemporaryDirectory(prefix="kvcdn-publish-") as store:
        cluster = Cluster(
            Path(store),
            edges=0,
            peers=False,
            signed=False,
            origin_args=[*options.flags(), "--catalog", url, "--codecs", ""],
            origin_workers=n_workers,
            env={"OMP_NUM_THREADS": str(config.threads), "MKL_NUM_THREADS": str(config.threads)},
        )
        with cluster:
            # Warm-up: one short document per worker at once (usually one each: a worker's first prefill
            # pays for allocations and kernels' first runs).
            asyncio.run(_publish_all(cluster.origin_address, burst_texts(n_workers, 64, "warm-up"), "warm-up"))
            _, last = _jobs(pg, database, 0)
            texts = burst_texts(config.documents, config.tokens, "Burst")
            seconds, tokens = asyncio.run(_publish_all(cluster.origin_address, texts, "burst"))
            jobs, _ = _jobs(pg, database, last)
    return PublishRow(n_workers, config.documents, tokens, seconds, jobs)


def run_publish_bench(config: PublishBenchConfig, options: ModelOptions) -> int:
    console = Console()
    rows: list[PublishRow] = []
    with LocalPostgres() as pg:
        for n in config.workers:
            with console.status(f"{n} origin worker(s): starting, warming up, publishing {config.documents} documents"):
                rows.append(measure(config, options, n, pg))
    head = ["workers", "documents", "tokens", "burst s", "tokens/s", "speed-up", "jobs per worker"]
    body = [
        [
            str(row.workers),
            str(row.documents),
            str(row.tokens),
            f"{row.seconds:.2f}",
            f"{row.tokens / row.seconds:,.0f}",
            f"{rows[0].seconds / row.seconds:.2f}x",
            ", ".join(f"{w}: {n}" for w, n in sorted(row.jobs.items())),
        ]
        for row in rows
    ]
    title = (
        f"A burst of {config.documents} publishes sent to one worker ({options.model}, {config.threads} thread(s) each)"
    )
    out = grid(head, body, title, config.markdown)
    if config.markdown:
        print(out)
    else:
        console.print(out)
    return 0
