"""Cold pulls as `kvcdn loadtest network --parts pulls` measures them, through one edge, with any
version of kvcdn (older ones have no part 4): one origin, one edge whose memory tier holds 1.5
documents, two warm-up documents, then N cold 3,774-token SmolLM2 documents fetched raw through the
edge; prints each fetch's seconds, the median, and the edge's median CPU seconds a fetch.

An older version, side by side with this checkout's (docs/measurements.md, cold pulls):
    git worktree add /tmp/old b5ff4af
    .venv/bin/pip install --no-deps --target /tmp/oldpkg /tmp/old
    PYTHONPATH=/tmp/oldpkg .venv/bin/python scripts/cold_pulls_of.py 5
    .venv/bin/python scripts/cold_pulls_of.py 5
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

import kvcdn
from kvcdn.client.api import KVClient
from kvcdn.loadtest.bench import sample_corpus, text_of_length
from kvcdn.model.loading import LoadedModel, load_model
from kvcdn.model.prompt import document_ids
from kvcdn.ops.launcher import Cluster
from kvcdn.wire.stub import CacheReader

TOKENS = 3774
WARM_UP = 2


def _cpu_s(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


async def _measure(model: LoadedModel, cluster: Cluster, n: int) -> tuple[list[float], list[float]]:
    edge, pid = cluster.edge_addresses[0], cluster.process("edge0").pid
    seconds: list[float] = []
    cpu: list[float] = []
    for i in range(WARM_UP + n):
        text = text_of_length(model, f"Cold pull {i} {time.time_ns()}.\n\n" + sample_corpus(), TOKENS)
        async with CacheReader(cluster.origin_address) as reader:
            await reader.publish(f"pull-{i}-{time.time_ns()}", text)
        ids = document_ids(model.tokenizer, text)
        before = _cpu_s(pid)
        async with KVClient([edge]) as client:
            fetched = await client.fetch(model, ids, ("raw",))
        if fetched.cached_tokens != len(ids):
            raise SystemExit(f"document {i}: {fetched.cached_tokens} of {len(ids)} tokens cached")
        if i >= WARM_UP:
            seconds.append(fetched.fetch_s)
            cpu.append(_cpu_s(pid) - before)
    return seconds, cpu


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    print(f"kvcdn from {Path(kvcdn.__file__).parent}", file=sys.stderr)
    model = load_model("smollm2-135m")
    mem = int(1.5 * TOKENS * model.geometry.token_bytes)
    with tempfile.TemporaryDirectory() as tmp:
        cluster = Cluster(
            store_dir=Path(tmp) / "store",
            edges=1,
            origin_args=["--model", "smollm2-135m"],
            peers=False,
            edge_args=["--mem-bytes", str(mem)],
        ).start()
        try:
            seconds, cpu = asyncio.run(_measure(model, cluster, n))
        finally:
            cluster.stop()
    listed = ", ".join(f"{s:.3f}" for s in seconds)
    median, cpu_median = statistics.median(seconds), statistics.median(cpu)
    print(f"cold fetch s {listed}; median {median:.3f}; edge CPU s median {cpu_median:.3f}")


if __name__ == "__main__":
    main()
