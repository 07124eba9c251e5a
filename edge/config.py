"""Edge configuration, built from `kvcdn edge` flags (or directly by tests)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kvcdn.errors import InvalidArgument
from kvcdn.spec.placement import DEFAULT_REPLICAS, read_edges
from kvcdn.wire.tls import TLSFiles

__all__ = ["EdgeConfig"]


@dataclass(frozen=True)
class EdgeConfig:
    origin: str
    """Origin address HOST:PORT."""
    listen: str = "127.0.0.1:7080"
    """HOST:PORT to serve on; port 0 picks a free port."""
    mem_bytes: int = 1 << 30
    """Byte budget of the in-memory block tier."""
    disk_dir: Path | None = None
    """Folder of the disk tier (none without it)."""
    disk_bytes: int = 10 << 30
    """Byte budget of the disk tier."""
    bulk_port: int = 0
    """TCP port of the bulk frame stream on the listen host: 0 picks a free port, -1 turns it off."""
    metrics_port: int = -1
    """Port of the Prometheus `/metrics` endpoint on the listen host: 0 picks a free port, -1 turns it off."""
    origin_timeout_s: float = 10.0
    """Deadline of each unary call to the origin or a peer (a stream gets ten times this)."""
    peers: tuple[str, ...] = ()
    """Every edge of the ring, this one included, as the clients list them (`HOST:PORT[=WEIGHT]`, DNS
    names for all their addresses, `@PATH` for a file's entries): blocks this edge does not own are
    loaded from their owners. Files and names are followed while the edge runs."""
    membership_refresh_s: float = 5.0
    """How often the edge re-reads `@PATH` peer lists and re-resolves peer names (kvcdn.edge.peers)."""
    replicas: int = DEFAULT_REPLICAS
    """Owners per block on the ring (the clients' setting)."""
    peer_timeout_s: float = 1.0
    """Longest wait for a peer's first frame before the next owner, then the origin, is asked."""
    bulk_pulls: bool = True
    """Load blocks from peers and the origin over their bulk ports where they offer one, each load a
    stream in a worker thread (False, or a server without one: gRPC StreamBlocks)."""
    pull_threads: int = 64
    """Worker threads for loads over bulk ports (more loads at once wait for one)."""
    advertise: str = ""
    """This edge's entry in `peers` (default: the address it is bound to)."""
    peer_suspect_s: float = 10.0
    """After a peer fails to send a block, it is skipped for this long."""
    prefetch_blocks: int = 4
    """Blocks a stream loads ahead of the one it is sending, so loads overlap the stream."""
    pinned_bytes: int = 0
    """Bytes of blocks the streams in flight may hold, all together (the block each is sending and
    those loaded ahead: kvcdn.edge.pins); the memory tier's evictions cannot free them meanwhile.
    0: half the memory tier, at least 256 MiB (`pinned_budget`)."""
    stall_s: float = 5.0
    """A stream whose reader took nothing for this long is cut when others wait for pinned bytes."""
    remembered_misses: int = 65536
    """Misses the admission rule remembers (a block missed before is admitted when it comes back)."""
    origin_lookups: int = 32
    """Lookups this edge forwards to the origin at once; more wait their turn (a flood of lookups for
    keys nobody holds reaches the origin at this concurrency, not the flood's)."""
    miss_ttl_s: float = 1.0
    """How long a lookup the origin answered with nothing is answered with nothing again, without
    asking it (agents polling for a document not yet published)."""
    manifest_cache_s: float = 1.0
    """How long the origin's answer for a document's latest manifest is kept and given again (numbered
    versions never change: they are kept until evicted or purged)."""
    remembered_infos: int = 65536
    """Block infos kept from the origin's lookup answers, so a pull needs no second lookup."""
    tls: TLSFiles | None = None
    """TLS files: the edge serves with them and calls the origin and its peers with them (one CA per
    deployment; with `ca`, callers must present certificates too); None: plaintext."""
    token: str = ""
    """The edge's own token (role `edge`, kvcdn.wire.auth): for the origin's invalidation feed, and for
    reads from the origin and from peers where the deployment closes them."""
    tokens: Path | None = None
    """Tokens file (`ROLE TOKEN` lines) of the callers this edge serves; with it reads are closed:
    they need a token of any role in it (agents `reader`, peers `edge`). None: reads are open."""
    trust: tuple[Path, ...] = ()
    """Publisher public keys (PEM) whose signature every block info must carry, from the origin and
    from peers alike (kvcdn.spec.provenance); empty: no signature checks."""
    rate_limit: float = 0.0
    """Calls (and bulk streams) a second per client, by token or else address; peers and the origin's
    own callers with an `edge` or `publisher` token are not limited (kvcdn.wire.ratelimit). 0: none."""
    grant_issuers: tuple[Path, ...] = ()
    """Public keys (PEM) of the grant issuers this edge trusts (kvcdn.edge.tolls); empty: it serves
    no priced document."""
    receipt_key: Path | None = None
    """This edge's receipt signing key (`kvcdn keys generate`); needed with `grant_issuers`."""
    receipts_dir: Path | None = None
    """Folder of the receipt journal and the outbox of batches (kvcdn.edge.receiptbook); needed with
    `grant_issuers`."""
    receipt_batch: int = 100
    """Receipts per batch shipped to the outbox."""
    receipt_batch_s: float = 60.0
    """A batch is shipped at least this often when receipts wait."""
    revocations: Path | None = None
    """File of revoked grant ids, one a line, read again whenever it changes (None: none)."""

    @property
    def pinned_budget(self) -> int:
        return self.pinned_bytes or max(256 << 20, self.mem_bytes // 2)

    def __post_init__(self) -> None:
        if self.mem_bytes < 0 or self.disk_bytes < 0 or self.pinned_bytes < 0:
            raise InvalidArgument("--mem-bytes, --disk-bytes and --pinned-bytes must be >= 0")
        if self.stall_s <= 0:
            raise InvalidArgument("stall_s must be positive")
        if self.origin_timeout_s <= 0:
            raise InvalidArgument("origin_timeout_s must be positive")
        if self.peer_timeout_s <= 0:
            raise InvalidArgument("peer_timeout_s must be positive")
        if self.replicas < 1:
            raise InvalidArgument("replicas must be at least 1")
        if self.peer_suspect_s < 0 or self.prefetch_blocks < 0:
            raise InvalidArgument("peer_suspect_s and prefetch_blocks must be >= 0")
        if self.pull_threads < 1:
            raise InvalidArgument("pull_threads must be at least 1")
        if self.origin_lookups < 1 or self.miss_ttl_s < 0:
            raise InvalidArgument("origin_lookups must be at least 1 and miss_ttl_s >= 0")
        if self.rate_limit < 0:
            raise InvalidArgument("--rate-limit must be >= 0 (0: no limit)")
        if self.remembered_misses < 0 or self.remembered_infos < 0:
            raise InvalidArgument("remembered_misses and remembered_infos must be >= 0")
        if self.membership_refresh_s <= 0:
            raise InvalidArgument("membership_refresh_s must be positive")
        if self.grant_issuers and (self.receipt_key is None or self.receipts_dir is None):
            raise InvalidArgument("an edge that takes grants (--grant-issuers) needs --receipt-key and --receipts")
        if self.receipt_batch < 1 or self.receipt_batch_s <= 0:
            raise InvalidArgument("--receipt-batch must be at least 1 and receipt_batch_s positive")
        if self.peers:
            read_edges(self.peers)  # fail early on a malformed list or a missing file
