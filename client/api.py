"""KVClient: fetch the longest cached prefix of a token sequence from the edges as a DynamicCache."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import torch

from kvcdn.client.answers import check_lookup, check_manifest
from kvcdn.client.config import ClientConfig
from kvcdn.client.policy import Decision, Estimates, Policy, decide, fetch_key
from kvcdn.errors import DeadlineExceeded, DigestMismatch, FingerprintMismatch, InvalidArgument, Unavailable
from kvcdn.model import adapter
from kvcdn.model.codecs import decodes_on_device
from kvcdn.model.loading import LoadedModel
from kvcdn.model.receiving import DecodingAssembler, KVAssembler
from kvcdn.model.staging import StagingPool
from kvcdn.model.tensors import LayerKV, synchronize
from kvcdn.spec.codecs import parse_codecs
from kvcdn.spec.geometry import Geometry
from kvcdn.spec.identity import block_keys
from kvcdn.spec.placement import Membership, Placement, balance
from kvcdn.spec.provenance import TrustStore
from kvcdn.spec.receipts import RECEIPT_KEY
from kvcdn.v1 import kvcdn_pb2 as pb
from kvcdn.wire.receiver import Progress
from kvcdn.wire.source import Suspects, Transport, fail_over, stream_from
from kvcdn.wire.stub import CacheReader

__all__ = ["ClientConfig", "FetchedCache", "KVClient", "ReceiveTimes", "Run", "generate_from_cache"]

log = logging.getLogger(__name__)

_RETRYABLE = (Unavailable, DeadlineExceeded)

Target = KVAssembler | DecodingAssembler
"""Where a fetch's frames land: the cache's buffers, or encoded blocks decoded into them."""


@dataclass(frozen=True)
class Run:
    """Blocks of one fetch that travel in one stream, from `edge` first."""

    edge: str
    blocks: list[pb.BlockInfo]


@dataclass
class ReceiveTimes:
    """Where a fetch's bulk streams spent their time, all streams together."""

    cpu_s: float = 0.0
    """CPU seconds of the threads receiving the streams (reading, verifying, landing blocks)."""
    wall_s: float = 0.0
    """Seconds those threads were at it (each stream's time, added up)."""

    @property
    def busy(self) -> float:
        """The share of their time the receiving threads ran on a core (the rest: waiting for bytes,
        or for the GIL)."""
        return self.cpu_s / self.wall_s if self.wall_s else 0.0


@dataclass
class FetchedCache:
    """The KV of the first `cached_tokens` tokens of a sequence, verified and on the model's device."""

    layers: list[LayerKV]
    """Per layer (keys, values), each `[1, kv_heads, cached_tokens, head_dim]`; empty if none was cached."""
    cached_tokens: int
    n_bytes: int
    """Payload bytes streamed (encoded, for an encoded cache)."""
    fetch_s: float
    """Seconds from the first lookup to a cache ready for generate(): lookup, stream, verify, rebuild."""
    edges_used: list[str] = field(default_factory=list)
    """Edges that streamed (or failed to stream) part of the cache, in the order first asked."""
    first_frame_s: float = 0.0
    """Seconds from the first lookup to the first verified frame (0 if nothing was cached)."""
    codec: str = "raw"
    """Encoding the cache travelled in (kvcdn.spec.codecs; a lossy one only where the caller accepted it)."""
    streams: int = 0
    """Streams that ran at the same time (runs of blocks, bounded by `streams_per_fetch`)."""
    decision: Decision | None = None
    """With `KVClient.prepare`: whether the cached prefix was fetched or left to a local prefill, and why."""
    receiving: ReceiveTimes = field(default_factory=ReceiveTimes)
    """Where the receiving threads of its bulk streams spent their time."""
    copy_s: float = 0.0
    """Seconds a GPU spent copying the cache's bytes from host staging (CUDA events; 0 on the CPU)."""
    land_s: float = 0.0
    """Seconds from the last stream's end to the cache ready on its device (the last copies landing)."""
    receipts: list[pb.Receipt] = field(default_factory=list)
    """The edges' signed receipts for a priced load (`KVClient.fetch_document`), one per stream."""

    def cache(self, model: LoadedModel) -> Any:
        """A fresh transformers DynamicCache over these tensors (generate() grows a cache in place;
        each call returns a new one, and the stored tensors are never modified)."""
        return adapter.build_cache(model.model, self.layers)


def generate_from_cache(
    model: LoadedModel, fetched: FetchedCache, ids: list[int], max_new_tokens: int
) -> adapter.Generation:
    """Greedy continuation of `ids` (the cached prefix followed by new tokens, e.g. a question)."""
    if fetched.cached_tokens >= len(ids):
        raise InvalidArgument("ids must extend past the cached prefix by at least one token")
    return adapter.greedy(model.model, ids, max_new_tokens, cache=fetched.layers or None)


class KVClient:
    """Async client over a ring of edges. Use inside one event loop (`async with`).

    Each block is asked of its owners on the consistent-hash ring (kvcdn.spec.placement), then of the
    other edges; consecutive blocks with the same primary owner travel in one stream.
    """

    def __init__(self, edges: Sequence[str] | ClientConfig) -> None:
        self.config = edges if isinstance(edges, ClientConfig) else ClientConfig(tuple(edges))
        self.membership = Membership(self.config.edges, self.config.replicas, self.config.membership_refresh_s)
        """The edge set and its ring, followed while the client runs (re-read before calls when due)."""
        self.trust = TrustStore.from_files(self.config.trust) if self.config.trust else None
        self._readers: dict[str, CacheReader] = {}
        self._refreshing: asyncio.Task[bool] | None = None
        self._info: pb.ServerInfo | None = None
        self.suspects = Suspects(self.config.suspect_s)
        """Edges that recently failed: asked last (kvcdn.wire.source)."""
        self.staging = StagingPool() if torch.cuda.is_available() else None
        """Pinned host buffers reused by fetches that land on a GPU."""
        self.estimates = Estimates()
        """Bandwidth of this client's fetches and prefill rates of its models (fetch or prefill)."""
        # Bulk streams block a thread each; the event loop's default pool (a handful of threads) would
        # queue concurrent fetches behind one another.
        self._receivers = ThreadPoolExecutor(self.config.max_streams, thread_name_prefix="kvcdn-receive")
        self._transport = Transport(
            self._receivers,
            self.config.stream_timeout_s,
            bulk=self.config.bulk,
            tls=self.config.tls.client_context() if self.config.tls is not None else None,
            token=self.config.token,
        )

    @property
    def placement(self) -> Placement:
        """The ring of the edge set as last read."""
        return self.membership.placement

    def _reader(self, address: str) -> CacheReader:
        """The stub of the edge at `address` (made on first use: edges may join while the client runs;
        those of edges that left stay open until `close`, for the streams still on them)."""
        if address not in self._readers:
            self._readers[address] = CacheReader(
                address, self.config.timeout_s, self.config.stream_timeout_s, self.config.token, self.config.tls
            )
        return self._readers[address]

    async def follow_membership(self) -> bool:
        """Re-read the edge set if it is due (`membership_refresh_s`), off the event loop (DNS may
        block), once however many calls ask at the same time; True when the ring changed."""
        if self._refreshing is None or self._refreshing.done():
            if not self.membership.due:
                return False
            self._refreshing = asyncio.ensure_future(asyncio.to_thread(self.membership.refresh))
        return await asyncio.shield(self._refreshing)

    async def close(self) -> None:
        if self._refreshing is not None:
            await asyncio.gather(self._refreshing, return_exceptions=True)
        for reader in self._readers.values():
            await reader.close()
        self._receivers.shutdown(wait=False)

    async def __aenter__(self) -> KVClient:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _first(self, order: Sequence[str], call: Any, also: tuple[type[Exception], ...] = ()) -> Any:
        """`call(reader)` on the first edge of `order` that answers (`also`: further errors that make
        an edge's answer worthless, such as one a trusted publisher did not sign)."""
        last: Exception | None = None
        skipped: tuple[type[Exception], ...] = (*_RETRYABLE, *also)
        for address in self.suspects.order(order):
            try:
                return await call(self._reader(address))
            except skipped as exc:
                log.warning("edge %s failed (%s); trying the next one", address, exc)
                self.suspects.suspect(address)
                last = exc
        assert last is not None
        raise last

    async def info(self) -> pb.ServerInfo:
        if self._info is None:
            self._info = await self._first(self.placement.nodes, lambda r: r.info())
        assert self._info is not None
        return self._info

    async def geometry_for(self, model: LoadedModel) -> Geometry:
        """The network's geometry, after checking it serves caches of `model`."""
        info = await self.info()
        if info.fingerprint != model.fingerprint_hex:
            raise FingerprintMismatch(
                f"the edges serve caches of model fingerprint {info.fingerprint[:16]}… ({info.model}); "
                f"the local model {model.name} is {model.fingerprint_hex[:16]}…: load the same model, "
                "dtype and attention implementation"
            )
        served, own = Geometry.from_proto(info.geometry), model.geometry
        shape = (served.layers, served.kv_heads, served.head_dim, served.dtype)
        if shape != (own.layers, own.kv_heads, own.head_dim, own.dtype) or served.block_tokens > 1 << 16:
            # The fingerprint matched, so the server misstates its geometry: never size buffers from it.
            raise FingerprintMismatch(
                f"the edges describe a KV geometry {shape} (blocks of {served.block_tokens} tokens) that is not "
                f"the model's own {(own.layers, own.kv_heads, own.head_dim, own.dtype)}: a faulty or hostile edge"
            )
        return served

    async def lookup(
        self, model: LoadedModel, ids: Sequence[int], codecs: Sequence[str] | None = None
    ) -> list[pb.BlockInfo]:
        """Infos of the longest cached prefix of `ids`, in block order, in the first of `codecs`
        (default: the config's) that reaches that length (one LookupPrefix for all of them)."""
        geometry = await self.geometry_for(model)
        keys = block_keys(model.fingerprint, ids, geometry.block_tokens)
        if not keys:
            raise InvalidArgument("the token sequence is empty")
        accepted = parse_codecs(codecs or self.config.codecs)

        async def ask(reader: CacheReader) -> list[pb.BlockInfo]:
            blocks = await reader.lookup(model.fingerprint_hex, keys, accepted)
            check_lookup(blocks, keys, accepted, geometry, len(ids), model.fingerprint, reader.address, self.trust)
            return blocks

        # An edge whose answer is malformed or unsigned is skipped like one that is down.
        await self.follow_membership()
        found: list[pb.BlockInfo] = await self._first(self.placement.route(keys[0]), ask, also=(DigestMismatch,))
        return found

    async def manifest(self, document: str, version: int = 0, token_ids: bool = False) -> pb.Manifest:
        """A published document's manifest (version 0: the latest): the one asked for, its token ids
        (when asked for) those its content digest and block keys were made from; with trusted keys,
        signed by one of them and, as the latest, never older than a version this client has seen
        (rollback). An edge whose answer fails a check is skipped like one that is down."""

        async def ask(reader: CacheReader) -> pb.Manifest:
            manifest = await reader.manifest(document, version, token_ids)
            if self.trust is not None:
                self.trust.check_manifest(manifest, latest=version == 0, sender=reader.address)
            check_manifest(manifest, document, version, reader.address)
            return manifest

        await self.follow_membership()
        found: pb.Manifest = await self._first(self.placement.nodes, ask, also=(DigestMismatch,))
        return found

    async def prepare(
        self, model: LoadedModel, ids: Sequence[int], policy: Policy = "auto", codecs: Sequence[str] | None = None
    ) -> FetchedCache:
        """The cache an agent should start from for `ids`: the longest cached prefix when fetching it
        (and prefilling the rest) is predicted faster than prefilling everything, else nothing
        (`policy="auto"`, see kvcdn.client.policy); `fetch` / `prefill` force either. The prefill
        times of `model` are measured once (`calibrate`) before its first auto decision."""
        t0 = time.perf_counter()
        blocks = await self.lookup(model, ids, codecs)
        key = model.device_key
        if policy == "auto" and blocks and key not in self.estimates.prefill_s:
            c0 = time.perf_counter()
            await self.calibrate(model, ids)
            t0 += time.perf_counter() - c0  # a one-off measurement, not part of this fetch's time
        rate_key = fetch_key(blocks[0].codec if blocks else "", str(model.device))
        n_bytes = sum(b.n_bytes for b in blocks)
        decision = decide(
            policy,
            tokens=len(ids),
            cached_tokens=sum(b.n_tokens for b in blocks),
            cached_fetch_s=self.estimates.fetch_seconds(rate_key, n_bytes, self.config.assumed_gbps * 1e9),
            prefill_seconds=lambda n: self.estimates.prefill_seconds(key, n),
        )
        if decision.action == "prefill":
            return FetchedCache([], 0, 0, time.perf_counter() - t0, decision=decision)
        fetched = await self._fetch_blocks(model, blocks, t0)
        fetched.decision = decision
        return fetched

    async def calibrate(
        self, model: LoadedModel, ids: Sequence[int], lengths: Sequence[int] = (256, 1024)
    ) -> dict[int, float]:
        """Time `model`'s prefill of the first `lengths` tokens of `ids` (as many as it has), after one
        untimed prefill of a few (a first call pays for kernel selection and allocations); the
        seconds by length, remembered in `estimates`."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, adapter.timed_prefill, model.model, list(ids[:16]))
        timed = {}
        for n in sorted({min(n, len(ids)) for n in lengths}):
            _, timed[n] = await loop.run_in_executor(None, adapter.timed_prefill, model.model, list(ids[:n]))
            self.estimates.observe_prefill(model.device_key, n, timed[n])
        return timed

    async def fetch_document(
        self, model: LoadedModel, document: str, version: int = 0, codecs: Sequence[str] | None = None
    ) -> tuple[FetchedCache, pb.Manifest]:
        """The cache of a published document (version 0: the latest) and its manifest (with its token
        ids). A priced one is loaded as such: each stream names the document and pays with the
        config's wallet (a fresh proof per request), and `receipts` holds what the edges signed."""
        t0 = time.perf_counter()
        manifest = await self.manifest(document, version, token_ids=True)
        paid = (document, manifest.version, secrets.token_hex(8))
        blocks = await self.lookup(model, list(manifest.token_ids), codecs)
        return await self._fetch_blocks(model, blocks, t0, paid), manifest

    async def fetch(self, model: LoadedModel, ids: Sequence[int], codecs: Sequence[str] | None = None) -> FetchedCache:
        """Stream and verify the longest cached prefix of `ids` into tensors on the model's device, in
        the first of `codecs` (default: the config's) that holds it, decoded."""
        t0 = time.perf_counter()
        return await self._fetch_blocks(model, await self.lookup(model, ids, codecs), t0)

    async def _fetch_blocks(
        self, model: LoadedModel, blocks: list[pb.BlockInfo], t0: float, paid: tuple[str, int, str] | None = None
    ) -> FetchedCache:
        geometry = await self.geometry_for(model)
        n_tokens = sum(b.n_tokens for b in blocks)
        if not blocks:
            return FetchedCache([], 0, 0, time.perf_counter() - t0)
        codec = blocks[0].codec or "raw"
        # fp8 and int4 blocks bound for a GPU are copied there encoded and decoded in place: no host
        # staging for the decoded cache (kvcdn.model.receiving.DecodingAssembler).
        on_device = decodes_on_device(codec, model.device)
        into = KVAssembler(geometry, n_tokens, model.device, self.staging, host_staging=not on_device)
        assembler: Target = into if codec == "raw" else DecodingAssembler(into, blocks, on_device)
        # Every run of blocks streams at once (the ring spreads a document over its edges), each into
        # its own part of the tensors; a failure in one run fails over on its own, as if it were alone.
        runs = self.runs(blocks)
        progress = [Progress() for _ in runs]
        gate = asyncio.Semaphore(self.config.streams_per_fetch)
        receiving = ReceiveTimes()

        async def stream(run: Run, at: Progress) -> list[str]:
            async with gate:
                return await self._stream_into(model.fingerprint_hex, geometry, run, assembler, at, receiving, paid)

        results = await asyncio.gather(
            *(stream(r, p) for r, p in zip(runs, progress, strict=True)), return_exceptions=True
        )
        used: list[str] = []
        for result in results:
            if isinstance(result, BaseException):
                assembler.close()  # every stream has ended: its staging goes back to the pool
                raise result
            used += [address for address in result if address not in used]
        first_frame_at = min((p.first_frame_at for p in progress if p.first_frame_at), default=t0)
        streamed_at = time.perf_counter()
        layers = await asyncio.get_running_loop().run_in_executor(None, self._land, assembler)
        fetched = FetchedCache(
            layers=layers,
            cached_tokens=n_tokens,
            n_bytes=sum(b.n_bytes for b in blocks),
            fetch_s=time.perf_counter() - t0,
            edges_used=used,
            first_frame_s=first_frame_at - t0,
            streams=min(len(runs), self.config.streams_per_fetch),
            codec=codec,
            receiving=receiving,
            copy_s=into.copy_s,
            land_s=time.perf_counter() - streamed_at,
            receipts=[pb.Receipt.FromString(v) for p in progress for k, v in p.trailers if k == RECEIPT_KEY],
        )
        fixed_s = fetched.first_frame_s + fetched.land_s
        self.estimates.observe_fetch(fetch_key(codec, str(model.device)), fetched.n_bytes, fetched.fetch_s, fixed_s)
        return fetched

    @staticmethod
    def _land(assembler: Target) -> list[LayerKV]:
        """The assembled tensors on their device, copies finished (a fetch ends when the cache can be used)."""
        try:
            layers = assembler.layers()
        finally:
            assembler.close()  # released by layers() already, unless it raised
        synchronize(assembler.device)
        return layers

    def runs(self, blocks: list[pb.BlockInfo]) -> list[Run]:
        """The blocks grouped by the edge each is streamed from (in order within a group), each group
        cut into at most `streams_per_run` parts of about equal size: each run travels in one stream,
        and all of a fetch's runs stream at once (up to `streams_per_fetch`), so a fetch from N edges
        ends with its N streams together rather than with runs queued behind the first ones.

        With `spread`, each block comes from one of its R owners chosen so that no edge sends much
        more of the fetch than the others (kvcdn.spec.placement.balance): on a ring of 4, a 15-block
        document's primaries alone leave the busiest edge 5 to 10 blocks, the fetch lasts as long as
        that edge, and its owners spread it 4 or 5. A replica that lacks a block loads it once from
        the primary (kvcdn.edge) and holds it from then on."""
        owners = [self.placement.owners(info.key) for info in blocks]
        sizes = [info.n_bytes for info in blocks]
        edge_of = balance(owners, sizes) if self.config.spread else [o[0] for o in owners]
        groups: dict[str, list[pb.BlockInfo]] = {}
        for edge, info in zip(edge_of, blocks, strict=True):
            groups.setdefault(edge, []).append(info)
        runs: list[Run] = []
        for edge, group in groups.items():
            size = -(-len(group) // min(self.config.streams_per_run, len(group)))
            runs += [Run(edge, group[i : i + size]) for i in range(0, len(group), size)]
        return runs

    async def _stream_into(
        self,
        fingerprint: str,
        geometry: Geometry,
        run: Run,
        assembler: Target,
        progress: Progress,
        receiving: ReceiveTimes,
        paid: tuple[str, int, str] | None = None,
    ) -> list[str]:
        """Write every frame of `run` into `assembler`, asking its edge first, then the first block's
        route on the ring in order, resuming on the next edge after a failure at exactly the frame
        where it broke (the bulk streams' receiving threads add their times to `receiving`). `paid`:
        (document, version, load id) of a load, each request named by where it starts."""
        blocks = run.blocks
        route = self.placement.route(blocks[0].key)

        async def attempt(address: str) -> None:
            started = time.perf_counter()
            load = None
            if paid is not None and self.config.wallet is not None:
                document, version, load_id = paid
                key = f"{load_id}/{blocks[progress.block].index}.{progress.frame}"
                load = self.config.wallet.load(document, version, address, key)
            elif paid is not None:
                load = pb.Load(document=paid[0], version=paid[1], idempotency_key=paid[2])
            cpu_s = await stream_from(
                self._reader(address), fingerprint, blocks, geometry, assembler, progress, self._transport, load=load
            )
            receiving.cpu_s += cpu_s  # (not `+= await`: other streams add meanwhile)
            if cpu_s:
                receiving.wall_s += time.perf_counter() - started

        order = self.suspects.order([run.edge, *(a for a in route if a != run.edge)])
        return await fail_over(order, attempt, progress, len(blocks), self.suspects.suspect)
