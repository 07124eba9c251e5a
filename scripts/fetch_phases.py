"""A warm fetch's fixed part, by phase: the lookup alone, the fetch's first verified frame, the fetch
whole, and its landing (last frame to a ready cache), medians of N warm fetches of one document spread
over a ring of edges with peers. The bench prints the last three per row (`first frame s`, `landing s`);
this adds the lookup and runs any version of kvcdn (docs/measurements.md, warm lookups):

    .venv/bin/python scripts/fetch_phases.py --edges 4 --tokens 3774 --n 10

An older version side by side: `git worktree add /tmp/old COMMIT`, `.venv/bin/pip install --no-deps
--target /tmp/oldpkg /tmp/old`, then the same command under `PYTHONPATH=/tmp/oldpkg`.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import kvcdn
from kvcdn.client.api import KVClient
from kvcdn.client.config import ClientConfig
from kvcdn.loadtest.bench import sample_corpus, text_of_length
from kvcdn.model.loading import LoadedModel, load_model
from kvcdn.model.prompt import document_ids
from kvcdn.ops.launcher import Cluster
from kvcdn.wire.stub import CacheReader

WARM_UP = 2


async def _measure(model: LoadedModel, cluster: Cluster, tokens: int, n: int, spread: bool) -> dict[str, list[float]]:
    text = text_of_length(model, f"Phases {time.time_ns()}.\n\n" + sample_corpus(), tokens)
    async with CacheReader(cluster.origin_address) as reader:
        await reader.publish(f"phases-{time.time_ns()}", text)
    ids = document_ids(model.tokenizer, text)
    phases: dict[str, list[float]] = {"lookup": [], "first frame": [], "fetch": [], "landing": []}
    async with KVClient(ClientConfig(tuple(cluster.edge_addresses), spread=spread)) as client:
        for i in range(WARM_UP + n):
            t0 = time.perf_counter()
            await client.lookup(model, ids, ("raw",))
            lookup_s = time.perf_counter() - t0
            fetched = await client.fetch(model, ids, ("raw",))
            if fetched.cached_tokens != len(ids):
                raise SystemExit(f"fetch {i}: {fetched.cached_tokens} of {len(ids)} tokens cached")
            if i >= WARM_UP:
                phases["lookup"].append(lookup_s)
                phases["first frame"].append(fetched.first_frame_s)
                phases["fetch"].append(fetched.fetch_s)
                phases["landing"].append(fetched.land_s)
    return phases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="alias, random:GEOMETRY or directory")
    parser.add_argument("--edges", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=3774)
    parser.add_argument("--n", type=int, default=10, help="warm fetches measured (after 2 more)")
    parser.add_argument("--primary-only", action="store_true", help="every block from its primary owner")
    args = parser.parse_args()
    print(f"kvcdn from {Path(kvcdn.__file__).parent}", file=sys.stderr)
    model = load_model(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        cluster = Cluster(store_dir=Path(tmp) / "store", edges=args.edges, origin_args=["--model", args.model])
        cluster.start()
        try:
            phases = asyncio.run(_measure(model, cluster, args.tokens, args.n, not args.primary_only))
        finally:
            cluster.stop()
    spread = "primaries only" if args.primary_only else "spread over owners"
    print(f"{args.edges} edges ({spread}), {args.tokens} tokens, medians of {args.n} warm fetches (ms):")
    for name, seconds in phases.items():
        print(f"  {name:<12} {1000 * statistics.median(seconds):7.2f}")


if __name__ == "__main__":
    main()
