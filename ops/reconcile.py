"""`kvcdn ledger reconcile`: what the ledger holds of each edge's receipts against the edge's own
counters, read from its `/metrics` (kvcdn.edge.tolls): the receipts its process signed (from
`kvcdn_edge_receipts_first_seq` to `kvcdn_edge_receipt_seq`) and the payload bytes it sent within
priced loads (`kvcdn_edge_charged_bytes_total`, counted frame by frame as they go out). Every
difference is reported: receipts the ledger lacks (not shipped, not ingested, or lost), bytes sent
that no receipt covers, receipts the ledger set aside. The counters start with the edge's process,
so the comparison covers the receipts it signed since it started."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvcdn.errors import KVCDNError
from kvcdn.ops.ledger import Ledger
from kvcdn.ops.stats import metrics_url, scrape
from kvcdn.wire.tls import TLSFiles

__all__ = ["EdgeCounters", "Reconciliation", "edge_counters", "reconcile"]


@dataclass(frozen=True)
class EdgeCounters:
    """What one edge process counted of its priced loads (per receipt key it signs with)."""

    address: str
    edge_key: str
    first_seq: int
    last_seq: int
    charged_bytes: int
    payload_bytes: int
    """Every payload byte the edge served, priced or not, over both transports."""


@dataclass
class Reconciliation:
    counters: EdgeCounters
    receipts: int = 0
    """Receipts of this key in the ledger, seq first_seq..last_seq."""
    receipted_bytes: int = 0
    charged: dict[str, int] = field(default_factory=dict)
    """What those receipts charged, by asset."""
    problems: list[str] = field(default_factory=list)

    @property
    def signed(self) -> int:
        return max(0, self.counters.last_seq - self.counters.first_seq + 1)


async def edge_counters(address: str, token: str = "", tls: TLSFiles | None = None) -> list[EdgeCounters]:
    """The counters of the edge at `address` (none when it takes no grants)."""
    samples = await scrape(await metrics_url(address, token=token, tls=tls))
    keys = sorted({dict(labels)["edge_key"] for (name, labels) in samples if name == "kvcdn_edge_receipt_seq"})
    payload = sum(v for (name, _), v in samples.items() if name == "kvcdn_payload_bytes_served_total")

    def value(name: str, key: str) -> int:
        return int(samples.get((name, (("edge_key", key),)), 0))

    return [
        EdgeCounters(
            address,
            key,
            value("kvcdn_edge_receipts_first_seq", key),
            value("kvcdn_edge_receipt_seq", key),
            value("kvcdn_edge_charged_bytes_total", key),
            int(payload),
        )
        for key in keys
    ]


def reconcile(ledger: Ledger, counters: list[EdgeCounters]) -> list[Reconciliation]:
    """Each edge's counters against the receipts the ledger holds of them; `problems` says every difference."""
    out = []
    flags = ledger.flags()
    for c in counters:
        r = Reconciliation(c)
        rows = ledger.db.run(
            "SELECT seq, bytes, price, asset FROM ledger_receipts WHERE edge = %s AND seq >= %s AND seq <= %s",
            (c.edge_key, c.first_seq, c.last_seq),
        )
        seqs = {int(seq) for seq, *_ in rows}
        r.receipts, r.receipted_bytes = len(rows), sum(int(b) for _, b, _, _ in rows)
        for _, _, price, asset in rows:
            r.charged[asset] = r.charged.get(asset, 0) + int(price)
        missing = [s for s in range(c.first_seq, c.last_seq + 1) if s not in seqs]
        if missing:
            r.problems.append(f"{len(missing)} receipt(s) signed but not in the ledger: seq {_ranges(missing)}")
        if not missing and r.receipted_bytes != c.charged_bytes:
            r.problems.append(
                f"the edge sent {c.charged_bytes:,} bytes in priced loads, its receipts say {r.receipted_bytes:,}"
            )
        flagged = [f for f in flags if f[0] == c.edge_key]
        if flagged:
            r.problems.append(f"{len(flagged)} receipt(s) or checkpoint(s) of this key set aside (kvcdn ledger flags)")
        out.append(r)
    return out


def _ranges(seqs: list[int]) -> str:
    """Sorted numbers as runs: `1..3, 7`."""
    runs: list[list[int]] = []
    for seq in seqs:
        if runs and seq == runs[-1][1] + 1:
            runs[-1][1] = seq
        else:
            runs.append([seq, seq])
    return ", ".join(str(a) if a == b else f"{a}..{b}" for a, b in runs)


async def counters_of(addresses: list[str], token: str = "", tls: TLSFiles | None = None) -> list[EdgeCounters]:
    """Every edge's counters; an edge that cannot be read is an error naming it."""
    out: list[EdgeCounters] = []
    for address in addresses:
        try:
            out += await edge_counters(address, token, tls)
        except KVCDNError as exc:
            raise type(exc)(f"cannot read the counters of edge {address}: {exc}") from None
    return out
