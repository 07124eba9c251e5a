"""An edge's book of receipts: the end of its chain, kept across restarts, and the batches it ships.

Every receipt is appended to a journal and fsynced before its load is answered (`issue`), so a
receipt an agent holds is never lost, and a restarted edge goes on with the next number and the hash
of the last receipt it signed (a chain that forked at a restart would be flagged by the ledger). The
journal is cut into batches (`ship`: every `batch` receipts, every `batch_s` seconds, and at close):
a batch file `batch-EDGE-FIRST-LAST.pb` (a ReceiptBatch: the receipts and a checkpoint over them) is
written whole into the outbox, then the journal restarts empty. A crash between the two ships the
same receipts again in the next batch, which the ledger counts once (kvcdn.ops.ledger). Files:

    DIR/journal            u32 length | Receipt, per receipt since the last batch
    DIR/head.pb            the last receipt shipped (the chain's end when the journal is empty)
    DIR/outbox/batch-*.pb  batches for `kvcdn ledger ingest` (whatever carries them there removes them)
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
from pathlib import Path

from google.protobuf.message import DecodeError

from kvcdn.errors import DigestMismatch, InvalidArgument
from kvcdn.spec.receipts import GENESIS, ReceiptSigner, receipt_hash
from kvcdn.store.files import atomic_write, remove_temporaries
from kvcdn.v1 import kvcdn_pb2 as pb

__all__ = ["ReceiptBook"]

log = logging.getLogger(__name__)

_LEN = struct.Struct("<I")


def _read_journal(path: Path) -> list[pb.Receipt]:
    """The journal's receipts; a record cut short by a crash while it was written is dropped (its
    load was never answered) and the file truncated to the records before it."""
    data = path.read_bytes() if path.exists() else b""
    out, pos = [], 0
    while pos + _LEN.size <= len(data):
        (n,) = _LEN.unpack_from(data, pos)
        if pos + _LEN.size + n > len(data):
            break
        try:
            out.append(pb.Receipt.FromString(data[pos + _LEN.size : pos + _LEN.size + n]))
        except DecodeError:
            raise DigestMismatch(
                f"{path}: record at byte {pos} is not a receipt; the receipt journal is damaged"
            ) from None
        pos += _LEN.size + n
    if pos < len(data):
        log.warning("%s: dropping %d bytes of a receipt cut short by a crash", path, len(data) - pos)
        with path.open("r+b") as f:
            f.truncate(pos)
    return out


class ReceiptBook:
    """Signs receipts with `signer` (its chain resumed from `root`), journals and ships them."""

    def __init__(self, root: Path, signer: ReceiptSigner, batch: int = 100) -> None:
        self.root = root
        self.outbox = root / "outbox"
        self.outbox.mkdir(parents=True, exist_ok=True)
        self._lock = (root / "lock").open("a")
        try:  # two edges on one folder would fork the chain and overwrite each other's batches
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._open(signer, batch)
        except BaseException as exc:
            self._lock.close()
            if isinstance(exc, BlockingIOError):
                raise InvalidArgument(f"another edge keeps its receipts in {root}: one folder per edge") from None
            raise

    def _open(self, signer: ReceiptSigner, batch: int) -> None:
        """Resume the chain where the head and the journal leave it."""
        remove_temporaries(self.root)
        self.batch = batch
        self._journal_path = self.root / "journal"
        head_path = self.root / "head.pb"
        head = pb.Receipt.FromString(head_path.read_bytes()) if head_path.exists() else None
        seq, prev = (head.seq, receipt_hash(head)) if head is not None else (0, GENESIS)
        # Receipts up to the head were shipped (a crash may leave them in the journal after their batch).
        self.pending = [r for r in _read_journal(self._journal_path) if r.seq > seq]
        for r in self.pending:
            if r.seq != seq + 1 or r.prev_hash != prev:
                raise DigestMismatch(
                    f"{self._journal_path}: receipt {r.seq} does not follow receipt {seq}; the journal is damaged"
                )
            seq, prev = r.seq, receipt_hash(r)
        signer.seq, signer.prev_hash = seq, prev
        self.signer = signer
        self._journal = self._journal_path.open("ab")
        if self.pending:
            n = len(self.pending)
            log.info("receipt book %s: %d receipts not shipped yet; the chain goes on at %d", self.root, n, seq)

    @property
    def edge(self) -> str:
        return self.signer.edge

    def issue(self, fields: pb.Receipt) -> pb.Receipt:
        """The next receipt of the chain for `fields`, signed and on disk (fsynced) before it returns."""
        receipt = self.signer.issue(fields)
        body = receipt.SerializeToString()
        self._journal.write(_LEN.pack(len(body)) + body)
        self._journal.flush()
        os.fsync(self._journal.fileno())
        self.pending.append(receipt)
        if len(self.pending) >= self.batch:
            try:
                self.ship()
            except OSError as exc:  # the receipt is safe in the journal: the next batch takes it
                log.error("could not ship receipts to %s: %s", self.outbox, exc)
        return receipt

    def ship(self) -> Path | None:
        """Write the receipts not yet shipped as a batch into the outbox (None when there are none)."""
        if not self.pending:
            return None
        first, last = self.pending[0].seq, self.pending[-1].seq
        batch = pb.ReceiptBatch(receipts=self.pending, checkpoints=[self.signer.checkpoint(self.pending)])
        path = self.outbox / f"batch-{self.edge}-{first:012d}-{last:012d}.pb"
        atomic_write(path, batch.SerializeToString())
        atomic_write(self.root / "head.pb", self.pending[-1].SerializeToString())
        self._journal.close()
        atomic_write(self._journal_path, b"")
        self._journal = self._journal_path.open("ab")
        self.pending = []
        log.info("shipped receipts %d..%d to %s", first, last, path)
        return path

    def close(self) -> None:
        """Ship what is pending and close the journal."""
        try:
            self.ship()
        finally:
            self._journal.close()
            self._lock.close()
