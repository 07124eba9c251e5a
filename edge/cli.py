"""`kvcdn edge`: the edge's command line, registered with kvcdn.cli."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

from kvcdn.edge.config import EdgeConfig
from kvcdn.flags import add_server_flags, add_tls_flags, add_trust_flag, edge_list, parse_size
from kvcdn.wire.auth import read_token
from kvcdn.wire.tls import TLSFiles

__all__ = ["config_from", "register"]


def register(sub: Any) -> None:
    """Add `edge` to the `kvcdn` subcommands (`sub`: argparse's subparsers)."""
    s = sub.add_parser("edge", help="run an edge: memory and disk tiers in front of the origin")
    add_server_flags(s, listen="127.0.0.1:7080")
    s.add_argument("--origin", required=True, help="origin HOST:PORT")
    s.add_argument("--mem-bytes", type=parse_size, default=parse_size("1GiB"), help="memory tier size (1GiB)")
    s.add_argument(
        "--pinned-bytes",
        type=parse_size,
        default=0,
        help="bytes of blocks the streams in flight may hold together, beyond the tiers' budgets; a stream "
        "whose reader stalls is cut when others need room (default: half of --mem-bytes, at least 256MiB)",
    )
    s.add_argument("--disk-dir", help="folder of the disk tier (default: no disk tier)")
    s.add_argument("--disk-bytes", type=parse_size, default=parse_size("10GiB"), help="disk tier size (10GiB)")
    s.add_argument(
        "--peers",
        type=edge_list,
        help="every edge of the ring, this one included, as clients list them (HOST:PORT[,...] or @FILE of them, "
        "one a line): blocks this edge does not own are loaded from their owners before the origin (default: "
        "none, always the origin); a file or a DNS name is followed while the edge runs",
    )
    s.add_argument(
        "--peers-refresh", type=float, default=5.0, help="seconds between reads of a --peers file or DNS name (5)"
    )
    s.add_argument("--replicas", type=int, default=2, help="owners per block on the ring, as the clients use (2)")
    add_trust_flag(s)
    add_tls_flags(s)
    s.add_argument(
        "--token-file",
        type=Path,
        help="this edge's own token (role edge): for the origin's invalidation feed and, where reads are "
        "closed, for reads from the origin and the peers",
    )
    s.add_argument(
        "--tokens",
        type=Path,
        help="file of `ROLE TOKEN` lines: close reads here, to callers with one of these tokens "
        "(agents: reader; peers: edge); default: reads are open",
    )
    s.add_argument("--advertise", help="this edge's HOST:PORT in --peers (default: the address it is bound to)")
    s.add_argument(
        "--peer-timeout", type=float, default=1.0, help="seconds to wait for a peer's first frame before the origin (1)"
    )
    s.add_argument(
        "--grant-issuers",
        type=lambda v: tuple(Path(p) for p in v.split(",") if p),
        default=(),
        help="public keys (.pub, comma-separated) of the grant issuers this edge trusts: it then serves priced "
        "documents to agents with their grants and signs a receipt per load (default: no priced documents)",
    )
    s.add_argument("--receipt-key", type=Path, help="this edge's receipt signing key (kvcdn keys generate)")
    s.add_argument(
        "--receipts", type=Path, help="folder of the receipt journal and of outbox/batch-*.pb for kvcdn ledger ingest"
    )
    s.add_argument("--receipt-batch", type=int, default=100, help="receipts per batch shipped to the outbox (100)")
    s.add_argument(
        "--receipt-batch-s", type=float, default=60.0, help="seconds at most a receipt waits to be shipped (60)"
    )
    s.add_argument("--revocations", type=Path, help="file of revoked grant ids, one a line, followed while running")
    s.add_argument(
        "--grpc-pulls",
        action="store_true",
        help="load blocks from peers and the origin over gRPC, not their bulk ports (to compare the two)",
    )
    s.set_defaults(run=run)


def config_from(args: argparse.Namespace) -> EdgeConfig:
    return EdgeConfig(
        origin=args.origin,
        listen=args.listen,
        mem_bytes=args.mem_bytes,
        pinned_bytes=args.pinned_bytes,
        disk_dir=Path(args.disk_dir) if args.disk_dir else None,
        disk_bytes=args.disk_bytes,
        bulk_port=args.bulk_port,
        metrics_port=args.metrics_port,
        peers=tuple(args.peers or ()),
        replicas=args.replicas,
        membership_refresh_s=args.peers_refresh,
        advertise=args.advertise or "",
        peer_timeout_s=args.peer_timeout,
        bulk_pulls=not args.grpc_pulls,
        trust=args.trust,
        tls=TLSFiles.from_args(args),
        token=read_token(args.token_file),
        tokens=args.tokens,
        rate_limit=args.rate_limit,
        grant_issuers=args.grant_issuers,
        receipt_key=args.receipt_key,
        receipts_dir=args.receipts,
        receipt_batch=args.receipt_batch,
        receipt_batch_s=args.receipt_batch_s,
        revocations=args.revocations,
    )


def run(args: argparse.Namespace) -> int:
    from kvcdn.edge.server import run_edge

    asyncio.run(run_edge(config_from(args), args.port_file))
    return 0
