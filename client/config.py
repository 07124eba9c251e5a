"""ClientConfig: what an agent's KVClient is told (edges, deadlines, streams, codecs, credentials)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from kvcdn.errors import InvalidArgument
from kvcdn.spec.codecs import DEFAULT_ACCEPT, parse_codecs
from kvcdn.spec.placement import DEFAULT_REPLICAS, is_loopback, read_edges
from kvcdn.wire.tls import TLSFiles

if TYPE_CHECKING:  # joserfc loads only where an agent pays (the vLLM connector's environment has none)
    from kvcdn.spec.grants import Wallet

__all__ = ["ClientConfig", "default_streams_per_run"]

log = logging.getLogger(__name__)

_warned_untrusted = False


def default_streams_per_run(cores: int | None = None) -> int:
    """Streams to each edge a fetch uses by default: one on a machine with fewer than 8 cores (on 2,
    8 receivers and their senders take turns on the cores and lose to one stream an edge), two from
    8 cores on, where one stream an edge leaves each receiving core the limit (88% busy on an H200,
    docs/measurements.md); the row that compares the two with spreading is `make gpu-check TUNE=1`'s,
    not yet measured."""
    return 2 if (cores or os.cpu_count() or 1) >= 8 else 1


@dataclass(frozen=True)
class ClientConfig:
    edges: tuple[str, ...]
    """Edge addresses `HOST:PORT[=WEIGHT]`; a DNS name of several addresses stands for each
    of them, one of a single address stays a name (kvcdn.spec.placement.resolve_edges); `@PATH`: the
    entries of that file. Files and names are followed while the client runs (`membership_refresh_s`)."""
    membership_refresh_s: float = 5.0
    """How often a client re-reads `@PATH` edge lists and re-resolves DNS names, before a call: edges that
    joined get their blocks' requests, edges that left are no longer asked (kvcdn.spec.placement.Membership)."""
    replicas: int = DEFAULT_REPLICAS
    """Owners per block on the consistent-hash ring (asked first, in ring order)."""
    timeout_s: float = 30.0
    """Deadline of each unary call."""
    stream_timeout_s: float = 300.0
    """Deadline of one block stream, on either transport (a sender that trickles bytes is cut off)."""
    bulk: bool = True
    """Stream frames over an edge's bulk TCP port when it offers one (else over gRPC)."""
    suspect_s: float = 10.0
    """After an edge fails, ask it last for this long (so one dead edge costs one timeout, not one per run)."""
    max_streams: int = 256
    """Bulk streams this client receives at once, each in a worker thread of its own (started as needed)."""
    streams_per_fetch: int = 8
    """Streams one fetch runs at the same time: its runs of blocks (each from its owner) in parallel."""
    assumed_gbps: float = 1.0
    """Bandwidth a fetch-or-prefill decision assumes until this client has measured a fetch in that
    codec to that device (GB/s)."""
    streams_per_run: int = field(default_factory=default_streams_per_run)
    """Connections each edge's share of a fetch is split over (more where one stream cannot fill the
    link, e.g. when one receiving core is the limit); default by core count (default_streams_per_run)."""
    spread: bool = True
    """Stream each block from whichever of its R owners has the least of the fetch so far, evening
    out the bytes each edge sends (False: every block from its primary owner, which keeps each block
    in fewer edges' tiers; see `KVClient.runs`)."""
    codecs: tuple[str, ...] = DEFAULT_ACCEPT
    """Encodings this client accepts, preferred first (kvcdn.spec.codecs); the default, exact ones
    only: an agent never receives a lossy cache it did not ask for."""
    tls: TLSFiles | None = None
    """Call the edges over TLS (gRPC and bulk stream): verify them with `tls.ca`, present `tls.cert`
    where they require it (mTLS); None: plaintext."""
    token: str = ""
    """This agent's token (role `reader`) for edges that close reads (kvcdn.wire.auth); "": none."""
    trust: tuple[Path, ...] = ()
    """Publisher public keys (PEM): every block info and manifest must carry a signature by one of
    them (kvcdn.spec.provenance), else the edge's answer is refused and the next edge asked; empty:
    no signature checks (digests still bind frames to the infos an edge sent)."""

    wallet: Wallet | None = None
    """The grant and key this agent pays for priced documents with (`KVClient.fetch_document`);
    None: it loads free documents only."""

    def __post_init__(self) -> None:
        edges = read_edges(self.edges)  # fail early on a malformed list or a missing file
        global _warned_untrusted
        if not self.trust and not _warned_untrusted and not all(is_loopback(e) for e in edges):
            _warned_untrusted = True  # once a process: an agent makes many clients
            log.warning(
                "fetching from edges beyond this machine (%s) without --trust: a forged cache from a "
                "compromised edge would be accepted; pin the publisher's key (--trust FILE.pub, KVCDN_TRUST)",
                ", ".join(edges),
            )
        parse_codecs(self.codecs)
        if self.assumed_gbps <= 0:
            raise InvalidArgument("assumed_gbps must be positive")
        if self.membership_refresh_s <= 0:
            raise InvalidArgument("membership_refresh_s must be positive")
        if min(self.max_streams, self.streams_per_fetch, self.streams_per_run) < 1:
            raise InvalidArgument("max_streams, streams_per_fetch and streams_per_run must be at least 1")
