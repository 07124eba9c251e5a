"""`kvcdn ledger`: settling the receipts edges sign (kvcdn.spec.receipts) in double entry.

One schema on two engines: an embedded SQLite file by default, PostgreSQL by URL for scale. Ingest
checks every receipt (a trusted edge key, its signature, its place in the edge's chain) and is
idempotent: the same receipt twice changes nothing, and a second receipt for one load (the same
agent and idempotency key, as a retried load gets) is kept in the chain but charged once. What fails
a check is kept aside as a *flag*, with why, and never posted. Each charged receipt posts one
transaction whose entries sum to zero: the agent's account debited the price, the publisher's payable
credited the price less the network's fee, the network's fee account the fee. A posting is corrected
only by a reversing transaction. A statement names, per publisher and period, the receipts it
settles, what they add up to and their Merkle root, which an edge's signed checkpoint can be checked
against."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from kvcdn.errors import InvalidArgument, NotFound
from kvcdn.spec.receipts import checkpoint_problem, merkle_root, receipt_hash, receipt_problem
from kvcdn.v1 import kvcdn_pb2 as pb

__all__ = ["IngestReport", "Ledger", "Statement"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS ledger_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS ledger_receipts (
  edge TEXT NOT NULL, seq BIGINT NOT NULL, hash TEXT NOT NULL UNIQUE, prev_hash TEXT NOT NULL,
  idempotency_key TEXT NOT NULL, agent TEXT NOT NULL, publisher TEXT NOT NULL, document TEXT NOT NULL,
  version INTEGER NOT NULL, blocks INTEGER NOT NULL, bytes BIGINT NOT NULL, tokens BIGINT NOT NULL,
  price BIGINT NOT NULL, asset TEXT NOT NULL, time_ms BIGINT NOT NULL, charged INTEGER NOT NULL,
  body {bytes} NOT NULL, PRIMARY KEY (edge, seq));
CREATE INDEX IF NOT EXISTS ledger_receipts_load ON ledger_receipts (agent, idempotency_key);
CREATE INDEX IF NOT EXISTS ledger_receipts_publisher ON ledger_receipts (publisher, time_ms);
CREATE TABLE IF NOT EXISTS ledger_flags (
  hash TEXT PRIMARY KEY, edge TEXT NOT NULL, seq BIGINT NOT NULL, problem TEXT NOT NULL, body {bytes} NOT NULL);
CREATE TABLE IF NOT EXISTS ledger_transactions (
  id {serial}, receipt TEXT UNIQUE, reverses BIGINT UNIQUE, time_ms BIGINT NOT NULL, memo TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS ledger_entries (
  transaction_id BIGINT NOT NULL, account TEXT NOT NULL, asset TEXT NOT NULL, amount BIGINT NOT NULL);
CREATE INDEX IF NOT EXISTS ledger_entries_account ON ledger_entries (account, asset);
CREATE TABLE IF NOT EXISTS ledger_checkpoints (
  edge TEXT NOT NULL, first_seq BIGINT NOT NULL, last_seq BIGINT NOT NULL, root TEXT NOT NULL,
  body {bytes} NOT NULL, PRIMARY KEY (edge, first_seq, last_seq));
"""


@dataclass
class IngestReport:
    posted: int = 0
    """Receipts charged (a transaction each)."""
    stored: int = 0
    """Receipts new to the ledger, charged or not."""
    duplicates: int = 0
    """Receipts the ledger already held, or second receipts of one load: counted once."""
    flagged: list[tuple[str, int, str]] = field(default_factory=list)
    """(edge, seq, why) of each receipt or checkpoint set aside."""


@dataclass(frozen=True)
class Statement:
    publisher: str
    start_ms: int
    end_ms: int
    receipts: int
    amounts: dict[str, int]
    """Credited to the publisher's payable, by asset (net of the fee)."""
    root: bytes
    """Merkle root over the settled receipts' hashes, ordered by edge and sequence number."""


class _Db:
    """A DB-API connection to SQLite or PostgreSQL, with `%s` placeholders on both."""

    def __init__(self, url: str) -> None:
        self.postgres = url.startswith(("postgresql://", "postgres://"))
        if self.postgres:
            import psycopg

            self.conn: Any = psycopg.connect(url, autocommit=True)  # transactions are explicit
        else:
            path = Path(url.removeprefix("sqlite:///").removeprefix("sqlite://"))
            path.parent.mkdir(parents=True, exist_ok=True)
            self.conn = sqlite3.connect(path, isolation_level=None)
            self.conn.execute("PRAGMA journal_mode=WAL")

    def schema(self) -> str:
        kinds = {"bytes": "BYTEA", "serial": "BIGSERIAL PRIMARY KEY"}
        if not self.postgres:
            kinds = {"bytes": "BLOB", "serial": "INTEGER PRIMARY KEY AUTOINCREMENT"}
        return _SCHEMA.format(**kinds)

    def run(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        cur = self.conn.execute(sql if self.postgres else sql.replace("%s", "?"), tuple(params))
        return list(cur.fetchall()) if cur.description else []

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        if self.postgres:
            with self.conn.transaction():
                yield
            return
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")


class Ledger:
    """A ledger in `url` (a file path or sqlite:///PATH, or postgresql://...)."""

    def __init__(self, url: str, fee_bps: int | None = None) -> None:
        self.db = _Db(url)
        with self.db.transaction():
            for statement in self.db.schema().split(";"):
                if statement.strip():
                    self.db.run(statement)
            if fee_bps is not None:
                if not 0 <= fee_bps <= 10_000:
                    raise InvalidArgument("--fee-bps is the network's share in basis points: 0 to 10000")
                self.db.run("DELETE FROM ledger_meta WHERE name = 'fee_bps'")
                self.db.run("INSERT INTO ledger_meta VALUES ('fee_bps', %s)", (str(fee_bps),))
            rows = self.db.run("SELECT value FROM ledger_meta WHERE name = 'fee_bps'")
        self.fee_bps = int(rows[0][0]) if rows else 0

    def close(self) -> None:
        self.db.conn.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- ingest ------------------------------------------------------------------------------------

    def ingest(self, batch: pb.ReceiptBatch, keys: Mapping[str, Ed25519PublicKey]) -> IngestReport:
        """Check and settle a batch (one transaction: all of it or nothing); returns what happened."""
        report = IngestReport()
        with self.db.transaction():
            for receipt in sorted(batch.receipts, key=lambda r: (r.edge, r.seq)):
                self._receipt(receipt, keys, report)
            for checkpoint in batch.checkpoints:
                self._checkpoint(checkpoint, keys, report)
        return report

    def _flag(self, report: IngestReport, key: str, edge: str, seq: int, why: str, body: bytes) -> None:
        report.flagged.append((edge, seq, why))
        self.db.run(
            "INSERT INTO ledger_flags VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING", (key, edge, seq, why, body)
        )

    def _receipt(self, r: pb.Receipt, keys: Mapping[str, Ed25519PublicKey], report: IngestReport) -> None:
        body, digest = r.SerializeToString(), receipt_hash(r).hex()
        problem = receipt_problem(r, keys)
        held = self.db.run("SELECT hash FROM ledger_receipts WHERE edge = %s AND seq = %s", (r.edge, r.seq))
        if not problem and held:
            if held[0][0] == digest:
                report.duplicates += 1
                return
            problem = f"receipt {r.seq} of edge {r.edge} differs from the one held: the edge forked its chain"
        if not problem:
            before = self.db.run("SELECT hash FROM ledger_receipts WHERE edge = %s AND seq = %s", (r.edge, r.seq - 1))
            after = self.db.run(
                "SELECT prev_hash FROM ledger_receipts WHERE edge = %s AND seq = %s", (r.edge, r.seq + 1)
            )
            if before and before[0][0] != r.prev_hash.hex():
                problem = f"broken chain: its prev_hash is not the hash of receipt {r.seq - 1} of edge {r.edge}"
            elif after and after[0][0] != digest:
                problem = f"broken chain: receipt {r.seq + 1} of edge {r.edge} does not link to it"
        if problem:
            self._flag(report, digest, r.edge, r.seq, problem, body)
            return
        charged = not self.db.run(
            "SELECT 1 FROM ledger_receipts WHERE agent = %s AND idempotency_key = %s AND charged = 1",
            (r.agent, r.idempotency_key),
        )
        self.db.run(
            "INSERT INTO ledger_receipts VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (
                *(r.edge, r.seq, digest, r.prev_hash.hex(), r.idempotency_key, r.agent, r.publisher, r.document),
                *(r.version, r.blocks, r.bytes, r.tokens, r.price, r.asset, r.time_ms, int(charged), body),
            ),
        )
        report.stored += 1
        if not charged:
            report.duplicates += 1
            return
        if r.price:
            fee = r.price * self.fee_bps // 10_000
            entries = [(f"agent:{r.agent}", -r.price), (f"publisher:{r.publisher}", r.price - fee)]
            self._post(
                digest, None, r.time_ms, f"{r.document} v{r.version}", [*entries, ("network:fees", fee)], r.asset
            )
            report.posted += 1

    def _post(
        self,
        receipt: str | None,
        reverses: int | None,
        time_ms: int,
        memo: str,
        entries: list[tuple[str, int]],
        asset: str,
    ) -> int:
        assert sum(amount for _, amount in entries) == 0, "a transaction's entries sum to zero"
        (tx,) = self.db.run(
            "INSERT INTO ledger_transactions (receipt, reverses, time_ms, memo) VALUES (%s, %s, %s, %s) RETURNING id",
            (receipt, reverses, time_ms, memo),
        )[0]
        for account, amount in entries:
            if amount:
                self.db.run("INSERT INTO ledger_entries VALUES (%s, %s, %s, %s)", (tx, account, asset, amount))
        return int(tx)

    def _checkpoint(self, c: pb.Checkpoint, keys: Mapping[str, Ed25519PublicKey], report: IngestReport) -> None:
        body = c.SerializeToString()
        problem = checkpoint_problem(c, keys)
        if not problem:
            root = self.root(c.edge, c.first_seq, c.last_seq)
            if root is not None and root != c.root:
                problem = f"checkpoint {c.first_seq}-{c.last_seq}: its Merkle root is not that of the receipts held"
        if problem:
            self._flag(report, body.hex()[:64], c.edge, c.last_seq, problem, body)
            return
        self.db.run(
            "INSERT INTO ledger_checkpoints VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
            (c.edge, c.first_seq, c.last_seq, c.root.hex(), body),
        )

    # --- reading -----------------------------------------------------------------------------------

    def root(self, edge: str, first_seq: int, last_seq: int) -> bytes | None:
        """The Merkle root of an edge's receipts first..last, or None while some are missing."""
        rows = self.db.run(
            "SELECT hash FROM ledger_receipts WHERE edge = %s AND seq >= %s AND seq <= %s ORDER BY seq",
            (edge, first_seq, last_seq),
        )
        if len(rows) != last_seq - first_seq + 1:
            return None
        return merkle_root([bytes.fromhex(h) for (h,) in rows])

    def balances(self) -> dict[tuple[str, str], int]:
        """Every account's balance, by (account, asset)."""
        rows = self.db.run("SELECT account, asset, SUM(amount) FROM ledger_entries GROUP BY account, asset")
        return {(a, asset): int(total) for a, asset, total in rows}

    def unbalanced(self) -> list[int]:
        """Transactions whose entries do not sum to zero (none, unless the database was edited)."""
        rows = self.db.run("SELECT transaction_id FROM ledger_entries GROUP BY transaction_id HAVING SUM(amount) <> 0")
        return [int(t) for (t,) in rows]

    def flags(self) -> list[tuple[str, int, str]]:
        return [
            (e, int(s), p) for e, s, p in self.db.run("SELECT edge, seq, problem FROM ledger_flags ORDER BY edge, seq")
        ]

    def statement(self, publisher: str, start_ms: int = 0, end_ms: int = 2**62) -> Statement:
        """What `publisher` was credited in [start_ms, end_ms): the receipts charged in it (their
        count and Merkle root) and, per asset, those credits net of reversals posted in it."""
        account = f"publisher:{publisher}"
        rows = self.db.run(
            "SELECT r.hash FROM ledger_receipts r JOIN ledger_transactions t ON t.receipt = r.hash "
            "JOIN ledger_entries e ON e.transaction_id = t.id AND e.account = %s "
            "WHERE t.time_ms >= %s AND t.time_ms < %s ORDER BY r.edge, r.seq",
            (account, start_ms, end_ms),
        )
        sums = self.db.run(
            "SELECT e.asset, SUM(e.amount) FROM ledger_entries e JOIN ledger_transactions t ON t.id = e.transaction_id "
            "WHERE e.account = %s AND t.time_ms >= %s AND t.time_ms < %s GROUP BY e.asset",
            (account, start_ms, end_ms),
        )
        root = merkle_root([bytes.fromhex(h) for (h,) in rows])
        return Statement(publisher, start_ms, end_ms, len(rows), {a: int(x) for a, x in sums}, root)

    def reverse(self, transaction: int, memo: str) -> int:
        """Post the negation of `transaction` (the one way to correct the ledger); its id."""
        with self.db.transaction():
            found = self.db.run("SELECT reverses FROM ledger_transactions WHERE id = %s", (transaction,))
            if not found:
                raise NotFound(f"the ledger has no transaction {transaction}")
            if found[0][0] is not None:
                raise InvalidArgument(f"transaction {transaction} is itself a reversal, and a reversal is final")
            if self.db.run("SELECT id FROM ledger_transactions WHERE reverses = %s", (transaction,)):
                raise InvalidArgument(f"transaction {transaction} has been reversed already")
            entries = self.db.run(
                "SELECT account, asset, amount FROM ledger_entries WHERE transaction_id = %s", (transaction,)
            )
            asset = entries[0][1] if entries else ""
            now = int(time.time() * 1000)
            return self._post(None, transaction, now, memo, [(a, -int(x)) for a, _, x in entries], asset)
