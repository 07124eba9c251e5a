"""Receipts and the ledger: Merkle proofs (RFC 6962) verify for every leaf and fail for any other;
a receipt verifies, and one altered field, an unknown edge key, a broken or forked chain are flagged
and never posted; the ledger's totals equal the receipts' exactly, every transaction sums to zero,
the same batch twice or a second receipt of one load is counted once, a statement's Merkle root is
the receipts', corrections are reversals; the same tests on SQLite and on a real PostgreSQL server."""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from kvcdn.errors import InvalidArgument, NotFound
from kvcdn.ops.ledger import Ledger
from kvcdn.spec.provenance import generate_key
from kvcdn.spec.receipts import (
    GENESIS,
    ReceiptSigner,
    checkpoint_statement,
    inclusion_proof,
    merkle_root,
    receipt_hash,
    receipt_problem,
    verify_inclusion,
)
from kvcdn.v1 import kvcdn_pb2 as pb

FEE_BPS = 500  # the network keeps 5%


def test_merkle_proofs_verify_every_leaf_and_nothing_else() -> None:
    import hashlib

    assert merkle_root([]) == hashlib.sha256(b"").digest()
    assert merkle_root([b"a"]) == hashlib.sha256(b"\x00a").digest()
    for n in range(1, 18):
        leaves = [bytes([i]) * 32 for i in range(n)]
        root = merkle_root(leaves)
        for i in range(n):
            proof = inclusion_proof(leaves, i)
            assert len(proof) <= n.bit_length()
            assert verify_inclusion(leaves[i], i, n, proof, root)
            assert not verify_inclusion(b"\xff" * 32, i, n, proof, root)  # another leaf
            if proof:
                tampered = [*proof[:-1], bytes(32)]
                assert not verify_inclusion(leaves[i], i, n, tampered, root)  # another sibling
            if n > 1:
                assert not verify_inclusion(leaves[i], (i + 1) % n, n, proof, root)  # another place


def _load(agent: str, publisher: str, price: int, n: int, key: str = "") -> pb.Receipt:
    return pb.Receipt(
        grant_id=f"grant-{agent}",
        idempotency_key=key or uuid.uuid4().hex,
        agent=agent,
        publisher=publisher,
        document=f"doc{n % 3}",
        version=1,
        blocks=4,
        bytes=1 << 20,
        tokens=128,
        price=price,
        asset="USDC",
    )


def test_a_receipt_verifies_and_one_altered_field_does_not() -> None:
    edge = ReceiptSigner(Ed25519PrivateKey.generate())
    keys = {edge.edge: edge.public_key}
    first = edge.issue(_load("a", "p", 100, 0))
    second = edge.issue(_load("a", "p", 100, 1))
    assert (first.seq, first.prev_hash, second.seq, second.prev_hash) == (1, GENESIS, 2, receipt_hash(first))
    assert receipt_problem(first, keys) == receipt_problem(second, keys) == ""
    altered = pb.Receipt()
    altered.CopyFrom(second)
    altered.price = 1
    assert "signature does not verify" in receipt_problem(altered, keys)
    stranger = ReceiptSigner(Ed25519PrivateKey.generate()).issue(_load("a", "p", 100, 0))
    assert "not trusted" in receipt_problem(stranger, keys)


def _edges(n: int) -> list[ReceiptSigner]:
    return [ReceiptSigner(Ed25519PrivateKey.generate()) for _ in range(n)]


def _keys(edges: list[ReceiptSigner]) -> dict[str, Ed25519PublicKey]:
    return {e.edge: e.public_key for e in edges}


def test_ledger_totals_equal_the_receipts_and_every_transaction_balances(ledger_url: str) -> None:
    edges = _edges(2)
    receipts = [
        edges[i % 2].issue(_load(f"agent{i % 3}", f"pub{i % 2}", price=100 * (1 + i % 4), n=i)) for i in range(24)
    ]
    ledger = Ledger(ledger_url, fee_bps=FEE_BPS)
    try:
        report = ledger.ingest(pb.ReceiptBatch(receipts=receipts), _keys(edges))
        assert (report.posted, report.stored, report.duplicates, report.flagged) == (24, 24, 0, [])
        balances = ledger.balances()
        for agent in ("agent0", "agent1", "agent2"):
            spent = sum(r.price for r in receipts if r.agent == agent)
            assert balances[(f"agent:{agent}", "USDC")] == -spent
        fees = sum(r.price * FEE_BPS // 10_000 for r in receipts)
        assert balances[("network:fees", "USDC")] == fees
        assert sum(balances.values()) == 0 and ledger.unbalanced() == []
        for publisher in ("pub0", "pub1"):
            mine = sorted((r for r in receipts if r.publisher == publisher), key=lambda r: (r.edge, r.seq))
            earned = sum(r.price - r.price * FEE_BPS // 10_000 for r in mine)
            statement = ledger.statement(publisher)
            assert (statement.receipts, statement.amounts) == (len(mine), {"USDC": earned})
            assert statement.root == merkle_root([receipt_hash(r) for r in mine])
            assert balances[(f"publisher:{publisher}", "USDC")] == earned
    finally:
        ledger.close()


def test_replays_and_second_receipts_of_one_load_are_counted_once(ledger_url: str) -> None:
    (edge,) = _edges(1)
    receipts = [edge.issue(_load("a", "p", 250, i)) for i in range(5)]
    retried = edge.issue(_load("a", "p", 250, 9, key=receipts[2].idempotency_key))  # the agent retried load 3
    ledger = Ledger(ledger_url)
    try:
        first = ledger.ingest(pb.ReceiptBatch(receipts=receipts), _keys([edge]))
        before = ledger.balances()
        again = ledger.ingest(pb.ReceiptBatch(receipts=[*receipts, retried]), _keys([edge]))
        assert (first.posted, again.posted, again.stored, again.duplicates) == (5, 0, 1, 6)
        assert ledger.balances() == before == {("agent:a", "USDC"): -1250, ("publisher:p", "USDC"): 1250}
    finally:
        ledger.close()


def test_broken_forked_and_unknown_receipts_are_flagged_and_never_posted(ledger_url: str) -> None:
    key = Ed25519PrivateKey.generate()
    edge, stranger = ReceiptSigner(key), ReceiptSigner(Ed25519PrivateKey.generate())
    good = [edge.issue(_load("a", "p", 100, i)) for i in range(3)]
    # The edge's chain forks: a receipt 3 other than the one it issued, properly signed.
    fork = ReceiptSigner(key, seq=2, prev_hash=receipt_hash(good[1])).issue(_load("a", "p", 999, 7))
    # A receipt 4 that does not link to receipt 3.
    broken = ReceiptSigner(key, seq=3, prev_hash=b"\x01" * 32).issue(_load("a", "p", 999, 8))
    unknown = stranger.issue(_load("a", "p", 999, 9))
    ledger = Ledger(ledger_url)
    try:
        report = ledger.ingest(pb.ReceiptBatch(receipts=[*good, fork, broken, unknown]), _keys([edge]))
        problems = {(e[:4], s): why for e, s, why in report.flagged}
        assert report.posted == 3 and len(report.flagged) == 3
        assert "forked its chain" in problems[(edge.edge[:4], 3)]
        assert "broken chain" in problems[(edge.edge[:4], 4)]
        assert "not trusted" in problems[(stranger.edge[:4], 1)]
        assert ledger.balances()[("agent:a", "USDC")] == -300
        assert len(ledger.flags()) == 3
        # A receipt that arrives before its predecessor is checked when the predecessor comes.
        later = [edge.issue(_load("a", "p", 100, i)) for i in range(2)]  # seq 4, 5 of the real chain
        assert ledger.ingest(pb.ReceiptBatch(receipts=[later[1]]), _keys([edge])).posted == 1
        assert ledger.ingest(pb.ReceiptBatch(receipts=[later[0]]), _keys([edge])).flagged == []
    finally:
        ledger.close()


def test_checkpoints_are_checked_against_the_receipts_held(ledger_url: str) -> None:
    key = Ed25519PrivateKey.generate()
    edge = ReceiptSigner(key)
    receipts = [edge.issue(_load("a", "p", 100, i)) for i in range(6)]
    good = edge.checkpoint(receipts)
    lying = edge.checkpoint([*receipts[:5], receipts[0]])  # signed, but over other receipts
    lying.last_seq = 6
    lying.signature = key.sign(checkpoint_statement(lying))
    ledger = Ledger(ledger_url)
    try:
        report = ledger.ingest(pb.ReceiptBatch(receipts=receipts, checkpoints=[good, lying]), _keys([edge]))
        assert [why for _, _, why in report.flagged] == [
            "checkpoint 1-6: its Merkle root is not that of the receipts held"
        ]
        assert ledger.root(edge.edge, 1, 6) == good.root and ledger.root(edge.edge, 1, 7) is None
        # Anyone holding receipt 4 and the checkpoint proves it is included.
        leaves = [receipt_hash(r) for r in receipts]
        assert verify_inclusion(leaves[3], 3, 6, inclusion_proof(leaves, 3), good.root)
    finally:
        ledger.close()


def test_a_posting_is_corrected_only_by_a_reversal(ledger_url: str) -> None:
    (edge,) = _edges(1)
    ledger = Ledger(ledger_url, fee_bps=FEE_BPS)
    try:
        ledger.ingest(pb.ReceiptBatch(receipts=[edge.issue(_load("a", "p", 1000, 0))]), _keys([edge]))
        (tx,) = {t for (t,) in ledger.db.run("SELECT id FROM ledger_transactions")}
        charged = ledger.statement("p")
        reversal = ledger.reverse(int(tx), "refund: the agent could not use the cache")
        assert all(v == 0 for v in ledger.balances().values()) and ledger.unbalanced() == []
        # The statement of a period that holds both nets the reversal; the receipt stays settled in it.
        after = ledger.statement("p")
        assert (charged.amounts, after.amounts, after.receipts) == ({"USDC": 950}, {"USDC": 0}, 1)
        with pytest.raises(InvalidArgument, match="reversed already"):
            ledger.reverse(int(tx), "again")
        with pytest.raises(InvalidArgument, match="itself a reversal"):
            ledger.reverse(reversal, "undo the refund")
        with pytest.raises(NotFound):
            ledger.reverse(10_000, "nothing")
    finally:
        ledger.close()


def test_the_ledger_command_ingests_batch_files_and_prints_balances(tmp_path: Path) -> None:
    generate_key(tmp_path / "edge.key")
    edge = ReceiptSigner.from_file(tmp_path / "edge.key")
    receipts = [edge.issue(_load("a", "p", 100, i)) for i in range(3)]
    batch = tmp_path / "batch.pb"
    batch.write_bytes(pb.ReceiptBatch(receipts=receipts, checkpoints=[edge.checkpoint(receipts)]).SerializeToString())
    db = str(tmp_path / "ledger.db")

    def ledger(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "kvcdn", "ledger", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=120)

    keys = str(tmp_path / "edge.pub")
    out = ledger("ingest", "--db", db, "--edge-keys", keys, "--fee-bps", "1000", str(batch), str(batch))
    assert out.returncode == 0, out.stderr
    assert "3 posted, 3 new, 0 counted already, 0 flagged" in out.stdout
    assert "0 posted, 0 new, 3 counted already, 0 flagged" in out.stdout
    balances = ledger("balances", "--db", db)
    assert balances.returncode == 0
    assert re.search(r"agent:a\s.*USDC\s.*-300", balances.stdout) and re.search(r"network:fees\s.*30", balances.stdout)
    statement = ledger("statement", "--db", db, "--publisher", "p")
    root = merkle_root([receipt_hash(r) for r in receipts]).hex()
    assert "3 receipts, earned 270 USDC" in statement.stdout and root in statement.stdout
    bad = ledger("ingest", "--db", db, "--edge-keys", keys, str(tmp_path / "missing.pb"))
    assert bad.returncode != 0 and "not a readable ReceiptBatch" in bad.stderr
