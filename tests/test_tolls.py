"""Priced documents at an edge (kvcdn.edge.tolls): a load with a grant streams and gets a signed
receipt that charges exactly its price, on both transports; without a grant, or with one over its cap
or revoked, it is refused with the grant check's status and x402 terms in the trailers; anonymous
streams of priced blocks and loads naming another document's blocks are refused; the receipt book
keeps its chain across a crash mid-batch, losing and duplicating nothing in the ledger."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kvcdn.client import ClientConfig, KVClient
from kvcdn.edge.receiptbook import ReceiptBook
from kvcdn.edge.tolls import Tolls
from kvcdn.errors import InvalidArgument, LimitExceeded, Unauthenticated
from kvcdn.model.loading import LoadedModel
from kvcdn.model.prompt import document_ids
from kvcdn.ops.ledger import Ledger
from kvcdn.spec.grants import Scope, Wallet, issue_grant, issue_revocation
from kvcdn.spec.identity import block_keys
from kvcdn.spec.prices import PAYMENT_REQUIRED_KEY, decode_payment_required
from kvcdn.spec.provenance import Signer, TrustStore, generate_key
from kvcdn.spec.receipts import ReceiptSigner, receipt_problem
from kvcdn.v1 import kvcdn_pb2 as pb
from kvcdn.wire.stub import CacheReader
from tests.conftest import Network, start_network, stop_network

PRICE = pb.Price(per_load=1000, per_token=3, asset="USDC", pay_to="acme-docs")


@dataclass
class Market:
    net: Network
    issuer: Ed25519PrivateKey
    agent: Ed25519PrivateKey
    edge_keys: TrustStore
    receipts: Path
    revocations: Path

    def wallet(self, cap: int = 10**9, grant_id: str = "", scope: Scope | None = None) -> Wallet:
        agent, key = "agent-7", self.agent.public_key()
        grant = issue_grant(self.issuer, key, agent, scope or Scope(), cap, "USDC", grant_id=grant_id)
        return Wallet(grant, self.agent)

    def client(self, wallet: Wallet | None = None, bulk: bool = True) -> KVClient:
        return KVClient(ClientConfig((self.net.edge_address,), wallet=wallet, bulk=bulk))


@pytest.fixture
async def market(llama: LoadedModel, tmp_path: Path) -> AsyncIterator[Market]:
    issuer_pub, _ = generate_key(tmp_path / "issuer.key")
    edge_pub, _ = generate_key(tmp_path / "edge.key")
    generate_key(tmp_path / "agent.key")
    options = {
        "grant_issuers": (issuer_pub,),
        "receipt_key": tmp_path / "edge.key",
        "receipts_dir": tmp_path / "receipts",
        "revocations": tmp_path / "revoked.txt",
    }
    net = await start_network(llama, tmp_path / "store", max_document_tokens=2000, edge_options=options)
    try:
        yield Market(
            net,
            Signer.from_file(tmp_path / "issuer.key").key,
            Signer.from_file(tmp_path / "agent.key").key,
            TrustStore.from_files([edge_pub]),
            tmp_path / "receipts",
            tmp_path / "revoked.txt",
        )
    finally:
        await stop_network(net)


@pytest.mark.parametrize("bulk", [True, False], ids=["bulk", "grpc"])
async def test_a_priced_load_with_a_grant_streams_and_gets_a_receipt_for_exactly_its_price(
    market: Market, sample_text: str, bulk: bool
) -> None:
    net = market.net
    await net.origin.publish("handbook", sample_text, price=PRICE)
    async with market.client(market.wallet(grant_id="g-1"), bulk=bulk) as client:
        fetched, manifest = await client.fetch_document(net.model, "handbook")
    assert manifest.price == PRICE and fetched.cached_tokens == manifest.token_count
    assert fetched.receipts, "a completed priced stream carries its receipt"
    for r in fetched.receipts:
        assert receipt_problem(r, market.edge_keys.keys) == ""
        assert (r.agent, r.grant_id, r.publisher, r.document, r.version) == (
            "agent-7",
            "g-1",
            "acme-docs",
            "handbook",
            1,
        )
    assert sum(r.price for r in fetched.receipts) == PRICE.per_load + PRICE.per_token * manifest.token_count
    assert sum(r.bytes for r in fetched.receipts) == fetched.n_bytes
    assert sum(r.tokens for r in fetched.receipts) == manifest.token_count
    assert net.edge.tolls.charged_bytes == fetched.n_bytes
    assert net.edge.tolls.checker is not None and net.edge.tolls.checker.spent == {
        "g-1": sum(r.price for r in fetched.receipts)
    }


@pytest.mark.parametrize("bulk", [True, False], ids=["bulk", "grpc"])
async def test_a_priced_load_without_a_grant_is_refused_with_what_would_pay(
    market: Market, sample_text: str, bulk: bool
) -> None:
    net = market.net
    await net.origin.publish("handbook", sample_text, price=PRICE)
    async with market.client(None, bulk=bulk) as client:
        with pytest.raises(Unauthenticated, match="present a grant") as refused:
            await client.fetch_document(net.model, "handbook")
        manifest = await client.manifest("handbook")
    terms = decode_payment_required(refused.value.trailers[PAYMENT_REQUIRED_KEY])
    [accept] = terms.accepts
    assert (accept.scheme, accept.asset, accept.pay_to) == ("deferred", "USDC", "acme-docs")
    assert int(accept.amount) == PRICE.per_load + PRICE.per_token * manifest.token_count
    assert accept.extra["grantIssuers"] == sorted(net.edge.tolls.issuers)
    assert terms.resource is not None and "handbook@1" in terms.resource.url
    assert net.edge.tolls.book is not None and net.edge.tolls.book.signer.seq == 0  # nothing charged


async def test_anonymous_streams_of_priced_blocks_and_loads_of_other_documents_blocks_are_refused(
    market: Market, sample_text: str
) -> None:
    net = market.net
    await net.origin.publish("handbook", sample_text, price=PRICE)
    await net.origin.publish("free-notes", sample_text[1000:1600])  # free, and shares no block with handbook
    await net.origin.publish("preface", sample_text[:600])  # free, and shares its first blocks with handbook
    ids = document_ids(net.model.tokenizer, sample_text)
    keys = block_keys(net.model.fingerprint, ids, net.model.geometry.block_tokens)
    preface = (await net.origin.manifest("preface", 0)).blocks
    shared = sum(b.key == k for b, k in zip(preface, keys, strict=False))
    infos = await net.edge.lookup(net.model.fingerprint_hex, keys)
    assert 0 < shared < len(infos)
    assert [i.priced for i in infos] == [False] * shared + [True] * (len(infos) - shared)  # public via preface
    async with market.client(None) as client:
        with pytest.raises(Unauthenticated, match="priced documents only"):
            await client.fetch(net.model, ids)  # by token ids: no document named
        free, _ = await client.fetch_document(net.model, "free-notes")  # a free document loads as before
    assert free.cached_tokens > 0 and free.receipts == []
    async with CacheReader(net.edge_address) as reader:
        load = market.wallet().load("free-notes", 1, net.edge_address, "k1")
        with pytest.raises(InvalidArgument, match="not one of free-notes v1's"):
            async for _ in reader.stream(net.model.fingerprint_hex, keys[:1], load=load):
                pass


async def test_grants_over_their_cap_revoked_or_out_of_scope_are_refused(market: Market, sample_text: str) -> None:
    net = market.net
    await net.origin.publish("handbook", sample_text, price=PRICE)
    async with market.client(market.wallet(cap=500)) as client:
        with pytest.raises(LimitExceeded, match="left of its cap of 500") as over:
            await client.fetch_document(net.model, "handbook")
    assert PAYMENT_REQUIRED_KEY in over.value.trailers
    async with market.client(market.wallet(scope=Scope(publishers=("someone-else",)))) as client:
        with pytest.raises(Exception, match="does not cover publisher 'acme-docs'"):
            await client.fetch_document(net.model, "handbook")
    market.revocations.write_text("# revoked by the issuer\ng-revoked\n")
    async with market.client(market.wallet(grant_id="g-revoked")) as client:
        with pytest.raises(Unauthenticated, match="revoked"):
            await client.fetch_document(net.model, "handbook")


async def test_an_edge_restarted_after_loads_goes_on_with_its_chain(market: Market, sample_text: str) -> None:
    net = market.net
    await net.origin.publish("handbook", sample_text, price=PRICE)
    async with market.client(market.wallet()) as client:
        first, _ = await client.fetch_document(net.model, "handbook")
    await net.edge_server.stop(0)
    await net.edge.close()  # ships the batch
    restarted = await start_network(
        net.model,
        market.receipts.parent / "store2",
        max_document_tokens=2000,
        edge_options={
            "grant_issuers": (market.receipts.parent / "issuer.pub",),
            "receipt_key": market.receipts.parent / "edge.key",
            "receipts_dir": market.receipts,
        },
    )
    try:
        await restarted.origin.publish("handbook", sample_text, price=PRICE)
        async with KVClient(ClientConfig((restarted.edge_address,), wallet=market.wallet())) as client:
            second, _ = await client.fetch_document(restarted.model, "handbook")
        assert second.receipts[0].seq == first.receipts[-1].seq + 1
    finally:
        await stop_network(restarted)
    ledger = Ledger(str(market.receipts.parent / "ledger.db"))
    for batch in sorted((market.receipts / "outbox").glob("batch-*.pb")):
        ledger.ingest(pb.ReceiptBatch.FromString(batch.read_bytes()), market.edge_keys.keys)
    assert ledger.flags() == []
    charged = sum(r.price for r in (*first.receipts, *second.receipts))
    assert ledger.balances()[("agent:agent-7", "USDC")] == -charged


def test_a_receipt_book_crashed_mid_batch_loses_no_receipt_and_duplicates_none(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    keys = {ReceiptSigner(key).edge: key.public_key()}

    def receipt(n: int) -> pb.Receipt:
        return pb.Receipt(
            grant_id="g", idempotency_key=f"load-{n}", agent="a", publisher="p", document="d", version=1,
            blocks=1, bytes=100, tokens=10, price=7, asset="USDC",
        )  # fmt: skip

    def crash(book: ReceiptBook) -> None:
        """The process dies: nothing more is written (its open journal and lock go with it)."""
        book._journal.close()
        book._lock.close()

    book = ReceiptBook(tmp_path, ReceiptSigner(key), batch=3)
    with pytest.raises(InvalidArgument, match="one folder per edge"):
        ReceiptBook(tmp_path, ReceiptSigner(Ed25519PrivateKey.generate()))  # a second edge on the same folder
    for n in range(5):
        book.issue(receipt(n))  # 1..3 shipped; 4 and 5 wait in the journal
    crash(book)
    with (tmp_path / "journal").open("ab") as journal:
        journal.write(b"\x40\x00\x00\x00partial")  # the process died writing receipt 6 (never answered)
    book = ReceiptBook(tmp_path, ReceiptSigner(key), batch=3)
    assert [r.seq for r in book.pending] == [4, 5] and book.signer.seq == 5
    # It dies again while shipping 4..5: the batch file is written, the head and journal are not yet.
    head, journal_bytes = (tmp_path / "head.pb").read_bytes(), (tmp_path / "journal").read_bytes()
    book.ship()
    crash(book)
    (tmp_path / "head.pb").write_bytes(head)
    (tmp_path / "journal").write_bytes(journal_bytes)
    book = ReceiptBook(tmp_path, ReceiptSigner(key), batch=3)
    assert [r.seq for r in book.pending] == [4, 5]
    book.issue(receipt(6))  # ships 4..6: 4 and 5 a second time
    # And once more after the head was written but before the journal was emptied.
    book.issue(receipt(7))
    journal_before = (tmp_path / "journal").read_bytes()
    book.ship()
    crash(book)
    (tmp_path / "journal").write_bytes(journal_before)
    book = ReceiptBook(tmp_path, ReceiptSigner(key), batch=3)
    assert book.pending == [] and book.signer.seq == 7
    book.issue(receipt(8))
    book.close()
    ledger = Ledger(str(tmp_path / "ledger.db"))
    batches = sorted((tmp_path / "outbox").glob("batch-*.pb"))
    for path in [*batches, *batches]:  # and every batch delivered twice
        ledger.ingest(pb.ReceiptBatch.FromString(path.read_bytes()), keys)
    assert ledger.flags() == []
    assert [s for (s,) in ledger.db.run("SELECT seq FROM ledger_receipts ORDER BY seq")] == list(range(1, 9))
    assert ledger.balances()[("agent:a", "USDC")] == -7 * 8


async def test_an_issuers_signed_revocation_reaches_the_edge_through_the_origins_feed(
    market: Market, sample_text: str
) -> None:
    net = market.net
    await net.origin.publish("handbook", sample_text, price=PRICE)

    async def load(wallet: Wallet) -> None:
        async with market.client(wallet) as client:
            await client.fetch_document(net.model, "handbook")

    async def relayed(seq: int) -> None:
        for _ in range(200):
            if net.edge.feed.seq >= seq:
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"the edge did not apply feed event {seq}")

    with pytest.raises(InvalidArgument, match="compact JWS"):
        await net.origin.revoke("not a revocation")
    await load(market.wallet(grant_id="g-live"))
    stranger = Ed25519PrivateKey.generate()
    await relayed(await net.origin.revoke(issue_revocation(stranger, ["g-live"])))
    await load(market.wallet(grant_id="g-live"))  # nobody the edge trusts signed that: ignored
    await relayed(await net.origin.revoke(issue_revocation(market.issuer, ["g-live"])))
    with pytest.raises(Unauthenticated, match="g-live was revoked by its issuer"):
        await load(market.wallet(grant_id="g-live"))
    await load(market.wallet(grant_id="g-other"))  # the issuer's other grants still load
    await net.edge_server.stop(0)
    await net.edge.close()
    restarted = Tolls(net.edge.config)  # the edge keeps what it applied: its feed may not replay it
    try:
        assert restarted.checker is not None and f"{restarted.issuers[0]}:g-live" in restarted.checker.revoked
    finally:
        restarted.close()
