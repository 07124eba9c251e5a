"""`kvcdn loadtest bench`: local prefill against fetching the cache from a warm edge, per document
length, and the fetch's throughput against a plain TCP transfer of the same bytes in the same run.

For each length: the local path is prefill of document + question and the first new token; the
cached path is lookup + stream + verify + rebuild from a warm edge, then the question's tokens and
the first new token. Both run on this machine's model; the edge and the TCP sender are separate
processes on loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import socket
import tempfile
import time
from dataclasses import dataclass
from importlib import resources
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from kvcdn import adapter
from kvcdn.client.api import KVClient
from kvcdn.client.reader import CacheReader
from kvcdn.launcher import Cluster
from kvcdn.models import LoadedModel, load_model
from kvcdn.prompt import document_ids, question_ids

__all__ = ["BenchRow", "raw_tcp_gbps", "run_bench", "text_of_length"]

_CHUNK = 1 << 20


def _tcp_sender(conn: Connection, n_bytes: int, repeats: int) -> None:
    buf = memoryview(bytes(_CHUNK))
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        conn.send(srv.getsockname()[1])
        for _ in range(repeats):
            peer, _ = srv.accept()
            with peer:
                left = n_bytes
                while left:
                    left -= peer.send(buf[: min(left, _CHUNK)])


def raw_tcp_gbps(n_bytes: int, repeats: int = 3) -> float:
    """Best GB/s of a plain TCP transfer of `n_bytes` from another process over loopback."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_tcp_sender, args=(child, n_bytes, repeats), daemon=True)
    proc.start()
    port = parent.recv()
    sink = bytearray(n_bytes)
    view = memoryview(sink)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port)) as s:
            got = 0
            while got < n_bytes:
                n = s.recv_into(view[got:], min(n_bytes - got, 4 * _CHUNK))
                if n == 0:
                    raise ConnectionError("sender closed early")
                got += n
        best = min(best, time.perf_counter() - t0)
    proc.join(10)
    return n_bytes / best / 1e9


def text_of_length(model: LoadedModel, corpus: str, n_tokens: int) -> str:
    """A prefix of `corpus` whose document ids (kvcdn.prompt.document_ids) are about n_tokens long."""
    body = model.tokenizer(corpus, add_special_tokens=False)["input_ids"]
    take = n_tokens - (len(document_ids(model.tokenizer, "")))
    text = ""
    for _ in range(6):  # decode/encode round trips can merge or split a token at the cut
        text = model.tokenizer.decode(body[: max(1, take)])
        diff = n_tokens - len(document_ids(model.tokenizer, text))
        if diff == 0:
            break
        take += diff
    return text


@dataclass(frozen=True)
class BenchRow:
    tokens: int
    cache_bytes: int
    local_s: float
    fetch_s: float
    cached_s: float
    raw_gbps: float
    matched: bool

    @property
    def speedup(self) -> float:
        return self.local_s / self.cached_s

    @property
    def fetch_gbps(self) -> float:
        return self.cache_bytes / self.fetch_s / 1e9


async def _measure(
    model: LoadedModel, cluster: Cluster, texts: list[str], repeats: int, console: Console
) -> list[BenchRow]:
    question = question_ids(model.tokenizer, "What is this text about?")
    async with CacheReader(cluster.origin_address) as origin:
        for text in texts:
            with console.status(f"origin: publishing {len(document_ids(model.tokenizer, text))} tokens ..."):
                await origin.publish(f"bench-{len(text)}", text)
    rows = []
    async with KVClient(cluster.edge_addresses) as client:
        for text in texts:
            doc = document_ids(model.tokenizer, text)
            ids = doc + question
            await client.fetch(model, doc)  # warm the edge
            with console.status(f"local prefill of {len(doc)} tokens ..."):
                t0 = time.perf_counter()
                local = adapter.greedy(model.model, ids, 1)
                local_s = time.perf_counter() - t0
            best: tuple[float, float, Any] | None = None
            for _ in range(repeats):
                t0 = time.perf_counter()
                fetched = await client.fetch(model, doc)
                gen = adapter.greedy(model.model, ids, 1, cache=fetched.layers)
                cached_s = time.perf_counter() - t0
                if best is None or cached_s < best[0]:
                    best = (cached_s, fetched.fetch_s, gen)
            assert best is not None
            raw = raw_tcp_gbps(fetched.n_bytes, repeats)
            rows.append(
                BenchRow(
                    tokens=len(doc),
                    cache_bytes=fetched.n_bytes,
                    local_s=local_s,
                    fetch_s=best[1],
                    cached_s=best[0],
                    raw_gbps=raw,
                    matched=best[2].tokens == local.tokens,
                )
            )
    return rows


def render(rows: list[BenchRow], title: str, markdown: bool) -> str | Table:
    head = [
        "tokens",
        "cache MB",
        "prefill+1st s",
        "fetch s",
        "fetch+rebuild+1st s",
        "speed-up",
        "fetch GB/s",
        "raw TCP GB/s",
        "fetch/raw",
        "same 1st token",
    ]
    body = [
        [
            str(r.tokens),
            f"{r.cache_bytes / 1e6:.1f}",
            f"{r.local_s:.3f}",
            f"{r.fetch_s:.3f}",
            f"{r.cached_s:.3f}",
            f"{r.speedup:.1f}x",
            f"{r.fetch_gbps:.2f}",
            f"{r.raw_gbps:.2f}",
            f"{r.fetch_gbps / r.raw_gbps:.0%}",
            "yes" if r.matched else "NO",
        ]
        for r in rows
    ]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
        lines += ["| " + " | ".join(b) + " |" for b in body]
        return f"{title}\n\n" + "\n".join(lines)
    table = Table(*head, title=title)
    for b in body:
        table.add_row(*b)
    return table


def run_bench(args: argparse.Namespace) -> int:
    console = Console()
    lengths = [int(x) for x in args.lengths.split(",")]
    models_dir = Path(args.models_dir) if args.models_dir else None
    with console.status("loading the model ..."):
        model = load_model(args.model, dtype=args.dtype, device=args.device, models_dir=models_dir)
    root = resources.files("kvcdn.samples")
    corpus = "\n\n".join(root.joinpath(f).read_text() for f in ("gpl-3.0.txt", "gpl-2.0.txt", "mpl-2.0.txt"))
    texts = [text_of_length(model, corpus, n) for n in lengths]
    origin_args = ["--model", args.model, "--dtype", args.dtype, "--device", args.device]
    if args.models_dir:
        origin_args += ["--models-dir", args.models_dir]
    with tempfile.TemporaryDirectory(prefix="kvcdn-bench-") as store:
        with console.status("starting an origin and an edge ..."):
            cluster = Cluster(store_dir=Path(store), edges=1, origin_args=origin_args).start()
        try:
            rows = asyncio.run(_measure(model, cluster, texts, args.repeats, console))
        finally:
            cluster.stop()
    title = f"kvcdn bench: {model.name}, {model.geometry.dtype} on {model.device}, warm edge, loopback"
    out = render(rows, title, args.markdown)
    if isinstance(out, str):
        print(out)
    else:
        console.print(out)
    return 0 if all(r.matched for r in rows) else 1
