"""`kvcdn loadtest bench|codecs|run|network|publish|priced|attacks|economics`, registered with kvcdn.cli: each
builds its typed config from the flags, so bad flags fail before any model loads or process starts."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvcdn.errors import InvalidArgument
from kvcdn.flags import add_connection_flags, add_edges_flag, add_origin_flag, parse_count, parse_size
from kvcdn.loadtest.economics import PAPER, PAPER_REUSE, SWEEPS, Inputs, ReuseCurve, geometry_from
from kvcdn.loadtest.economics_report import EconomicsRequest, codecs_from_report, curve_from_bench
from kvcdn.model.options import ModelOptions
from kvcdn.spec.codecs import DEFAULT_ACCEPT, parse_codecs
from kvcdn.spec.geometry import DEFAULT_FRAME_BYTES
from kvcdn.spec.shapes import SHAPES
from kvcdn.wire.auth import read_token
from kvcdn.wire.tls import TLSFiles

if TYPE_CHECKING:  # the benchmarks import torch: only when they run
    from kvcdn.loadtest.bench import BenchConfig
    from kvcdn.loadtest.network import NetworkBenchConfig
    from kvcdn.loadtest.run import LoadConfig

__all__ = ["bench_config", "economics_request", "load_config", "network_config", "register"]


def register(sub: Any) -> None:
    """Add `loadtest` and its kinds to the `kvcdn` subcommands (`sub`: argparse's subparsers)."""
    s = sub.add_parser("loadtest", help="benchmarks and load tests")
    lt = s.add_subparsers(dest="loadtest_command", required=True, metavar="KIND")

    b = lt.add_parser("bench", help="prefill vs fetch from a warm edge, and fetch vs raw TCP, per length")
    b.add_argument("--lengths", default="256,1024,3774,8192", help="document lengths in tokens")
    b.add_argument("--repeats", type=int, default=3, help="fetches per length (best is reported)")
    b.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    b.add_argument("--json", metavar="FILE", help="also write the rows as JSON (input of `economics --bench`)")
    b.add_argument("--edges", type=int, default=1, help="edges on loopback; blocks stream from all at once (1)")
    b.add_argument(
        "--streams-per-run",
        type=int,
        help="connections each edge's share of a fetch is split over (default: by core count, see ClientConfig)",
    )
    b.add_argument(
        "--each-codec",
        action="store_true",
        help="a row for every codec of --codecs, the same documents in each (else: the first the origin holds)",
    )
    b.add_argument(
        "--primary-only",
        action="store_true",
        help="every block from its primary owner, not spread over its owners (to measure what spreading gains)",
    )
    b.add_argument(
        "--unsigned", action="store_true", help="no publisher signatures (to measure what checking them costs)"
    )
    b.add_argument(
        "--tls", action="store_true", help="mutual TLS on every port, test CA (to measure what encryption costs)"
    )
    b.add_argument(
        "--codecs",
        type=parse_codecs,
        default=DEFAULT_ACCEPT,
        help=f"encodings offered and accepted, preferred first ({','.join(DEFAULT_ACCEPT)})",
    )
    b.add_argument(
        "--frame-bytes",
        type=parse_size,
        default=DEFAULT_FRAME_BYTES,
        help="the origin's payload bytes per frame, at most 3 MiB (default 1 MiB)",
    )
    b.add_argument(
        "--geometry",
        choices=sorted(SHAPES),
        help="benchmark random weights of this published shape (= --model random:NAME; nothing to download)",
    )
    ModelOptions.add_flags(b)
    b.set_defaults(run=bench)

    c = lt.add_parser("codecs", help="every KV codec on a real model: ratio, GB/s per core, answer agreement, KL")
    c.add_argument("--dtypes", default="bfloat16,float32", help="cache dtypes to measure (bfloat16,float32)")
    c.add_argument("--tokens", type=int, default=1024, help="first tokens of each bundled document (1024)")
    c.add_argument("--new-tokens", type=int, default=24, help="length of the greedy answers compared (24)")
    c.add_argument(
        "--probe-tokens",
        type=int,
        default=300,
        help="tokens of each document's continuation scored for top-1 and KL, with its question (300)",
    )
    c.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    c.add_argument("--json", metavar="FILE", help="also write the rows as JSON (input of `economics --codecs-report`)")
    ModelOptions.add_flags(c)
    c.set_defaults(run=codecs)

    r = lt.add_parser("run", help="live load test: agents fetch Zipf-popular documents through the edges")
    add_edges_flag(r)
    add_origin_flag(r, "origin HOST:PORT (the test documents are published there first, with --token-file)")
    add_connection_flags(r)
    r.add_argument("--agents", type=int, default=64, help="concurrent agents, or the in-flight cap with --rate (64)")
    r.add_argument("--documents", type=int, default=16, help="documents in the corpus (16)")
    r.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of document popularity (1.1; 0: uniform)")
    r.add_argument("--tokens", default="256:2048", help="document lengths MIN:MAX in tokens (256:2048)")
    r.add_argument("--duration", type=float, default=30.0, help="seconds (30)")
    r.add_argument("--max-fetches", type=int, default=0, help="stop after this many fetches (0: no bound)")
    r.add_argument("--rate", type=float, default=0.0, help="target arrivals/s, Poisson (0: closed loop)")
    r.add_argument("--seed", type=int, default=1)
    r.add_argument("--report-dir", default="loadtest-report", help="where report.{json,md,png} go")
    ModelOptions.add_flags(r)
    r.set_defaults(run=run)

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
    n.add_argument(
        "--parts", default="herd,zipf,memory,pulls", help="which parts to run, a comma list (herd,zipf,memory,pulls)"
    )
    n.add_argument("--pull-tokens", type=int, default=3774, help="length of the cold-pull part's documents (3774)")
    n.add_argument(
        "--pull-repeats", type=int, default=5, help="documents of the cold-pull part, after two warm-up ones (5)"
    )
    ModelOptions.add_flags(n)
    n.set_defaults(run=network)

    p = lt.add_parser(
        "publish", help="a burst of publishes against 1, 2, ... origin workers sharing a PostgreSQL catalog"
    )
    p.add_argument("--workers", default="1,2", help="worker counts to compare (1,2)")
    p.add_argument("--documents", type=int, default=8, help="documents in the burst (8)")
    p.add_argument("--tokens", type=int, default=1024, help="about how long each document is (1024)")
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads of each worker, its share of the CPU (1; a GPU each)"
    )
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    ModelOptions.add_flags(p)
    p.set_defaults(run=publish)

    pr = lt.add_parser(
        "priced", help="agents pay for priced documents through edges; the ledger, receipts and edges' counters agree?"
    )
    pr.add_argument("--edges", type=int, default=2, help="edge processes (2)")
    pr.add_argument("--agents", type=int, default=4, help="agents, each with a grant and a key of its own (4)")
    pr.add_argument("--publishers", type=int, default=2, help="publishers, each with its own prices (2)")
    pr.add_argument("--documents", type=int, default=4, help="priced documents (4)")
    pr.add_argument("--loads", type=int, default=24, help="loads in all (24)")
    pr.add_argument("--tokens", type=int, default=400, help="about how long each document is (400)")
    pr.add_argument("--fee-bps", type=int, default=500, help="the network's share of each price (500: 5%%)")
    pr.add_argument(
        "--ledger", default="", help="a SQLite file or postgresql:// URL to settle in (default: a temporary file)"
    )
    pr.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    ModelOptions.add_flags(pr)
    pr.set_defaults(run=priced)

    a = lt.add_parser(
        "attacks", help="each attack of the trust review, bounded, against real processes: honest fetch and edge RSS"
    )
    a.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    ModelOptions.add_flags(a)
    a.set_defaults(run=attacks)

    e = lt.add_parser(
        "economics",
        help="egress simulator: re-prefill vs reuse vs shipping, break-even egress price, where the cache should live",
    )
    e.add_argument("--paper", action="store_true", help="the preprint's inputs; prints its figures beside ours")
    e.add_argument(
        "--geometry", default="qwen3-4b", help=f"{', '.join(SHAPES)} or a model directory (default qwen3-4b)"
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
    e.add_argument(
        "--codecs-report",
        metavar="JSON",
        help="price every codec `kvcdn loadtest codecs --json` measured: which makes shipping pay",
    )
    e.add_argument("--hit-ratio", type=float, default=0.99, help="loads served by edge tiers (0.99)")
    e.add_argument("--replicas", type=int, default=2, help="edge copies of each block (2)")
    e.add_argument("--storage-usd-per-gb-month", type=float, default=0.023, help="($0.023)")
    e.add_argument("--storage-months", type=float, default=1.0, help="how long copies are kept (1)")
    e.add_argument("--from-run", metavar="REPORT_JSON", help="price a `kvcdn loadtest run` report's traffic")
    e.add_argument(
        "--price-per-load",
        type=float,
        default=0.0,
        metavar="USD",
        help="sell the cache at this price a load: what the agent saves, the publisher and the network earn",
    )
    e.add_argument(
        "--network-fee-bps", type=int, default=500, help="the network's share of each price (500 = 5%%; it pays egress)"
    )
    e.add_argument("--sweep", help=f"comma list of {', '.join(SWEEPS)}: CSV + PNG per sweep")
    e.add_argument("--out", default="kvcdn-economics", help="folder of the sweeps' files (kvcdn-economics)")
    e.add_argument("--markdown", action="store_true", help="tables as Markdown")
    e.add_argument("--json", action="store_true", help="one JSON object")
    e.set_defaults(run=economics)


# --- flags -> typed configs ----------------------------------------------------------------------


def bench_config(args: argparse.Namespace) -> BenchConfig:
    from kvcdn.client.config import default_streams_per_run
    from kvcdn.loadtest.bench import BenchConfig

    try:
        lengths = tuple(int(x) for x in args.lengths.split(","))
    except ValueError:
        raise InvalidArgument(f"--lengths {args.lengths!r} is not a comma list of token counts") from None
    return BenchConfig(
        lengths,
        args.repeats,
        args.edges,
        args.markdown,
        Path(args.json) if args.json else None,
        args.streams_per_run or default_streams_per_run(),
        args.codecs,
        spread=not args.primary_only,
        each_codec=args.each_codec,
        signed=not args.unsigned,
        tls=args.tls,
        frame_bytes=args.frame_bytes,
    )


def load_config(args: argparse.Namespace) -> LoadConfig:
    from kvcdn.loadtest.run import LoadConfig

    low, _, high = args.tokens.partition(":")
    try:
        min_tokens, max_tokens = int(low), int(high or low)
    except ValueError:
        raise InvalidArgument(f"--tokens {args.tokens!r} is not MIN:MAX (e.g. 256:2048)") from None
    return LoadConfig(
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
        token=read_token(args.token_file),
        trust=args.trust,
        tls=TLSFiles.from_args(args),
    )


def network_config(args: argparse.Namespace) -> NetworkBenchConfig:
    from kvcdn.loadtest.network import NetworkBenchConfig

    zipf = replace(
        NetworkBenchConfig().zipf,
        agents=args.zipf_agents,
        documents=args.documents,
        zipf_s=args.zipf,
        duration_s=args.duration,
    )
    return NetworkBenchConfig(
        args.agents,
        args.herd_tokens,
        zipf,
        args.mem_bytes,
        args.disk_bytes,
        args.markdown,
        tuple(p.strip() for p in args.parts.split(",")),
        args.pull_tokens,
        args.pull_repeats,
    )


def economics_request(args: argparse.Namespace) -> EconomicsRequest:
    if args.paper:
        inputs = PAPER
    else:
        if args.gpu_usd_per_hour is not None:
            if not args.prefill_tokens_per_s:
                raise InvalidArgument("--gpu-usd-per-hour needs --prefill-tokens-per-s (the GPU's prefill throughput)")
            price = args.gpu_usd_per_hour / 3600 / args.prefill_tokens_per_s * 1e6
        else:
            price = args.prefill_usd_per_mtok
        if args.reuse_ratio is not None:
            reuse = ReuseCurve(((args.tokens, args.reuse_ratio),), "--reuse-ratio (constant over length)")
        elif args.bench:
            reuse = curve_from_bench(Path(args.bench))
        else:
            reuse = PAPER_REUSE
        geometry = geometry_from(args.geometry, args.dtype)
        if args.layers or args.kv_heads or args.head_dim:
            geometry = replace(
                geometry,
                layers=args.layers or geometry.layers,
                kv_heads=args.kv_heads or geometry.kv_heads,
                head_dim=args.head_dim or geometry.head_dim,
            )
        inputs = Inputs(
            geometry=geometry,
            tokens=args.tokens,
            agents=args.agents or Inputs.agents,
            loads_per_agent=args.loads_per_agent,
            prefill_usd_per_mtok=price,
            reuse=reuse,
            origin_egress_usd_per_gb=args.origin_egress_usd_per_gb,
            edge_egress_usd_per_gb=args.edge_egress_usd_per_gb,
            compression=args.compression,
            hit_ratio=args.hit_ratio,
            replicas=args.replicas,
            storage_usd_per_gb_month=args.storage_usd_per_gb_month,
            storage_months=args.storage_months,
        )
    if args.price_per_load:
        inputs = replace(inputs, price_per_load_usd=args.price_per_load, network_fee_bps=args.network_fee_bps)
    return EconomicsRequest(
        inputs=inputs,
        paper=args.paper,
        from_run=Path(args.from_run) if args.from_run else None,
        agents=args.agents,
        sweeps=tuple(w.strip() for w in args.sweep.split(",")) if args.sweep else (),
        out_dir=Path(args.out),
        markdown=args.markdown,
        json=args.json,
        codecs=codecs_from_report(Path(args.codecs_report), inputs.geometry.dtype) if args.codecs_report else (),
    )


# --- commands ------------------------------------------------------------------------------------


def bench(args: argparse.Namespace) -> int:
    from kvcdn.loadtest.bench import run_bench

    config = bench_config(args)
    options = ModelOptions.from_args(args)
    if args.geometry:
        options = replace(options, model=f"random:{args.geometry}")
    return run_bench(config, options.load(), options)


def codecs(args: argparse.Namespace) -> int:
    from kvcdn.loadtest.codecs import CodecsConfig, run_codecs

    dtypes = tuple(d.strip() for d in args.dtypes.split(",") if d.strip())
    if not dtypes or any(d not in ("bfloat16", "float16", "float32") for d in dtypes):
        raise InvalidArgument(f"--dtypes {args.dtypes!r} is not a comma list of bfloat16, float16, float32")
    config = CodecsConfig(
        dtypes,
        args.tokens,
        args.new_tokens,
        args.probe_tokens,
        args.markdown,
        Path(args.json) if args.json else None,
    )
    options = ModelOptions.from_args(args)
    return run_codecs(config, lambda dtype: replace(options, dtype=dtype).load())


def run(args: argparse.Namespace) -> int:
    from kvcdn.loadtest.run import run_loadtest

    config = load_config(args)
    return run_loadtest(config, ModelOptions.from_args(args).load(), Path(args.report_dir))


def network(args: argparse.Namespace) -> int:
    from kvcdn.loadtest.network import run_network_bench

    config = network_config(args)
    options = ModelOptions.from_args(args)
    return run_network_bench(config, options.load(), options)


def publish(args: argparse.Namespace) -> int:
    from kvcdn.loadtest.publish import PublishBenchConfig, run_publish_bench

    try:
        workers = tuple(int(w) for w in args.workers.split(","))
    except ValueError:
        raise InvalidArgument(f"--workers {args.workers!r} is not a comma list of worker counts, e.g. 1,2") from None
    config = PublishBenchConfig(workers, args.documents, args.tokens, args.threads, args.markdown)
    return run_publish_bench(config, ModelOptions.from_args(args))


def priced(args: argparse.Namespace) -> int:
    from kvcdn.loadtest.priced import PricedConfig, run_priced_report

    config = PricedConfig(
        args.edges, args.agents, args.publishers, args.documents, args.loads, args.tokens, args.fee_bps, args.ledger,
        args.markdown,
    )  # fmt: skip
    return run_priced_report(config, ModelOptions.from_args(args))


def attacks(args: argparse.Namespace) -> int:
    from kvcdn.loadtest.attacks import run_attacks

    options = ModelOptions.from_args(args)
    return run_attacks(options.load(), options, args.markdown)


def economics(args: argparse.Namespace) -> int:
    from kvcdn.loadtest.economics_report import run_economics

    return run_economics(economics_request(args))
