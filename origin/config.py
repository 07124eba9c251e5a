"""Origin configuration, built from `kvcdn origin` flags (or directly by tests)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kvcdn.errors import InvalidArgument
from kvcdn.model.options import DEFAULT_MODEL
from kvcdn.spec.codecs import parse_codecs
from kvcdn.spec.geometry import DEFAULT_FRAME_BYTES, check_frame_bytes
from kvcdn.spec.identity import DEFAULT_BLOCK_TOKENS
from kvcdn.spec.placement import is_loopback
from kvcdn.wire.tls import TLSFiles

__all__ = ["OriginConfig"]


@dataclass(frozen=True)
class OriginConfig:
    store_dir: Path
    """Folder of the block and manifest store; created when missing."""
    listen: str = "127.0.0.1:7070"
    """HOST:PORT to serve on; port 0 picks a free port."""
    model: str = DEFAULT_MODEL
    """Alias, local model directory or hub id."""
    dtype: str = "auto"
    """Compute (and wire) dtype: auto, float32, float16 or bfloat16."""
    device: str = "auto"
    """auto, cpu or cuda."""
    models_dir: Path | None = None
    """Where the embedded default model is provisioned (default ~/.cache/kvcdn/models)."""
    max_document_tokens: int = 32768
    """Longest document accepted for publishing (RESOURCE_EXHAUSTED above)."""
    block_tokens: int = DEFAULT_BLOCK_TOKENS
    """Tokens per block."""
    frame_bytes: int = DEFAULT_FRAME_BYTES
    """Payload bytes per streamed frame."""
    bulk_port: int = 0
    """TCP port of the bulk frame stream on the listen host: 0 picks a free port, -1 turns it off."""
    metrics_port: int = -1
    """Port of the Prometheus `/metrics` endpoint on the listen host: 0 picks a free port, -1 turns it off."""
    read_cache_bytes: int = 256 << 20
    """Memory for recently streamed blocks, so hot blocks are not re-read from disk."""
    codecs: tuple[str, ...] = ("lossless",)
    """Encodings a document is offered in besides raw, unless its publisher names others
    (kvcdn.model.codecs)."""
    tokens: Path | None = None
    """Who may Publish, Purge and Watch: lines `ROLE TOKEN` (kvcdn.wire.auth); None lets anyone who
    reaches the port."""
    closed_reads: bool = False
    """Reads (manifests, lookups, streams, the bulk port) need a token of `tokens` too."""
    insecure: bool = False
    """Listen beyond loopback without `tokens` all the same (anyone who reaches the port may publish
    and purge); without it such a config is refused."""
    tls: TLSFiles | None = None
    """Serve gRPC and the bulk stream over TLS with these files (a CA among them: callers must
    present certificates, mTLS); None: plaintext (kvcdn.wire.tls)."""
    store_bytes: int = 0
    """Byte budget of the block store: a publish that could take it over is refused
    (RESOURCE_EXHAUSTED) before it computes anything; 0: no budget."""
    signing_key: Path | None = None
    """The publisher's Ed25519 key (PEM, `kvcdn keys generate`): block infos and manifests are signed
    with it (kvcdn.spec.provenance); None signs nothing."""
    rate_limit: float = 0.0
    """Calls (and bulk streams) a second per client, by token or else address; callers with an `edge`
    or `publisher` token are not limited (kvcdn.wire.ratelimit). 0: none."""
    manifest_ttl_s: float = 3600.0
    """How long a signed answer for a document's latest version may be relied on (its `valid_until`):
    the most an edge replaying an old answer can hold a client back; also the clock skew tolerated."""

    catalog: str = ""
    """PostgreSQL URL of a catalog shared with other origin workers (kvcdn.origin.catalog): manifests,
    the invalidation feed and the publish queue live there, blocks in `store_dir`, which the workers
    share; empty: this process keeps its own (files in `store_dir`)."""
    worker: str = ""
    """This worker's name in the shared publish queue (default: host name and a number)."""
    catalog_connect_s: float = 10.0
    """How long to try reaching the catalog's database at start before giving up (UNAVAILABLE)."""

    def __post_init__(self) -> None:
        if self.max_document_tokens <= 0:
            raise InvalidArgument("max_document_tokens must be positive")
        if self.read_cache_bytes < 0:
            raise InvalidArgument("read_cache_bytes must be >= 0")
        check_frame_bytes(self.frame_bytes, "--frame-bytes")
        parse_codecs(self.codecs, "codecs", allow_empty=True)
        if self.tokens is None and not self.insecure and not is_loopback(self.listen):
            raise InvalidArgument(
                f"the origin would listen on {self.listen} without --tokens: anyone who reaches it could "
                "publish and purge. Give it a tokens file (--tokens; deploy/README.md says how), listen "
                "on 127.0.0.1, or pass --insecure to run it open"
            )
        if self.closed_reads and self.tokens is None:
            raise InvalidArgument("closed reads need a tokens file (--tokens) naming who may read")
        if self.catalog and self.store_bytes:
            raise InvalidArgument(
                "--store-bytes counts what one process writes and cannot budget a store that several workers "
                "share (--catalog): size the shared volume instead"
            )
        if self.catalog and not self.catalog.startswith(("postgresql://", "postgres://")):
            raise InvalidArgument(
                f"--catalog must be a PostgreSQL URL (postgresql://USER@HOST:PORT/DATABASE), not {self.catalog!r}"
            )
        if self.store_bytes < 0:
            raise InvalidArgument("store_bytes must be >= 0 (0: no budget)")
        if self.rate_limit < 0:
            raise InvalidArgument("--rate-limit must be >= 0 (0: no limit)")
        if self.manifest_ttl_s < 1:
            raise InvalidArgument("--manifest-ttl must be at least 1 second")
