"""`kvcdn ledger`: the ledger's command line (ingest, balances, statement, flags, reverse, reconcile),
registered by kvcdn.ops.cli."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import sys
import time
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError

from kvcdn.errors import InvalidArgument
from kvcdn.flags import add_connection_flags, add_edges_flag

__all__ = ["register_ledger"]


def register_ledger(sub: Any) -> None:
    """Add `ledger` to the `kvcdn` subcommands (`sub`: argparse's subparsers)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--db",
        default=os.environ.get("KVCDN_LEDGER", "kvcdn-ledger.db"),
        help="the ledger: a SQLite file (default kvcdn-ledger.db) or a postgresql:// URL (env KVCDN_LEDGER)",
    )
    s = sub.add_parser("ledger", help="settle the receipts edges sign: ingest, balances, statements, reversals")
    ledger = s.add_subparsers(
        dest="ledger_command", required=True, metavar="ingest|balances|statement|flags|reverse|reconcile"
    )
    i = ledger.add_parser("ingest", parents=[common], help="check and settle files of receipts (ReceiptBatch)")
    i.add_argument("batches", nargs="+", metavar="BATCH", help="a file holding one serialized ReceiptBatch")
    i.add_argument(
        "--edge-keys",
        default=os.environ.get("KVCDN_RECEIPT_KEYS"),
        help="the edges' receipt keys (.pub files), comma-separated (env KVCDN_RECEIPT_KEYS)",
    )
    i.add_argument(
        "--fee-bps",
        type=int,
        help="the network's share of each price, in basis points (kept in the ledger; 0 at first)",
    )
    i.set_defaults(run=ledger_ingest)
    ledger.add_parser("balances", parents=[common], help="every account's balance").set_defaults(run=ledger_balances)
    ledger.add_parser("flags", parents=[common], help="receipts and checkpoints set aside, and why").set_defaults(
        run=ledger_flags
    )
    st = ledger.add_parser("statement", parents=[common], help="what a publisher earned in a period")
    st.add_argument("--publisher", required=True, help="the publisher's account (the pay_to of its prices)")
    st.add_argument("--from", dest="start", help="first day (UTC, YYYY-MM-DD; default: the beginning)")
    st.add_argument("--to", dest="end", help="day after the last (UTC, YYYY-MM-DD; default: now)")
    st.set_defaults(run=ledger_statement)
    r = ledger.add_parser("reverse", parents=[common], help="post the negation of a transaction (a correction)")
    r.add_argument("transaction", type=int)
    r.add_argument("--memo", required=True, help="why (kept with the reversal)")
    r.set_defaults(run=ledger_reverse)
    rc = ledger.add_parser(
        "reconcile", parents=[common], help="the receipts held against the edges' own counters; exit 1 on a difference"
    )
    add_edges_flag(rc)
    add_connection_flags(rc, trust=False)
    rc.set_defaults(run=ledger_reconcile)


def _ms(day: str | None, default: int, flag: str) -> int:
    if not day:
        return default
    try:
        when = datetime.datetime.fromisoformat(day).replace(tzinfo=datetime.UTC)
    except ValueError:
        raise InvalidArgument(f"{flag} {day!r} is not a day such as 2026-12-01") from None
    return int(when.timestamp() * 1000)


def ledger_ingest(args: argparse.Namespace) -> int:
    from rich.console import Console

    from kvcdn.ops.ledger import Ledger
    from kvcdn.spec.provenance import TrustStore
    from kvcdn.v1 import kvcdn_pb2 as pb

    if not args.edge_keys:
        raise InvalidArgument("--edge-keys names the edges' receipt keys (.pub files; or set KVCDN_RECEIPT_KEYS)")
    keys = TrustStore.from_files([Path(p) for p in args.edge_keys.split(",") if p]).keys
    with Ledger(args.db, args.fee_bps) as ledger:
        for path in args.batches:
            try:
                batch = pb.ReceiptBatch.FromString(Path(path).read_bytes())
            except (OSError, DecodeError) as exc:
                raise InvalidArgument(f"{path}: not a readable ReceiptBatch ({exc})") from None
            report = ledger.ingest(batch, keys)  # a batch is one database transaction
            print(
                f"{path}: {report.posted} posted, {report.stored} new, {report.duplicates} counted already, "
                f"{len(report.flagged)} flagged"
            )
            for edge, seq, why in report.flagged:
                Console(stderr=True).print(f"  flagged: edge {edge} receipt {seq}: {why}", markup=False)
    return 0


def ledger_balances(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from kvcdn.ops.ledger import Ledger

    with Ledger(args.db) as ledger:
        balances, unbalanced = ledger.balances(), ledger.unbalanced()
    table = Table("account", "asset", "balance", title=f"kvcdn ledger {args.db}")
    for (account, asset), amount in sorted(balances.items()):
        table.add_row(account, asset, f"{amount:,}")
    Console().print(table)
    if unbalanced:
        print(f"transactions whose entries do not sum to zero: {unbalanced}", file=sys.stderr)
        return 1
    return 0


def ledger_flags(args: argparse.Namespace) -> int:
    from kvcdn.ops.ledger import Ledger

    with Ledger(args.db) as ledger:
        for edge, seq, why in ledger.flags():
            print(f"edge {edge} receipt {seq}: {why}")
    return 0


def ledger_statement(args: argparse.Namespace) -> int:
    from kvcdn.ops.ledger import Ledger

    start, end = _ms(args.start, 0, "--from"), _ms(args.end, int(time.time() * 1000), "--to")
    with Ledger(args.db) as ledger:
        s = ledger.statement(args.publisher, start, end)
    amounts = ", ".join(f"{amount:,} {asset}" for asset, amount in sorted(s.amounts.items())) or "nothing"
    print(f"publisher {s.publisher}: {s.receipts} receipts, earned {amounts}")
    print(f"merkle root of the receipts settled: {s.root.hex()}")
    return 0


def ledger_reverse(args: argparse.Namespace) -> int:
    from kvcdn.ops.ledger import Ledger

    with Ledger(args.db) as ledger:
        print(f"transaction {ledger.reverse(args.transaction, args.memo)} reverses {args.transaction}")
    return 0


def ledger_reconcile(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from kvcdn.ops.ledger import Ledger
    from kvcdn.ops.reconcile import counters_of, reconcile
    from kvcdn.spec.placement import read_edges
    from kvcdn.wire.auth import read_token
    from kvcdn.wire.tls import TLSFiles

    edges = list(read_edges(args.edges))
    counters = asyncio.run(counters_of(edges, read_token(args.token_file), TLSFiles.from_args(args)))
    with Ledger(args.db) as ledger:
        rows = reconcile(ledger, counters)
    table = Table("edge", "receipt key", "signed", "in ledger", "bytes sent", "bytes receipted", "charged", "verdict")
    for r in rows:
        c = r.counters
        charged = ", ".join(f"{v:,} {a}" for a, v in sorted(r.charged.items())) or "-"
        verdict = "; ".join(r.problems) or "matches"
        table.add_row(
            c.address, c.edge_key, str(r.signed), str(r.receipts), f"{c.charged_bytes:,}", f"{r.receipted_bytes:,}",
            charged, verdict,
        )  # fmt: skip
    Console().print(table)
    if not rows:
        print("no edge among --edges signs receipts (none takes grants)", file=sys.stderr)
        return 1
    differ = [r.counters.address for r in rows if r.problems]
    if differ:
        print(f"differences at {', '.join(differ)}: see the verdicts above", file=sys.stderr)
        return 1
    print(f"all {len(rows)} receipt key(s) match the ledger: {sum(r.receipts for r in rows)} receipts")
    return 0
