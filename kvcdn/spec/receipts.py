"""Usage receipts: what an edge signs for each load it served, so that a ledger can settle it and
anyone holding a receipt can check it (proto/kvcdn/v1/SPEC.md, "Receipts").

A receipt is signed by the edge's own Ed25519 key (a file `kvcdn keys generate` makes, as publishers'
keys) over a *receipt statement*, an explicit byte layout like the publisher's statements
(kvcdn.spec.provenance), so a receipt verifies the same in any language. The receipts of one edge key
form a chain: receipt n carries the hash of receipt n-1 (32 zero bytes for n = 1), so a receipt taken
out, altered or slipped in breaks the chain where a ledger holds both neighbours. A *checkpoint*,
signed by the same key, names the Merkle root of a run of receipts (RFC 6962's tree hash over their
hashes), so that one receipt's inclusion is proved with about log2(n) hashes (`inclusion_proof`).
"""

from __future__ import annotations

import hashlib
import struct
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from kvcdn.spec.provenance import Signer, key_id
from kvcdn.spec.provenance import statement_text as _text
from kvcdn.v1 import kvcdn_pb2 as pb

__all__ = [
    "GENESIS",
    "RECEIPT_KEY",
    "ReceiptSigner",
    "checkpoint_problem",
    "checkpoint_statement",
    "inclusion_proof",
    "merkle_root",
    "receipt_hash",
    "receipt_problem",
    "receipt_statement",
    "verify_inclusion",
]

RECEIPT_KEY = "kvcdn-receipt-bin"
"""Trailing metadata key of a load's receipt (a serialized Receipt) on the stream that earned it."""
GENESIS = bytes(32)
"""The `prev_hash` of an edge key's first receipt."""
_RECEIPT = b"kvcdn-receipt-v1\x00"
_CHECKPOINT = b"kvcdn-checkpoint-v1\x00"


def receipt_statement(r: pb.Receipt) -> bytes:
    """What a receipt's signature covers: `"kvcdn-receipt-v1\\0" | text edge | u64 seq | prev_hash (32) |
    text grant_id | text idempotency_key | text agent | text publisher | text document | u32 version |
    u32 blocks | u64 bytes | u64 tokens | u64 price | text asset | i64 time_ms`, little-endian, texts as
    `u32 length | UTF-8`."""
    return b"".join(
        (
            _RECEIPT,
            _text(r.edge),
            struct.pack("<Q", r.seq),
            r.prev_hash,
            *(_text(t) for t in (r.grant_id, r.idempotency_key, r.agent, r.publisher, r.document)),
            struct.pack("<IIQQQ", r.version, r.blocks, r.bytes, r.tokens, r.price),
            _text(r.asset),
            struct.pack("<q", r.time_ms),
        )
    )


def receipt_hash(r: pb.Receipt) -> bytes:
    """SHA-256 of the statement and its signature: the next receipt's `prev_hash`, a Merkle leaf."""
    return hashlib.sha256(receipt_statement(r) + r.signature).digest()


def checkpoint_statement(c: pb.Checkpoint) -> bytes:
    """`"kvcdn-checkpoint-v1\\0" | text edge | u64 first_seq | u64 last_seq | root (32) | i64 time_ms`."""
    return b"".join(
        (_CHECKPOINT, _text(c.edge), struct.pack("<QQ", c.first_seq, c.last_seq), c.root, struct.pack("<q", c.time_ms))
    )


class ReceiptSigner:
    """An edge's receipt key and the end of its chain: `issue` numbers, links and signs the next
    receipt. The caller keeps (`seq`, `prev_hash`) across restarts, or a restarted edge forks its chain."""

    def __init__(self, key: Ed25519PrivateKey, seq: int = 0, prev_hash: bytes = GENESIS) -> None:
        self._key = key
        self.edge = key_id(key.public_key())
        self.seq = seq
        self.prev_hash = prev_hash

    @classmethod
    def from_file(cls, path: Path, seq: int = 0, prev_hash: bytes = GENESIS) -> ReceiptSigner:
        """The edge key in `path` (PEM, `kvcdn keys generate`), refused when expired, as a publisher's."""
        return cls(Signer.from_file(path).key, seq, prev_hash)

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self._key.public_key()

    def issue(self, receipt: pb.Receipt) -> pb.Receipt:
        """`receipt` (the load's fields) as the chain's next receipt, signed; `time_ms` now if unset."""
        out = pb.Receipt()
        out.CopyFrom(receipt)
        out.edge, out.seq, out.prev_hash = self.edge, self.seq + 1, self.prev_hash
        out.time_ms = out.time_ms or int(time.time() * 1000)
        out.signature = self._key.sign(receipt_statement(out))
        self.seq, self.prev_hash = out.seq, receipt_hash(out)
        return out

    def checkpoint(self, receipts: Sequence[pb.Receipt]) -> pb.Checkpoint:
        """A signed checkpoint over a consecutive run of this key's receipts."""
        c = pb.Checkpoint(
            edge=self.edge,
            first_seq=receipts[0].seq,
            last_seq=receipts[-1].seq,
            root=merkle_root([receipt_hash(r) for r in receipts]),
            time_ms=int(time.time() * 1000),
        )
        c.signature = self._key.sign(checkpoint_statement(c))
        return c


def _signature_problem(keys: Mapping[str, Ed25519PublicKey], edge: str, signature: bytes, statement: bytes) -> str:
    key = keys.get(edge)
    if key is None:
        return f"signed by edge key {edge!r}, which is not trusted here"
    try:
        key.verify(signature, statement)
    except InvalidSignature:
        return "its signature does not verify (altered, or not signed by that edge)"
    return ""


def receipt_problem(r: pb.Receipt, keys: Mapping[str, Ed25519PublicKey]) -> str:
    """Why `r` cannot be trusted ("" when it can): an unknown edge key, a bad signature, or fields
    no edge writes."""
    if r.seq < 1 or len(r.prev_hash) != 32 or (r.seq == 1 and r.prev_hash != GENESIS):
        return "its sequence number or chain link is malformed"
    if not r.idempotency_key:
        return "it has no idempotency key"
    return _signature_problem(keys, r.edge, r.signature, receipt_statement(r))


def checkpoint_problem(c: pb.Checkpoint, keys: Mapping[str, Ed25519PublicKey]) -> str:
    if c.first_seq < 1 or c.last_seq < c.first_seq or len(c.root) != 32:
        return "its range or root is malformed"
    return _signature_problem(keys, c.edge, c.signature, checkpoint_statement(c))


# --- Merkle trees (RFC 6962 / RFC 9162 section 2.1) -------------------------------------------------


def _leaf(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two below n (n > 1)."""
    return 1 << ((n - 1).bit_length() - 1)


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    """RFC 6962's Merkle tree hash of `leaves` (SHA-256 of nothing for none)."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return _leaf(leaves[0])
    k = _split(len(leaves))
    return _node(merkle_root(leaves[:k]), merkle_root(leaves[k:]))


def inclusion_proof(leaves: Sequence[bytes], index: int) -> list[bytes]:
    """The audit path of leaf `index`: the hashes that, with the leaf, give the root (RFC 6962 PATH)."""
    if len(leaves) <= 1:
        return []
    k = _split(len(leaves))
    if index < k:
        return [*inclusion_proof(leaves[:k], index), merkle_root(leaves[k:])]
    return [*inclusion_proof(leaves[k:], index - k), merkle_root(leaves[:k])]


def verify_inclusion(leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes) -> bool:
    """Whether `proof` shows `leaf` at `index` of a tree of `size` leaves with `root` (RFC 9162 2.1.3.2)."""
    if not 0 <= index < size:
        return False
    fn, sn, r = index, size - 1, _leaf(leaf)
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = _node(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn, sn = fn >> 1, sn >> 1
        else:
            r = _node(r, p)
        fn, sn = fn >> 1, sn >> 1
    return sn == 0 and r == root
