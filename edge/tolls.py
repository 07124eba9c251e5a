"""An edge's tolls: which streams may have priced blocks, what a load pays, and its receipt.

A block every document of which is priced (BlockInfo.priced, set by the origin) is streamed only
within a *load*: a request that names the document and version (StreamBlocksRequest.load) with a
grant and a proof of its key (kvcdn.spec.grants), checked here offline against the issuers this edge
trusts (`--grant-issuers`) and the ids revoked: by an issuer's signed revocation list, which the
origin relays in its invalidation feed (`kvcdn keys revoke`), or by the operator's file (`--revocations`,
followed while the edge runs). Every key of a load must be one of that version's blocks, raw or encoded. Peers
stream priced blocks from each other without a load only on an `edge` token (`--tokens`): without
tokens a from-peer request is anyone's.

A load is charged for the blocks it begins sending (kvcdn.spec.prices.charge); the grant is charged
the most the request can cost when it starts (so its cap holds), and what it did not send is given
back when it ends. Each request that sent anything gets a receipt (kvcdn.edge.receiptbook), also when
the stream broke; a stream that completes carries it in its trailers (`kvcdn-receipt-bin`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from kvcdn.edge.config import EdgeConfig
from kvcdn.edge.receiptbook import ReceiptBook
from kvcdn.errors import InvalidArgument, KVCDNError, PermissionDenied, Unauthenticated, Unavailable
from kvcdn.spec.grants import Grant, GrantChecker
from kvcdn.spec.identity import encoded_key
from kvcdn.spec.prices import (
    PAYMENT_REQUIRED_KEY,
    charge,
    encode_payment_required,
    is_priced,
    payment_required,
    request_name,
)
from kvcdn.spec.provenance import TrustStore
from kvcdn.spec.receipts import RECEIPT_KEY, ReceiptSigner
from kvcdn.v1 import kvcdn_pb2 as pb
from kvcdn.wire.bulk import Trailers
from kvcdn.wire.frames import Frame, frame_parts
from kvcdn.wire.metrics import Metric, Stat
from kvcdn.wire.ratelimit import CALLER

__all__ = ["Bill", "Tolls"]

log = logging.getLogger(__name__)


@dataclass
class Bill:
    """A priced request being served: what it names, and what it has sent so far."""

    load: pb.Load
    manifest: pb.Manifest
    grant: Grant
    infos: list[pb.BlockInfo]
    """The blocks requested, as served (their frame counts), in order."""
    held: int
    """What the grant was charged when the request started (the most it can cost)."""
    frame: int
    """The next frame due of block `block`."""
    block: int = 0
    bytes: int = 0
    tokens: int = 0
    blocks: int = 0
    first: bool = False
    """Block 0 is among the blocks begun (the request pays `per_load`)."""

    def sent(self, payload_bytes: int) -> None:
        """One more frame went out."""
        info = self.infos[self.block]
        if self.frame == 0:
            self.tokens += info.n_tokens
            self.blocks += 1
            self.first |= info.index == 0
        self.bytes += payload_bytes
        self.frame += 1
        if self.frame == len(info.frame_digests):
            self.block, self.frame = self.block + 1, 0

    @property
    def price(self) -> int:
        return charge(self.manifest.price, self.tokens, self.first)


class _Revocations:
    """Grant ids in a file (one a line, `#` comments), read again whenever the file changes."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None

    def refresh(self, checker: GrantChecker) -> None:
        if self.path is None:
            return
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return
        if (st.st_mtime_ns, st.st_size) == self._stamp:
            return
        self._stamp = (st.st_mtime_ns, st.st_size)
        ids = {line.split("#")[0].strip() for line in self.path.read_text().splitlines()}
        checker.revoke(i for i in ids if i)


class Tolls:
    """What an edge charges, and the receipts it signs (none where it trusts no grant issuer)."""

    def __init__(self, config: EdgeConfig) -> None:
        self.config = config
        self.checker: GrantChecker | None = None
        self.book: ReceiptBook | None = None
        self.issuers: list[str] = []
        if config.grant_issuers:
            trust = TrustStore.from_files(config.grant_issuers)
            assert config.receipt_key is not None and config.receipts_dir is not None  # EdgeConfig checks
            self.issuers = sorted(trust.keys)
            self.checker = GrantChecker(trust.keys.values(), audience=config.advertise)
            self.book = ReceiptBook(
                config.receipts_dir, ReceiptSigner.from_file(config.receipt_key), config.receipt_batch
            )
        self._revocations = _Revocations(config.revocations)
        self._signed_revocations = config.receipts_dir / "revocations" if config.receipts_dir else None
        """The issuers' revocation lists this edge applied, one a line (the feed may not replay them)."""
        if self.checker is not None and self._signed_revocations is not None and self._signed_revocations.exists():
            for line in self._signed_revocations.read_text().split():
                self.checker.revoke_signed(line)
        self.first_seq = self.book.signer.seq + 1 if self.book is not None else 0
        """The first receipt this process signs: the counters below count from it."""
        self.charged_bytes = 0
        """Payload bytes sent within priced loads (this process), receipted or not."""
        self.charged_requests = 0
        self.refused = 0
        self._shipping: asyncio.Task[None] | None = None

    def start(self, address: str) -> None:
        """Take proofs made for `address` (or the advertised one); ship receipts every `receipt_batch_s`."""
        if self.checker is not None:
            self.checker.audience = self.config.advertise or address
        if self.book is not None:
            self._shipping = asyncio.get_running_loop().create_task(self._ship_every(self.config.receipt_batch_s))

    async def _ship_every(self, period_s: float) -> None:
        assert self.book is not None
        while True:
            await asyncio.sleep(period_s)
            try:
                self.book.ship()
            except OSError as exc:  # a full disk: the receipts stay in the journal, shipped next time
                log.error("could not ship receipts to %s: %s", self.book.outbox, exc)

    def apply(self, event: pb.InvalidationEvent) -> None:
        """An event of the origin's feed: a revocation list it relays is applied (and kept) here."""
        if not event.revocation or self.checker is None:
            return
        try:
            ids = self.checker.revoke_signed(event.revocation)
        except KVCDNError as exc:
            log.warning(
                "invalidation event %d: a revocation list that does not check out is ignored: %s", event.seq, exc
            )
            return
        if self._signed_revocations is not None:
            with self._signed_revocations.open("a") as f:
                f.write(event.revocation + "\n")
                f.flush()
                os.fsync(f.fileno())
        log.info("invalidation event %d revokes grants %s", event.seq, ", ".join(ids))

    def _refuse(self, exc: KVCDNError, manifest: pb.Manifest) -> KVCDNError:
        """`exc`, carrying in its trailers what would pay for `manifest` (x402's PaymentRequired)."""
        self.refused += 1
        edge = self.checker.audience if self.checker is not None else self.config.advertise
        required = payment_required(manifest, edge, self.issuers, str(exc))
        exc.trailers[PAYMENT_REQUIRED_KEY] = encode_payment_required(required)
        return exc

    async def admit(
        self,
        fingerprint: str,
        keys: Sequence[bytes],
        start_frame: int,
        from_peer: bool,
        load: pb.Load | None,
        info_of: Callable[[bytes], pb.BlockInfo | None],
        manifest_of: Callable[..., Awaitable[pb.Manifest]],
    ) -> Bill | None:
        """The bill of a request for `keys` (None: nothing to charge), or the refusal: an anonymous
        request for priced blocks, a load whose keys are not its document's, or one whose grant does
        not pay for it (kvcdn.spec.grants' statuses, with x402 terms in the trailers)."""
        if load is None:
            priced = [k for k in keys if (info := info_of(k)) is not None and info.priced]
            if priced and not (from_peer and CALLER.get() is None):
                self.refused += 1
                raise Unauthenticated(
                    f"block {priced[0].hex()[:16]}… belongs to priced documents only: load it as part of its "
                    "document (StreamBlocksRequest.load: document, version, grant and proof)"
                )
            return None
        if load.version < 1:
            raise InvalidArgument("a load names the version it pays for (StreamBlocksRequest.load.version >= 1)")
        manifest = await manifest_of(load.document, load.version)
        ours = {encoded_key(b.key, c): b for b in manifest.blocks for c in ("raw", *manifest.codecs)}
        if stray := [k for k in keys if k not in ours]:
            raise InvalidArgument(f"block {stray[0].hex()[:16]}… is not one of {load.document} v{load.version}'s")
        if not is_priced(manifest.price):
            return None
        if not load.idempotency_key:
            raise InvalidArgument("a load needs an idempotency key (the same for a retried request)")
        if self.checker is None:
            raise self._refuse(
                PermissionDenied("this edge serves no priced documents (it trusts no grant issuer)"), manifest
            )
        infos = [info_of(k) for k in keys]
        if any(i is None for i in infos):
            raise Unavailable("the origin could not be asked about the blocks of this load; retry")
        begun = [ours[k] for k in (keys[1:] if start_frame else keys)]  # the manifest's (raw) infos
        most = charge(manifest.price, sum(b.n_tokens for b in begun), any(b.index == 0 for b in begun))
        self._revocations.refresh(self.checker)
        try:
            grant = self.checker.check(
                load.grant,
                load.proof,
                publisher=manifest.price.pay_to,
                document=load.document,
                model=fingerprint,
                request=request_name(load.document, load.version, load.idempotency_key),
                price=most,
                asset=manifest.price.asset,
            )
        except KVCDNError as exc:
            raise self._refuse(exc, manifest) from None
        self.charged_requests += 1
        return Bill(load, manifest, grant, [i for i in infos if i is not None], most, start_frame)

    async def metered(
        self, bill: Bill, frames: AsyncIterator[Frame], trailers: Trailers | None
    ) -> AsyncIterator[Frame]:
        """`frames`, counted into `bill`; when they end, however they end, its receipt is signed (and,
        when the stream completed, put into `trailers`)."""
        completed = False
        try:
            async for frame in frames:
                yield frame
                bill.sent(len(frame_parts(frame)[1]))
            completed = True
        finally:
            receipt = self.settle(bill)
            if receipt is not None and completed and trailers is not None:
                trailers[RECEIPT_KEY] = receipt.SerializeToString()

    def stats(self) -> list[Stat]:
        """The counters `kvcdn ledger reconcile` compares with the receipts, labelled with the edge's key."""
        if self.book is None:
            return []
        label = (("edge_key", self.book.edge),)
        series: list[tuple[str, Literal["counter", "gauge"], str, int]] = [
            ("edge_charged_bytes_total", "counter", "Payload bytes sent within priced loads", self.charged_bytes),
            ("edge_charged_requests_total", "counter", "Priced load requests admitted", self.charged_requests),
            ("edge_loads_refused_total", "counter", "Requests refused for want of a valid grant", self.refused),
            ("edge_receipts_first_seq", "gauge", "First receipt this edge process signed", self.first_seq),
            ("edge_receipt_seq", "gauge", "Last receipt this edge signed", self.book.signer.seq),
        ]
        return [(Metric(name, kind, help, label), value) for name, kind, help, value in series]

    def settle(self, bill: Bill) -> pb.Receipt | None:
        """The receipt for what `bill` sent (none when it sent nothing); gives back to its grant what
        it held and did not charge."""
        assert self.checker is not None and self.book is not None
        self.charged_bytes += bill.bytes
        price = bill.price
        self.checker.spent[bill.grant.id] -= bill.held - price
        if not bill.bytes:
            return None
        m = bill.manifest
        return self.book.issue(
            pb.Receipt(
                grant_id=bill.grant.id,
                idempotency_key=bill.load.idempotency_key,
                agent=bill.grant.agent,
                publisher=m.price.pay_to,
                document=m.document,
                version=m.version,
                blocks=bill.blocks,
                bytes=bill.bytes,
                tokens=bill.tokens,
                price=price,
                asset=m.price.asset,
                time_ms=int(time.time() * 1000),
            )
        )

    def close(self) -> None:
        if self._shipping is not None:
            self._shipping.cancel()
        if self.book is not None:
            self.book.close()
