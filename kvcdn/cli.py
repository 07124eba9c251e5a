"""The `kvcdn` command line: the interface operators, agent developers and deploy manifests use.

This module is the composition root: it builds each component's config from flags and imports the
components lazily, so `kvcdn --help` stays fast.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kvcdn.errors import InvalidArgument, KVCDNError

__all__ = ["main", "parse_size"]

log = logging.getLogger("kvcdn")

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "k": 1e3,
    "m": 1e6,
    "g": 1e9,
    "t": 1e12,
    "ki": 1 << 10,
    "mi": 1 << 20,
    "gi": 1 << 30,
    "ti": 1 << 40,
}


def parse_size(text: str) -> int:
    """'512MiB', '2G', '1048576' -> bytes."""
    m = _SIZE.match(text)
    unit = (m.group(2) or "").lower().removesuffix("b") if m else ""
    if not m or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 512MiB, 2GiB or 1000000")
    return int(float(m.group(1)) * _UNITS[unit])


def _edges(text: str) -> list[str]:
    edges = [e.strip() for e in text.split(",") if e.strip()]
    if not edges:
        raise argparse.ArgumentTypeError("give at least one edge address HOST:PORT")
    return edges


def _add_edges_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--edges",
        type=_edges,
        default=os.environ.get("KVCDN_EDGES"),
        required="KVCDN_EDGES" not in os.environ,
        help="edge addresses HOST:PORT[,...] (env KVCDN_EDGES)",
    )


def _models_dir(args: argparse.Namespace) -> Path | None:
    return Path(args.models_dir) if args.models_dir else None


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="alias smollm2-135m (default), model directory, or hub id")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument(
        "--models-dir",
        default=os.environ.get("KVCDN_MODELS_DIR"),
        help="where the default model is provisioned (env KVCDN_MODELS_DIR; default ~/.cache/kvcdn/models)",
    )


def _load(args: argparse.Namespace) -> Any:
    from rich.console import Console

    from kvcdn.model.loading import load_model

    with Console(stderr=True).status("loading the model (provisioning it on first use) ..."):
        return load_model(args.model, dtype=args.dtype, device=args.device, models_dir=_models_dir(args))


# --- commands ------------------------------------------------------------------------------------


def cmd_origin(args: argparse.Namespace) -> int:
    from kvcdn.origin import OriginConfig, run_origin

    config = OriginConfig(
        store_dir=Path(args.store),
        listen=args.listen,
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        models_dir=_models_dir(args),
        max_document_tokens=args.max_document_tokens,
        bulk_port=args.bulk_port,
        metrics_port=args.metrics_port,
    )
    asyncio.run(run_origin(config, args.port_file))
    return 0


def cmd_edge(args: argparse.Namespace) -> int:
    from kvcdn.edge import EdgeConfig, run_edge

    config = EdgeConfig(
        origin=args.origin,
        listen=args.listen,
        mem_bytes=args.mem_bytes,
        disk_dir=Path(args.disk_dir) if args.disk_dir else None,
        disk_bytes=args.disk_bytes,
        bulk_port=args.bulk_port,
        metrics_port=args.metrics_port,
        peers=tuple(args.peers or ()),
        replicas=args.replicas,
        advertise=args.advertise or "",
        peer_timeout_s=args.peer_timeout,
    )
    asyncio.run(run_edge(config, args.port_file))
    return 0


def _cluster_args(args: argparse.Namespace) -> list[str]:
    out = ["--model", args.model, "--dtype", args.dtype, "--device", args.device]
    if args.models_dir:
        out += ["--models-dir", args.models_dir]
    return out


def cmd_up(args: argparse.Namespace) -> int:
    import signal
    import threading

    from kvcdn.ops.launcher import Cluster

    if args.edges < 1:
        raise InvalidArgument("--edges must be at least 1")
    with tempfile.TemporaryDirectory(prefix="kvcdn-store-") as tmp:
        store = Path(args.store) if args.store else Path(tmp)
        edge_args = ["--mem-bytes", str(args.mem_bytes)]
        if args.disk_bytes:
            edge_args += ["--disk-bytes", str(args.disk_bytes)]
        cluster = Cluster(
            store_dir=store,
            edges=args.edges,
            origin_args=_cluster_args(args),
            edge_args=edge_args,
            edge_disk_root=store / "edge-disk" if args.disk_bytes else None,
        )
        print("starting origin (loading the model) ...", file=sys.stderr, flush=True)
        with cluster:
            print(f"origin  {cluster.origin_address}  metrics {cluster.metrics_urls['origin']}  (store {store})")
            for i, addr in enumerate(cluster.edge_addresses):
                disk = f", disk {args.disk_bytes / 2**20:.0f} MiB" if args.disk_bytes else ""
                tiers = f"(memory {args.mem_bytes / 2**20:.0f} MiB{disk})"
                print(f"edge{i}   {addr}  metrics {cluster.metrics_urls[f'edge{i}']}  {tiers}")
            print(f"export KVCDN_EDGES={','.join(cluster.edge_addresses)}", flush=True)
            print("Ctrl-C stops them all.", file=sys.stderr, flush=True)
            stop = threading.Event()
            # Explicit handlers: a shell that starts `kvcdn up &` ignores SIGINT in it by default.
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: stop.set())
            while not stop.wait(0.5):
                pass
            print("stopping ...", file=sys.stderr)
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from kvcdn.client import CacheReader

    files = [Path(f) for f in args.files]
    if args.name and len(files) != 1:
        raise InvalidArgument("--name applies to a single FILE")

    async def run() -> list[Any]:
        async with CacheReader(args.origin) as origin:
            return [await origin.publish(args.name or f.stem, f.read_text(encoding="utf-8")) for f in files]

    results = asyncio.run(run())
    table = Table("document", "version", "tokens", "blocks", "computed", "prefill s", "first key")
    for r in results:
        m = r.manifest
        first = m.blocks[0].key.hex()[:16] if m.blocks else "-"
        table.add_row(
            m.document,
            str(m.version),
            str(m.token_count),
            str(len(m.blocks)),
            str(r.computed_blocks),
            f"{r.prefill_s:.2f}",
            first,
        )
    Console().print(table)
    return 0


def _read_doc(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidArgument(f"cannot read --doc {path}: {exc.strerror}") from None


def cmd_fetch(args: argparse.Namespace) -> int:
    from kvcdn.client import KVClient
    from kvcdn.model.prompt import document_ids

    text = _read_doc(args.doc)
    model = _load(args)
    doc = document_ids(model.tokenizer, text)

    async def run() -> Any:
        async with KVClient(args.edges) as client:
            return await client.fetch(model, doc)

    fetched = asyncio.run(run())
    if fetched.cached_tokens == 0:
        print(f"{args.doc}: not cached on the edges (publish it first)", file=sys.stderr)
        return 1
    result = {
        "doc_tokens": len(doc),
        "cached_tokens": fetched.cached_tokens,
        "bytes": fetched.n_bytes,
        "fetch_s": round(fetched.fetch_s, 4),
        "gb_per_s": round(fetched.n_bytes / fetched.fetch_s / 1e9, 3),
        "verified_frames": "all (BLAKE3)",
        "edges": fetched.edges_used,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{fetched.cached_tokens}/{len(doc)} tokens, {fetched.n_bytes / 1e6:.1f} MB in "
            f"{fetched.fetch_s * 1e3:.0f} ms ({result['gb_per_s']} GB/s), every frame verified"
        )
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    from kvcdn.client import KVClient
    from kvcdn.client.agent import ask

    text = _read_doc(args.doc)
    model = _load(args)

    async def run() -> Any:
        async with KVClient(args.edges) as client:
            return await ask(client, model, text, args.question, args.max_new_tokens, args.verify)

    result = asyncio.run(run())
    if args.json:
        print(json.dumps(result.to_json()))
        return 0
    print(result.answer)
    line = (
        f"[{result.cached_tokens}/{result.doc_tokens} tokens from cache, {result.cache_bytes / 1e6:.1f} MB "
        f"in {result.fetch_s:.3f} s"
    )
    if args.verify:
        line += (
            f"; verify: {result.matched_tokens}/{result.new_tokens} tokens matched, max |logit diff| "
            f"{result.max_abs_logit_diff:.2e}, local prefill {result.prefill_s:.2f} s ({result.speedup:.0f}x)"
        )
    print(line + "]", file=sys.stderr)
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    from kvcdn.client import CacheReader

    document, _, version = args.document.partition("@")
    if version and not version.isdigit():
        raise InvalidArgument(f"{args.document!r} is not DOCUMENT[@VERSION]")

    async def run() -> Any:
        async with CacheReader(args.origin) as origin:
            return await origin.purge(document, int(version or 0))

    resp = asyncio.run(run())
    versions = ", ".join(f"v{v}" for v in resp.versions)
    print(f"purged {document} {versions}: {resp.blocks_removed} blocks removed (invalidation event {resp.seq})")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from kvcdn.ops.stats import EdgeStats, edge_stats

    rows = asyncio.run(edge_stats(args.edges))
    columns: list[tuple[str, Callable[[EdgeStats], str]]] = [
        ("memory blocks", lambda r: f"{r.memory_blocks:.0f}"),
        ("memory MB", lambda r: f"{r.memory_bytes / 1e6:.1f}"),
        ("memory hits", lambda r: f"{r.hits:.0f}"),
        ("disk blocks", lambda r: f"{r.disk_blocks:.0f}"),
        ("disk MB", lambda r: f"{r.disk_bytes / 1e6:.1f}"),
        ("disk hits", lambda r: f"{r.disk_hits:.0f}"),
        ("hit ratio", lambda r: f"{r.hit_ratio:.0%}"),
        ("evictions", lambda r: f"{r.evictions:.0f}"),
        ("origin fetches", lambda r: f"{r.origin_fetches:.0f}"),
        ("MB from origin", lambda r: f"{r.bytes_from_origin / 1e6:.1f}"),
        ("MB from peers", lambda r: f"{r.bytes_from_peers / 1e6:.1f}"),
        ("MB served", lambda r: f"{r.bytes_served / 1e6:.1f}"),
        ("streams now", lambda r: f"{r.streams_in_flight:.0f}"),
    ]
    table = Table(title="kvcdn edges")
    table.add_column("edge", no_wrap=True)
    table.add_column("up", no_wrap=True)
    for name, _ in columns:
        table.add_column(name, justify="right")
    for r in rows:
        if r.up:
            table.add_row(r.address, "yes", *(fmt(r) for _, fmt in columns))
        else:
            table.add_row(r.address, "[red]no[/red]", r.error, *[""] * (len(columns) - 1))
    Console(width=None if sys.stdout.isatty() else 240).print(table)
    return 0 if all(r.up for r in rows) else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from kvcdn.ops.demo import run_demo

    return run_demo(args, _load(args), _cluster_args(args))


def cmd_provision(args: argparse.Namespace) -> int:
    from kvcdn.model.loading import default_models_dir, provision_default_model

    print(provision_default_model(_models_dir(args) or default_models_dir()))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from kvcdn.loadtest.bench import run_bench

    return run_bench(args, _load(args), _cluster_args(args))


def cmd_loadrun(args: argparse.Namespace) -> int:
    from kvcdn.loadtest.run import LoadConfig, run_loadtest

    low, _, high = args.tokens.partition(":")
    try:
        min_tokens, max_tokens = int(low), int(high or low)
    except ValueError:
        raise InvalidArgument(f"--tokens {args.tokens!r} is not MIN:MAX (e.g. 256:2048)") from None
    config = LoadConfig(
        edges=tuple(args.edges),
        origin=args.origin,
        agents=args.agents,
        documents=args.documents,
        zipf_s=args.zipf,
        min_tokens=min_tokens,
        max_tokens=max_tokens,
        duration_s=args.duration,
        max_fetches=args.max_fetches,
        rate=args.rate,
        seed=args.seed,
    )
    return run_loadtest(config, _load(args), Path(args.report_dir))


def cmd_netbench(args: argparse.Namespace) -> int:
    from kvcdn.loadtest.network import run_network_bench

    return run_network_bench(args, _load(args), _cluster_args(args))


def cmd_economics(args: argparse.Namespace) -> int:
    from kvcdn.loadtest.economics import run_economics

    return run_economics(args)


_COUNT = re.compile(r"^\s*(\d+(?:\.\d+)?(?:e\d+)?)\s*([kmg]?)\s*$", re.IGNORECASE)


def parse_count(text: str) -> float:
    """'80M', '1.5k', '2e6', '1000' -> a number."""
    m = _COUNT.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count such as 80M, 1.5k or 2e6")
    return float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2).lower()]


def _add_economics(lt: Any) -> None:
    from kvcdn.loadtest.economics import GEOMETRIES, SWEEPS

    e = lt.add_parser(
        "economics",
        help="egress simulator: re-prefill vs reuse vs shipping, break-even egress price, where the cache should live",
    )
    e.add_argument("--paper", action="store_true", help="the preprint's inputs; prints its figures beside ours")
    e.add_argument(
        "--geometry", default="qwen3-4b", help=f"{', '.join(GEOMETRIES)} or a model directory (default qwen3-4b)"
    )
    e.add_argument("--layers", type=int, help="override the geometry's layers")
    e.add_argument("--kv-heads", type=int, help="override the geometry's KV heads")
    e.add_argument("--head-dim", type=int, help="override the geometry's head width")
    e.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    e.add_argument("--tokens", type=int, default=3774, help="document length (3774)")
    e.add_argument("--agents", type=parse_count, help="agents reading the document (80M; with --from-run: the run's)")
    e.add_argument("--loads-per-agent", type=float, default=1.0, help="reads of the document per agent (1)")
    e.add_argument("--prefill-usd-per-mtok", type=float, default=5.0, help="prefill price per M input tokens ($5)")
    e.add_argument("--gpu-usd-per-hour", type=float, help="price prefill by GPU time instead (needs the next flag)")
    e.add_argument("--prefill-tokens-per-s", type=float, help="the GPU's prefill throughput")
    e.add_argument("--reuse-ratio", type=float, help="prefill/reuse compute, constant (default: the preprint's curve)")
    e.add_argument("--bench", metavar="JSON", help="reuse ratios measured by `kvcdn loadtest bench --json`")
    e.add_argument("--origin-egress-usd-per-gb", type=float, default=0.09, help="origin -> edge ($0.09)")
    e.add_argument("--edge-egress-usd-per-gb", type=float, default=0.09, help="edge -> agent ($0.09)")
    e.add_argument("--compression", type=float, default=1.0, help="raw/shipped bytes (1: kvcdn ships raw KV)")
    e.add_argument("--hit-ratio", type=float, default=0.99, help="loads served by edge tiers (0.99)")
    e.add_argument("--replicas", type=int, default=2, help="edge copies of each block (2)")
    e.add_argument("--storage-usd-per-gb-month", type=float, default=0.023, help="($0.023)")
    e.add_argument("--storage-months", type=float, default=1.0, help="how long copies are kept (1)")
    e.add_argument("--from-run", metavar="REPORT_JSON", help="price a `kvcdn loadtest run` report's traffic")
    e.add_argument("--sweep", help=f"comma list of {', '.join(SWEEPS)}: CSV + PNG per sweep")
    e.add_argument("--out", default="kvcdn-economics", help="folder of the sweeps' files (kvcdn-economics)")
    e.add_argument("--markdown", action="store_true", help="tables as Markdown")
    e.add_argument("--json", action="store_true", help="one JSON object")
    e.set_defaults(fn=cmd_economics)


# --- parser --------------------------------------------------------------------------------------


_BULK_HELP = "TCP port of the bulk frame stream on the listen host (0: any free port, -1: off)"
_METRICS_HELP = "HTTP port of the Prometheus /metrics endpoint on the listen host (0: any free port, -1: off)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvcdn", description="A prefill CDN for AI agents.")
    p.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING (default) or ERROR")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("origin", help="run the origin: prefill, store and stream caches")
    s.add_argument("--listen", default="127.0.0.1:7070", help="HOST:PORT (port 0: any free port)")
    s.add_argument("--store", required=True, help="folder of the block and manifest store")
    s.add_argument("--max-document-tokens", type=int, default=32768)
    s.add_argument("--bulk-port", type=int, default=0, help=_BULK_HELP)
    s.add_argument("--metrics-port", type=int, default=0, help=_METRICS_HELP)
    s.add_argument("--port-file", help=argparse.SUPPRESS)
    _add_model_flags(s)
    s.set_defaults(fn=cmd_origin, server=True)

    s = sub.add_parser("edge", help="run an edge: memory tier in front of the origin")
    s.add_argument("--listen", default="127.0.0.1:7080", help="HOST:PORT (port 0: any free port)")
    s.add_argument("--origin", required=True, help="origin HOST:PORT")
    s.add_argument("--mem-bytes", type=parse_size, default=parse_size("1GiB"), help="memory tier size (1GiB)")
    s.add_argument("--disk-dir", help="folder of the disk tier (default: no disk tier)")
    s.add_argument("--disk-bytes", type=parse_size, default=parse_size("10GiB"), help="disk tier size (10GiB)")
    s.add_argument(
        "--peers",
        type=_edges,
        help="every edge of the ring, this one included, as clients list them: blocks this edge does not own "
        "are loaded from their owners before the origin (default: none, always the origin)",
    )
    s.add_argument("--replicas", type=int, default=2, help="owners per block on the ring, as the clients use (2)")
    s.add_argument("--advertise", help="this edge's HOST:PORT in --peers (default: the address it is bound to)")
    s.add_argument(
        "--peer-timeout", type=float, default=1.0, help="seconds to wait for a peer's first frame before the origin (1)"
    )
    s.add_argument("--bulk-port", type=int, default=0, help=_BULK_HELP)
    s.add_argument("--metrics-port", type=int, default=0, help=_METRICS_HELP)
    s.add_argument("--port-file", help=argparse.SUPPRESS)
    s.set_defaults(fn=cmd_edge, server=True)

    s = sub.add_parser("up", help="origin + N edges as processes on loopback, until Ctrl-C")
    s.add_argument("--edges", type=int, default=1)
    s.add_argument("--store", help="store folder (default: a temporary one)")
    s.add_argument("--mem-bytes", type=parse_size, default=parse_size("1GiB"), help="each edge's memory tier (1GiB)")
    s.add_argument(
        "--disk-bytes",
        type=parse_size,
        help="give each edge a disk tier of this size, under STORE/edge-disk (default: none)",
    )
    _add_model_flags(s)
    s.set_defaults(fn=cmd_up)

    s = sub.add_parser("publish", help="compute and store the caches of documents; prints their keys")
    s.add_argument("--origin", required=True, help="origin HOST:PORT")
    s.add_argument("--name", help="document name (default: the file name without extension)")
    s.add_argument("files", nargs="+", metavar="FILE")
    s.set_defaults(fn=cmd_publish)

    for name, fn, help_text in (
        ("fetch", cmd_fetch, "stream and verify a document's cache; print size, time, GB/s"),
        ("ask", cmd_ask, "answer a question about a document from its cache"),
    ):
        s = sub.add_parser(name, help=help_text)
        _add_edges_flag(s)
        s.add_argument("--doc", required=True, metavar="FILE")
        s.add_argument("--json", action="store_true", help="print one JSON object")
        _add_model_flags(s)
        s.set_defaults(fn=fn)
        if name == "ask":
            s.add_argument("--question", required=True)
            s.add_argument("--max-new-tokens", type=int, default=24)
            s.add_argument("--verify", action="store_true", help="also prefill locally and compare")

    s = sub.add_parser("purge", help="remove a document at the origin and, through its feed, at every edge")
    s.add_argument("--origin", required=True, help="origin HOST:PORT")
    s.add_argument("document", metavar="DOCUMENT[@VERSION]")
    s.set_defaults(fn=cmd_purge)

    s = sub.add_parser("stats", help="a table of the edges' state (tiers, hit ratios, origin traffic)")
    _add_edges_flag(s)
    s.set_defaults(fn=cmd_stats)

    s = sub.add_parser("demo", help="the main job on the embedded default model, with a table")
    s.add_argument("--max-new-tokens", type=int, default=24)
    _add_model_flags(s)
    s.set_defaults(fn=cmd_demo)

    s = sub.add_parser("provision", help="fetch and convert the embedded default model")
    s.add_argument("--models-dir", default=os.environ.get("KVCDN_MODELS_DIR"))
    s.set_defaults(fn=cmd_provision)

    s = sub.add_parser("loadtest", help="benchmarks and load tests")
    lt = s.add_subparsers(dest="loadtest_command", required=True, metavar="KIND")
    b = lt.add_parser("bench", help="prefill vs fetch from a warm edge, and fetch vs raw TCP, per length")
    b.add_argument("--lengths", default="256,1024,3774,8192", help="document lengths in tokens")
    b.add_argument("--repeats", type=int, default=3, help="fetches per length (best is reported)")
    b.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    b.add_argument("--json", metavar="FILE", help="also write the rows as JSON (input of `economics --bench`)")
    _add_model_flags(b)
    b.set_defaults(fn=cmd_bench)
    r = lt.add_parser("run", help="live load test: agents fetch Zipf-popular documents through the edges")
    _add_edges_flag(r)
    r.add_argument("--origin", required=True, help="origin HOST:PORT (the test documents are published there first)")
    r.add_argument("--agents", type=int, default=64, help="concurrent agents, or the in-flight cap with --rate (64)")
    r.add_argument("--documents", type=int, default=16, help="documents in the corpus (16)")
    r.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of document popularity (1.1; 0: uniform)")
    r.add_argument("--tokens", default="256:2048", help="document lengths MIN:MAX in tokens (256:2048)")
    r.add_argument("--duration", type=float, default=30.0, help="seconds (30)")
    r.add_argument("--max-fetches", type=int, default=0, help="stop after this many fetches (0: no bound)")
    r.add_argument("--rate", type=float, default=0.0, help="target arrivals/s, Poisson (0: closed loop)")
    r.add_argument("--seed", type=int, default=1)
    r.add_argument("--report-dir", default="loadtest-report", help="where report.{json,md,png} go")
    _add_model_flags(r)
    r.set_defaults(fn=cmd_loadrun)
    n = lt.add_parser("network", help="edge network benchmark: cold herd, Zipf hit ratios per tier, edge memory")
    n.add_argument("--agents", type=int, default=200, help="agents in the cold herd (200)")
    n.add_argument("--herd-tokens", type=int, default=512, help="length of the cold herd's document (512)")
    n.add_argument("--documents", type=int, default=24, help="documents of the Zipf part (24)")
    n.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent (1.1)")
    n.add_argument("--zipf-agents", type=int, default=16, help="agents of the Zipf part (16)")
    n.add_argument("--duration", type=float, default=20.0, help="seconds of the Zipf part (20)")
    n.add_argument("--mem-bytes", type=parse_size, default=parse_size("64MiB"), help="each edge's memory tier (64MiB)")
    n.add_argument("--disk-bytes", type=parse_size, default=parse_size("192MiB"), help="each edge's disk tier (192MiB)")
    n.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    _add_model_flags(n)
    n.set_defaults(fn=cmd_netbench)
    _add_economics(lt)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from kvcdn.wire.tuning import tune_malloc

    tune_malloc()
    args = build_parser().parse_args(argv)
    level = args.log_level.upper()
    if getattr(args, "server", False) and level == "WARNING":
        level = "INFO"
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        code: int = args.fn(args)
        return code
    except KVCDNError as exc:
        print(f"kvcdn {args.command}: {exc.code.name}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
