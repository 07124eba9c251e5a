"""`kvcdn loadtest priced`: a market in a box, settled to the unit.

It starts an origin and edges as processes, the edges trusting one grant issuer and each signing
receipts with a key of its own; publishes documents for several publishers at different prices;
gives each of several agents a grant bound to its own key; has the agents load the documents through
the edges, paying per load and per token; then ships the edges' receipt batches into a ledger
(kvcdn.ops.ledger, SQLite unless `--ledger` names a PostgreSQL URL) and reconciles them with the edges'
own counters (kvcdn.ops.reconcile). The tables say what each publisher earned and each agent spent,
and whether the three accounts of the same loads agree: the receipts the agents got, the ledger's
postings, and the bytes the edges counted going out (their priced-load counter and every payload byte
they served: here every document is priced, so both must equal the receipts' bytes)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from tempfile import TemporaryDirectory

from rich.console import Console

from kvcdn.client import ClientConfig, KVClient
from kvcdn.errors import InvalidArgument, Unavailable
from kvcdn.loadtest.bench_report import grid
from kvcdn.loadtest.publish import burst_texts
from kvcdn.model.loading import LoadedModel
from kvcdn.model.options import ModelOptions
from kvcdn.ops.launcher import Cluster
from kvcdn.ops.ledger import Ledger
from kvcdn.ops.reconcile import EdgeCounters, Reconciliation, counters_of, reconcile
from kvcdn.spec.grants import Scope, Wallet, issue_grant
from kvcdn.spec.provenance import Signer, TrustStore, generate_key
from kvcdn.v1 import kvcdn_pb2 as pb
from kvcdn.wire.stub import CacheReader

__all__ = ["PricedConfig", "PricedRun", "run_priced", "run_priced_report"]

ASSET = "USDC"


@dataclass(frozen=True)
class PricedConfig:
    edges: int = 2
    agents: int = 4
    publishers: int = 2
    documents: int = 4
    loads: int = 24
    """Loads in all, spread over the agents (each loads in turn, the agents at once)."""
    tokens: int = 400
    """About how long each document is."""
    fee_bps: int = 500
    """The network's share of each price (basis points)."""
    ledger: str = ""
    """Where to settle: a SQLite file or a postgresql:// URL ("": a file in the run's folder)."""
    markdown: bool = False

    def __post_init__(self) -> None:
        if min(self.edges, self.agents, self.publishers, self.documents, self.loads) < 1 or self.tokens < 16:
            raise InvalidArgument(
                "--edges, --agents, --publishers, --documents and --loads must be >= 1, --tokens >= 16"
            )
        if self.publishers > self.documents:
            raise InvalidArgument("every publisher needs a document: --publishers at most --documents")


def price_of(document: int, publishers: int) -> pb.Price:
    """Document i's price: publisher i mod P, each publisher charging differently."""
    p = document % publishers
    return pb.Price(per_load=1000 * (p + 1), per_token=p + 1, asset=ASSET, pay_to=f"publisher-{p}")


@dataclass
class PricedRun:
    manifests: list[pb.Manifest]
    receipts: list[pb.Receipt]
    """What the agents got back in their streams' trailers."""
    loads: list[tuple[str, int]]
    """(agent, document index) of every load, in the order made."""
    balances: dict[tuple[str, str], int]
    ledger_receipts: int
    ledger_bytes: int
    counters: list[EdgeCounters]
    reconciliation: list[Reconciliation]
    flags: int
    publisher_loads: dict[str, int] = field(default_factory=dict)

    @property
    def charged(self) -> int:
        """What the agents were charged, by the ledger (the agents' accounts are its only debits)."""
        return -sum(v for (account, _), v in self.balances.items() if account.startswith("agent:"))

    @property
    def problems(self) -> list[str]:
        return [p for r in self.reconciliation for p in r.problems]


async def _load_all(
    model: LoadedModel, edges: list[str], trust: Path | None, wallets: dict[str, Wallet], plan: list[tuple[str, int]]
) -> list[pb.Receipt]:
    """Each agent makes its loads of `plan` one after the other; the agents at once."""

    async def agent(name: str) -> list[pb.Receipt]:
        got: list[pb.Receipt] = []
        config = ClientConfig(tuple(edges), wallet=wallets[name], trust=(trust,) if trust else ())
        async with KVClient(config) as client:
            for who, doc in plan:
                if who == name:
                    fetched, _ = await client.fetch_document(model, f"priced-{doc}", 1)
                    got += fetched.receipts
        return got

    return [r for rs in await asyncio.gather(*(agent(name) for name in wallets)) for r in rs]


async def _publish(origin: str, config: PricedConfig) -> list[pb.Manifest]:
    texts = burst_texts(config.documents, config.tokens, "Priced")
    async with CacheReader(origin, timeout_s=1800) as stub:
        answers = [
            await stub.publish(f"priced-{i}", text, codecs=("raw",), price=price_of(i, config.publishers))
            for i, text in enumerate(texts)
        ]
    return [a.manifest for a in answers]


async def _shipped(edges: list[str], outboxes: list[Path], timeout_s: float = 30.0) -> list[EdgeCounters]:
    """The edges' counters once every receipt they signed is in a batch in their outbox."""
    deadline = time.monotonic() + timeout_s
    while True:
        counters = await counters_of(edges)
        last: dict[str, int] = {}
        for outbox in outboxes:
            for path in outbox.glob("batch-*.pb"):  # batch-EDGE-FIRST-LAST.pb
                _, key, _, end = path.stem.split("-")
                last[key] = max(last.get(key, 0), int(end))
        waiting = [c.address for c in counters if last.get(c.edge_key, 0) < c.last_seq]
        if not waiting:
            return counters
        if time.monotonic() > deadline:
            raise Unavailable(f"edges {', '.join(waiting)} did not ship their receipts within {timeout_s:g} s")
        await asyncio.sleep(0.1)


def run_priced(config: PricedConfig, options: ModelOptions, model: LoadedModel | None = None) -> PricedRun:
    with TemporaryDirectory(prefix="kvcdn-priced-") as tmp:
        root = Path(tmp)
        issuer_pub, _ = generate_key(root / "keys" / "issuer.key")
        edge_pubs = [generate_key(root / "keys" / f"edge{i}.key")[0] for i in range(config.edges)]
        outboxes = [root / "receipts" / f"edge{i}" / "outbox" for i in range(config.edges)]
        by_index = {
            i: ["--receipt-key", str(root / "keys" / f"edge{i}.key"), "--receipts", str(root / "receipts" / f"edge{i}")]
            for i in range(config.edges)
        }
        cluster = Cluster(
            root / "store",
            edges=config.edges,
            peers=False,  # each edge loads from the origin: its payload counter is what it sent to agents
            origin_args=[*options.flags(), "--codecs", ""],
            edge_args=["--grant-issuers", str(issuer_pub), "--receipt-batch-s", "0.2"],
            edge_args_by_index=by_index,
        )
        issuer = Signer.from_file(root / "keys" / "issuer.key").key
        wallets = {}
        for j in range(config.agents):
            generate_key(root / "keys" / f"agent{j}.key")
            key = Signer.from_file(root / "keys" / f"agent{j}.key").key
            grant = issue_grant(issuer, key.public_key(), f"agent-{j}", Scope(), 10**12, ASSET)
            wallets[f"agent-{j}"] = Wallet(grant, key)
        plan = [
            (f"agent-{k % config.agents}", (k * 7 + k // config.documents) % config.documents)
            for k in range(config.loads)
        ]
        with cluster:
            manifests = asyncio.run(_publish(cluster.origin_address, config))
            model = model or options.load()
            receipts = asyncio.run(_load_all(model, cluster.edge_addresses, cluster.trust_file, wallets, plan))
            counters = asyncio.run(_shipped(cluster.edge_addresses, outboxes))
        keys = TrustStore.from_files(edge_pubs).keys
        with Ledger(config.ledger or str(root / "ledger.db"), config.fee_bps) as ledger:
            for outbox in outboxes:
                for path in sorted(outbox.glob("batch-*.pb")):
                    ledger.ingest(pb.ReceiptBatch.FromString(path.read_bytes()), keys)
            ((n, total),) = ledger.db.run("SELECT count(*), coalesce(sum(bytes), 0) FROM ledger_receipts")
            run = PricedRun(
                manifests, receipts, plan, ledger.balances(), int(n), int(total), counters,
                reconcile(ledger, counters), len(ledger.flags()),
            )  # fmt: skip
    for _, doc in plan:
        payee = price_of(doc, config.publishers).pay_to
        run.publisher_loads[payee] = run.publisher_loads.get(payee, 0) + 1
    return run


def run_priced_report(config: PricedConfig, options: ModelOptions) -> int:
    console = Console()
    with console.status(f"{config.agents} agents, {config.loads} priced loads through {config.edges} edges"):
        run = run_priced(config, options)

    def show(table: object) -> None:
        print(table) if config.markdown else console.print(table)

    pubs = sorted(run.publisher_loads)
    show(
        grid(
            ["publisher", "loads", f"earned ({ASSET} units)", "network fees"],
            [
                [
                    p,
                    str(run.publisher_loads[p]),
                    f"{run.balances.get((f'publisher:{p}', ASSET), 0):,}",
                    "",
                ]
                for p in pubs
            ]
            + [["network", "", "", f"{run.balances.get(('network:fees', ASSET), 0):,}"]],
            f"Revenue per publisher ({config.fee_bps / 100:g}% network fee)",
            config.markdown,
        )
    )
    receipts_price, receipts_bytes = sum(r.price for r in run.receipts), sum(r.bytes for r in run.receipts)
    counted = sum(c.charged_bytes for c in run.counters)
    served = sum(c.payload_bytes for c in run.counters)
    rows = [
        ["receipts the agents got", f"{len(run.receipts)}", f"{receipts_price:,}", f"{receipts_bytes:,}"],
        ["ledger", f"{run.ledger_receipts}", f"{run.charged:,}", f"{run.ledger_bytes:,}"],
        ["edges' priced-load counters", f"{sum(r.signed for r in run.reconciliation)}", "", f"{counted:,}"],
        ["edges' payload served (all)", "", "", f"{served:,}"],
    ]
    show(
        grid(
            ["account of the loads", "receipts", "charged", "bytes"],
            rows,
            "Three accounts of the same loads",
            config.markdown,
        )
    )
    agree = receipts_price == run.charged and receipts_bytes == run.ledger_bytes == counted == served
    problems = run.problems + ([f"{run.flags} receipt(s) flagged"] if run.flags else [])
    verdict = (
        "they agree exactly" if agree and not problems else "DIFFERENCES: " + "; ".join(problems or ["totals differ"])
    )
    print(f"{len(run.loads)} loads by {config.agents} agents of {len(run.manifests)} documents: {verdict}")
    return 0 if agree and not problems else 1
