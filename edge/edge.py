"""The edge's domain logic: tiers (memory, then disk) over peers over the origin, with single-flight,
cut-through misses. No gRPC here beyond the stub it loads blocks with.

A missing block is loaded once however many requests ask for it (a `Pull`, run by the code base's one
single-flight primitive): the first request starts the load, later ones join it, and every one of
them streams each frame as soon as it has arrived and passed its digest, not after the whole block
has landed. Loads run detached from requests, so a reader that hangs up does not cancel a load for
the others.

Its parts: the loads (kvcdn.edge.pulls), the peers on the ring, asked before the origin (.peers),
the origin's invalidation feed (.feed), what a loaded block is kept in (.admission), what is kept of
the origin's answers (.upstream), which infos may be served (.vouching), the bytes streams hold
(.pins). A load resumes on the next source at the frame where one broke (kvcdn.wire.source.fail_over).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor

from kvcdn.edge.admission import admit
from kvcdn.edge.buffers import BlockBuffers
from kvcdn.edge.config import EdgeConfig
from kvcdn.edge.feed import Feed
from kvcdn.edge.peers import Peers
from kvcdn.edge.pins import Hold, Pins
from kvcdn.edge.pulls import Pull, PullTarget
from kvcdn.edge.tiers import Tier
from kvcdn.edge.tolls import Tolls
from kvcdn.edge.upstream import OriginAnswers
from kvcdn.edge.vouching import Voucher
from kvcdn.errors import InvalidArgument, KVCDNError, NotFound, PermissionDenied, Unauthenticated, Unavailable
from kvcdn.spec.codecs import best_prefix, parse_codecs
from kvcdn.spec.geometry import Geometry
from kvcdn.spec.identity import check_read_request, encoded_key
from kvcdn.spec.provenance import TrustStore
from kvcdn.store.lru import ByteLRU
from kvcdn.store.singleflight import SingleFlight
from kvcdn.tuning import trim_after_frees
from kvcdn.v1 import kvcdn_pb2 as pb
from kvcdn.wire.bulk import Trailers
from kvcdn.wire.frames import EncodedBlock, Frame, FrameSource, stream_blocks
from kvcdn.wire.receiver import Progress
from kvcdn.wire.source import Transport, fail_over, stream_from
from kvcdn.wire.stub import CacheReader

__all__ = ["Edge"]

log = logging.getLogger(__name__)

_ORIGIN_INFO_FILE = "origin-info.pb"


def _choice(first_key: bytes, accepted: Sequence[str]) -> bytes:
    """What the edge remembers about a sequence by: its first key and the encodings asked for."""
    return first_key + ",".join(accepted).encode()


class Edge:
    """Tiers of encoded blocks (fastest first) in front of one origin (`upstream`) and, once it knows
    its own address on the ring (`start`), its peers."""

    def __init__(self, config: EdgeConfig, upstream: CacheReader, tiers: Sequence[Tier]) -> None:
        if not tiers:
            raise InvalidArgument("an edge needs at least one tier")
        self.config = config
        self.upstream = upstream
        self.tiers = list(tiers)
        # Block infos lookups were answered with (by the origin, or by the owner edges for the blocks
        # they hold), so a pull needs no second lookup. An owner's info is trusted as far as the
        # bytes that owner sends.
        self._infos: ByteLRU[bytes, pb.BlockInfo] = ByteLRU(config.remembered_infos, lambda _: 1)
        self._origin_lookups = asyncio.Semaphore(config.origin_lookups)
        self._origin_misses: ByteLRU[bytes, float] = ByteLRU(config.remembered_misses, lambda _: 1)
        """Sequences (first key and accept list) the origin held nothing of, with when it said so."""
        self._chosen: ByteLRU[bytes, str] = ByteLRU(config.remembered_infos, lambda _: 1)
        """The encoding the origin chose for a sequence (first key) and an accept list (kvcdn.spec.codecs)."""
        self._loads: SingleFlight[bytes, Pull] = SingleFlight()
        self._stream_lookups: SingleFlight[tuple[bytes, ...], asyncio.Future[None]] = SingleFlight()
        """Origin lookups for the blocks of streams (`_look_up_unknown`), shared by identical streams."""
        self._seen: ByteLRU[bytes, bool] = ByteLRU(config.remembered_misses, lambda _: 1)
        trust = TrustStore.from_files(config.trust) if config.trust else None
        self.voucher = Voucher(trust, self._infos, config.remembered_infos)
        """Publisher keys every block info must be signed by (kvcdn.spec.provenance), if any."""
        self.pins = Pins(config.pinned_budget, config.stall_s)
        """Bytes the streams in flight hold (kvcdn.edge.pins)."""
        self.buffers = BlockBuffers(config.mem_bytes + config.pinned_budget)
        """Where loads land: block buffers reused as the tier evicts (kvcdn.edge.buffers)."""
        self._trimming: asyncio.Task[None] | None = None  # frees heap back (kvcdn.tuning)
        self.peers: Peers | None = None
        """The ring and the other edges on it (set by `start` when `config.peers` names them)."""
        self.tolls = Tolls(config)
        """What priced loads pay here, and their receipts (kvcdn.edge.tolls)."""
        self.feed = Feed(upstream, self.invalidate, self.tolls.apply)
        self.answers = OriginAnswers(
            upstream,
            config.disk_dir / _ORIGIN_INFO_FILE if config.disk_dir is not None else None,
            config.manifest_cache_s,
            config.miss_ttl_s,
        )
        """The origin's ServerInfo and manifests, as far as this edge keeps them (kvcdn.edge.upstream)."""
        self._pulling = ThreadPoolExecutor(config.pull_threads, thread_name_prefix="kvcdn-pull")
        self._transport = Transport(
            self._pulling,
            10 * config.origin_timeout_s,
            bulk=config.bulk_pulls,
            tls=config.tls.client_context() if config.tls is not None else None,
            token=config.token,
        )
        """How loads stream from peers and the origin (kvcdn.wire.source): bulk where offered."""
        self.origin_fetches = 0
        self.bytes_from_origin = 0
        self.peer_fetches = 0
        self.bytes_from_peers = 0
        self.admissions_refused = 0
        self.invalidated_blocks = 0

    @property
    def invalidated_seq(self) -> int:
        """Last invalidation event applied."""
        return self.feed.seq

    # --- lifecycle --------------------------------------------------------------------------------

    def start(self, address: str) -> None:
        """Serve as `address` (the bound HOST:PORT, unless `config.advertise` names another): join the
        ring of `config.peers`, if any, following it; follow the origin's invalidation feed."""
        self.peers = Peers(self.config, address) if self.config.peers else None
        if self.peers is not None:
            self.peers.start()
        self.feed.start()
        self.tolls.start(address)
        frees = lambda: (self.pins.released, [tier.stats().evictions for tier in self.tiers])  # noqa: E731
        self._trimming = asyncio.get_running_loop().create_task(trim_after_frees(frees))

    def invalidate(self, event: pb.InvalidationEvent) -> None:
        """Drop the event's blocks from every tier, and what is kept of its document's manifests;
        they are never served again."""
        if event.document:
            self.answers.forget(event.document)
        for key in event.keys:
            if (pull := self._loads.get(key)) is not None:
                pull.stale = True
            self._infos.pop(key)
            dropped = [tier.drop(key) for tier in self.tiers]
            self.invalidated_blocks += any(dropped)

    async def settle(self, timeout_s: float | None = None) -> None:
        """Wait until the block loads in progress have finished, disk writes included."""
        await self._loads.settle(timeout_s)

    async def close(self, settle_s: float = 5.0) -> None:
        """Stop following the feed, let loads in progress finish (at most `settle_s`, then cancel
        them), and close the connections to peers and origin."""
        await self._loads.close(settle_s)
        await self._stream_lookups.close(settle_s)
        await self.feed.close()
        if self._trimming is not None:
            self._trimming.cancel()
        if self.peers is not None:
            await self.peers.close()
        await self.upstream.close()
        self._pulling.shutdown(wait=False)
        self.tolls.close()

    # --- read side --------------------------------------------------------------------------------

    @property
    def loads_in_flight(self) -> int:
        return len(self._loads)

    async def origin_info(self) -> pb.ServerInfo:
        """The origin's ServerInfo (kept on the disk tier too: kvcdn.edge.upstream)."""
        return await self.answers.server_info()

    async def info(self) -> pb.ServerInfo:
        return await self.answers.edge_info()

    async def manifest(self, document: str, version: int, token_ids: bool = False) -> pb.Manifest:
        return await self.answers.manifest(document, version, token_ids)

    def _held(self, key: bytes) -> pb.BlockInfo | None:
        """The info of a block this edge holds, as it answers lookups (none for a block whose stored
        info no trusted signature covers: kvcdn.edge.vouching)."""
        for tier in self.tiers:
            if (info := tier.info(key)) is not None:
                return self.voucher.held(info, self.answers.fingerprint)
        return None

    async def lookup(
        self, fingerprint: str, keys: Sequence[bytes], codecs: Sequence[str] = (), from_peer: bool = False
    ) -> list[pb.BlockInfo]:
        """The longest prefix of `keys` in the first of `codecs` (empty: raw) that reaches it. This edge's
        tiers and the infos it was told before (else its peers, for the blocks they own) answer alone
        when together they cover the whole sequence in the encoding the origin chose last time for it
        (or in the first one asked for); otherwise the origin is asked, and its infos remembered.
        `from_peer`: a peer asks which of `keys` this edge holds: the tiers answer, nobody else."""
        check_read_request(fingerprint, (await self.origin_info()).fingerprint, keys)
        accepted = parse_codecs(codecs, "codecs", allow_empty=True) or ("raw",)
        if from_peer:
            return self._held_among(keys, accepted)
        choice = _choice(keys[0], accepted)

        def complete(found: list[pb.BlockInfo]) -> bool:
            return len(found) == len(keys) and (found[0].codec or "raw") in (accepted[0], self._chosen.get(choice))

        # Infos told before were checked then and a purge drops them: a warm lookup asks no peer.
        found = best_prefix(keys, accepted, lambda k: self._held(k) or self._infos.get(k))
        if not complete(found) and self.peers is not None:
            at_peers = await self.peers.infos(
                fingerprint, keys, accepted, lambda key: self._held(key) is not None, self._trusted
            )
            for info in at_peers.values():
                self._infos.put(info.key, info)
            if at_peers:
                found = best_prefix(keys, accepted, lambda k: self._held(k) or at_peers.get(k))
        if complete(found):
            return found
        if not found and self._recently_missed(choice):
            return []
        try:
            async with self._origin_lookups:
                answer = await self.upstream.lookup(fingerprint, keys, accepted)
            from_origin = self._trusted(fingerprint, answer, "")
        except Unavailable:
            if not found:
                raise
            log.warning("origin unreachable; answering the lookup from the edges' tiers alone")
            return found
        for info in from_origin:
            self._infos.put(info.key, info)
        if from_origin:
            self._chosen.put(choice, from_origin[0].codec or "raw")
            self._origin_misses.pop(choice)
        elif not found:
            self._origin_misses.put(choice, time.monotonic())
        return from_origin if len(from_origin) >= len(found) else found

    def _recently_missed(self, choice: bytes) -> bool:
        """Whether the origin held nothing of that sequence (`_choice`) less than `miss_ttl_s` ago."""
        missed_at = self._origin_misses.get(choice)
        return missed_at is not None and time.monotonic() - missed_at < self.config.miss_ttl_s

    def _trusted(self, fingerprint: str, infos: list[pb.BlockInfo], source: str) -> list[pb.BlockInfo]:
        """`infos` from `source` ("": the origin), checked against the trusted publisher keys, if any."""
        return self.voucher.upstream(fingerprint, infos, source or self.upstream.address)

    def _held_among(self, keys: Sequence[bytes], accepted: Sequence[str]) -> list[pb.BlockInfo]:
        """For each of `keys` this edge holds in an accepted encoding, the first such block's info."""
        out: list[pb.BlockInfo] = []
        for key in keys:
            for codec in accepted:
                if (info := self._held(encoded_key(key, codec))) is not None:
                    out.append(info)
                    break
        return out

    async def block(self, fingerprint: str, key: bytes, from_peers: bool = True) -> FrameSource:
        """The block from the first tier, or the pull that is loading it (started here if none is)."""
        cached = await self.tiers[0].get(key)
        if cached is not None:
            return cached
        pull, started = self._loads.join(
            key,
            lambda: Pull(seen_before=key in self._seen, from_peers=from_peers),
            lambda pull: self._load(fingerprint, key, pull),
        )
        if started:
            self._seen.put(key, True)
        else:
            pull.requests += 1
        return pull

    async def _load(self, fingerprint: str, key: bytes, pull: Pull) -> None:
        """Fill `pull` from the lower tiers, else from peers or the origin, then offer the block to
        every tier above the one it came from. Readers finish before the slower tiers' writes."""
        try:
            block, source = None, len(self.tiers)
            for i, tier in enumerate(self.tiers[1:], start=1):
                if (block := self.voucher.kept(tier, await tier.get(key), self.answers.fingerprint)) is not None:
                    pull.start(len(block.frames))
                    for frame in block.frames:
                        pull.append(frame)
                    source = i
                    break
            if block is None:
                block = await self._pull(fingerprint, key, pull)
        except BaseException as exc:
            pull.finish(exc)
            if not isinstance(exc, (KVCDNError, asyncio.CancelledError)):
                log.exception("loading block %s… failed", key.hex()[:16])
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        pull.finish()
        for tier in self.tiers[:source]:
            s = tier.stats()
            kept = admit(
                tier_bytes=s.bytes,
                tier_max_bytes=s.max_bytes,
                block_bytes=block.n_bytes,
                requests=pull.requests,
                seen_before=pull.seen_before,
                stale=pull.stale,
            )
            if not kept:
                self.admissions_refused += not pull.stale
                continue
            try:
                await tier.put(block)
            except (OSError, KVCDNError) as exc:
                log.warning("could not keep block %s… in the %s tier: %s", key.hex()[:16], tier.metrics.tier, exc)

    async def _pull(self, fingerprint: str, key: bytes, pull: Pull) -> EncodedBlock:
        """Load one block into `pull` from its owners on the ring (if this edge is not one) or the
        origin, verifying every frame against the origin's digests before anyone sees it."""
        info = self._infos.get(key)  # kept: a stream's tolls read it (`stream`, `known`)
        if info is None:
            if self._recently_missed(_choice(key, ("raw",))):
                raise NotFound(f"block {key.hex()[:16]}… is not stored at the origin")
            infos = self._trusted(fingerprint, await self.upstream.lookup(fingerprint, [key]), "")
            if not infos:
                raise NotFound(f"block {key.hex()[:16]}… is not stored at the origin")
            info = infos[0]
            self._infos.put(key, info)
        geometry = Geometry.from_proto((await self.origin_info()).geometry)
        pull.start(len(info.frame_digests))
        target = PullTarget(info, geometry, pull, asyncio.get_running_loop(), self.buffers)
        progress = Progress()
        origin = self.upstream.address
        peers = self.peers.sources(key) if self.peers is not None and pull.from_peers else []

        async def attempt(source: str) -> None:
            from_peer = source != origin
            had = target.payload_bytes
            try:
                # a peer silent for peer_timeout_s is skipped; once frames flow, the stream's deadline applies
                await stream_from(
                    self.peers.reader(source) if from_peer and self.peers is not None else self.upstream,
                    fingerprint,
                    [info],
                    geometry,
                    target,
                    progress,
                    self._transport,
                    from_peer=from_peer,
                    first_frame_s=self.config.peer_timeout_s if from_peer else None,
                )
            except asyncio.CancelledError:
                target.abandon()  # a bulk stream's thread appends nothing more
                raise
            except (Unauthenticated, PermissionDenied) as exc:  # a peer that serves priced blocks to tokens only
                raise exc if not from_peer else Unavailable(f"{exc}; asking the next source") from None
            finally:
                got = target.payload_bytes - had
                if from_peer:
                    self.bytes_from_peers += got
                else:
                    self.bytes_from_origin += got
            if from_peer:
                self.peer_fetches += 1
            else:
                self.origin_fetches += 1

        def failed(source: str) -> None:
            if source != origin and self.peers is not None:
                self.peers.suspects.suspect(source)

        await fail_over([*peers, origin], attempt, progress, 1, failed)
        return EncodedBlock(info=info, frames=tuple(target.frames), frame_bytes=geometry.frame_bytes)

    async def _ahead(
        self, fingerprint: str, keys: Sequence[bytes], from_peers: bool, hold: Hold
    ) -> AsyncIterator[FrameSource]:
        """The blocks of `keys` in order, each one's load started up to `config.prefetch_blocks` blocks
        before it is due, so loads from disk, peers or the origin overlap the stream instead of queueing
        behind it (loads started ahead run to completion and fill the tiers even if the stream stops).
        Each block is held against the edge's pinned-bytes budget until the stream moves past it: a
        block is loaded ahead only while the budget has room, and the next due waits for room."""
        geometry = Geometry.from_proto((await self.origin_info()).geometry)
        size = geometry.block_bytes(geometry.block_tokens)  # raw: what any encoding stays under
        ahead: deque[FrameSource] = deque()
        queued = iter(keys)
        key = next(queued, None)
        while True:
            while (
                key is not None
                and len(ahead) <= self.config.prefetch_blocks
                and await self.pins.take(hold, size, wait=not ahead)
            ):
                ahead.append(await self.block(fingerprint, key, from_peers))
                key = next(queued, None)
            if not ahead:
                return
            yield ahead.popleft()
            self.pins.release(hold, size)  # the caller asks for the next block: this one is sent

    async def stream(
        self,
        fingerprint: str,
        keys: Sequence[bytes],
        start_frame: int,
        from_peer: bool = False,
        load: pb.Load | None = None,
        trailers: Trailers | None = None,
    ) -> AsyncIterator[Frame]:
        """The frames of `keys` in order, from frame `start_frame` of the first (`from_peer`: another
        edge asks, so this one loads only from its tiers or the origin), as part of `load` if given:
        what priced blocks need (kvcdn.edge.tolls); a charged request's receipt goes to `trailers`."""
        check_read_request(fingerprint, (await self.origin_info()).fingerprint, keys)
        # The stream ends at the first block the origin lacks (its pull answers NOT_FOUND with no
        # lookup of its own): no block after it is loaded ahead, each with a lookup of its own.
        due = await self._look_up_unknown(fingerprint, keys)
        known = lambda key: self._held(key) or self._infos.get(key)  # noqa: E731 (held, or told by a lookup)
        bill = await self.tolls.admit(fingerprint, keys[:due], start_frame, from_peer, load, known, self.manifest)
        with self.pins.stream() as hold:
            frames = stream_blocks(self._ahead(fingerprint, keys[:due], not from_peer, hold), start_frame)
            async for frame in frames if bill is None else self.tolls.metered(bill, frames, trailers):
                yield frame
                hold.touch()

    async def _look_up_unknown(self, fingerprint: str, keys: Sequence[bytes]) -> int:
        """One origin lookup for the infos of those of `keys` that no tier holds, no load is fetching
        and no earlier lookup answered (a stream may come without a lookup here: from a peer, or from
        a client that looked up at another edge), so their pulls need no lookup each. Best effort: a
        block whose info is still unknown is looked up by its own pull, which reports what fails.
        Returns how many of `keys` to stream: up to and including the first one the origin was found
        to lack (all of them when none was)."""
        unknown = [k for k in keys if k not in self._infos and self._loads.get(k) is None and self._held(k) is None]
        if not unknown:
            return len(keys)

        async def look_up() -> None:
            async with self._origin_lookups:
                answer = await self.upstream.lookup(fingerprint, unknown)
            for info in self._trusted(fingerprint, answer, ""):
                self._infos.put(info.key, info)
            if len(answer) < len(unknown):  # the origin's answer ends at the first block it lacks
                self._origin_misses.put(_choice(unknown[len(answer)], ("raw",)), time.monotonic())

        try:  # a herd of agents streaming the same cold document asks once
            await self._stream_lookups.do(tuple(unknown), look_up)
        except KVCDNError as exc:
            log.debug("origin lookup of %d blocks to stream failed (%s); each pull looks up its own", len(unknown), exc)
        lacking = {k for k in unknown if k not in self._infos and self._recently_missed(_choice(k, ("raw",)))}
        return next((i + 1 for i, key in enumerate(keys) if key in lacking), len(keys))
