"""`kvcdn origin`: the origin's command line, registered with kvcdn.cli."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

from kvcdn.flags import add_server_flags, add_tls_flags, parse_size
from kvcdn.model.options import ModelOptions
from kvcdn.origin.config import OriginConfig
from kvcdn.spec.codecs import parse_codecs
from kvcdn.spec.geometry import DEFAULT_FRAME_BYTES
from kvcdn.wire.tls import TLSFiles

__all__ = ["config_from", "register"]


def register(sub: Any) -> None:
    """Add `origin` to the `kvcdn` subcommands (`sub`: argparse's subparsers)."""
    s = sub.add_parser("origin", help="run the origin: prefill, store and stream caches")
    add_server_flags(s, listen="127.0.0.1:7070")
    s.add_argument("--store", required=True, help="folder of the block and manifest store")
    s.add_argument("--max-document-tokens", type=int, default=32768, help="longest document accepted (32768)")
    s.add_argument(
        "--codecs",
        type=lambda v: parse_codecs(v, allow_empty=True),
        default=("lossless",),
        help="encodings every document is offered in besides raw, unless its publisher names others "
        "(lossless; '' for raw only; lossy: int8, fp8, int4)",
    )
    s.add_argument(
        "--tokens",
        help="file of `ROLE TOKEN` lines: Publish/Purge need a publisher token, Watch an edge token "
        "(default: anyone who reaches the port may)",
    )
    s.add_argument(
        "--insecure",
        action="store_true",
        help="listen beyond loopback without --tokens (anyone who reaches the port may publish and purge); "
        "without this flag the origin refuses to start that way",
    )
    s.add_argument(
        "--closed-reads",
        action="store_true",
        help="reads need a token of --tokens too (agents: reader; edges: edge); default: reads are open",
    )
    s.add_argument(
        "--store-bytes",
        type=parse_size,
        default=0,
        help="byte budget of the block store: a publish that could exceed it is refused (default: none)",
    )
    s.add_argument(
        "--signing-key",
        help="the publisher's Ed25519 key (PEM, `kvcdn keys generate`): sign every block info and manifest",
    )
    s.add_argument(
        "--frame-bytes",
        type=parse_size,
        default=DEFAULT_FRAME_BYTES,
        help="payload bytes per streamed frame, at most 3 MiB (default 1 MiB; larger frames cost a "
        "receiver less per byte, smaller ones resume closer to where a stream broke)",
    )
    s.add_argument(
        "--manifest-ttl",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="a signed answer for a document's latest version is valid this long (default: 3600)",
    )
    s.add_argument(
        "--catalog",
        default="",
        metavar="URL",
        help="PostgreSQL URL of a catalog shared by several origin workers (postgresql://USER@HOST/DB): "
        "manifests, invalidations and the publish queue live there, blocks in --store, which the workers "
        "share; publishes are spread over every worker (default: this origin keeps its own)",
    )
    s.add_argument("--worker", default="", help="this worker's name in the shared publish queue (default: the host's)")
    add_tls_flags(s)
    ModelOptions.add_flags(s)
    s.set_defaults(run=run)


def config_from(args: argparse.Namespace) -> OriginConfig:
    m = ModelOptions.from_args(args)
    return OriginConfig(
        store_dir=Path(args.store),
        listen=args.listen,
        model=m.model,
        dtype=m.dtype,
        device=m.device,
        models_dir=m.models_dir,
        max_document_tokens=args.max_document_tokens,
        codecs=args.codecs,
        signing_key=Path(args.signing_key) if args.signing_key else None,
        manifest_ttl_s=args.manifest_ttl,
        rate_limit=args.rate_limit,
        tokens=Path(args.tokens) if args.tokens else None,
        closed_reads=args.closed_reads,
        insecure=args.insecure,
        store_bytes=args.store_bytes,
        frame_bytes=args.frame_bytes,
        tls=TLSFiles.from_args(args),
        bulk_port=args.bulk_port,
        metrics_port=args.metrics_port,
        catalog=args.catalog,
        worker=args.worker,
    )


def run(args: argparse.Namespace) -> int:
    from kvcdn.origin.server import run_origin

    asyncio.run(run_origin(config_from(args), args.port_file))
    return 0
