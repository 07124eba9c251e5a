"""The origin's domain logic: publishing (prefill once, store blocks, version manifests) and the
read side (info, manifests, longest-prefix lookup, block streaming). Knows nothing about gRPC."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from kvcdn.errors import DigestMismatch, InvalidArgument, LimitExceeded, NotFound, Unavailable
from kvcdn.model import adapter
from kvcdn.model.loading import LoadedModel
from kvcdn.model.prompt import document_ids
from kvcdn.origin.blockwork import load_prefix, mark_priced, store_block, store_encodings
from kvcdn.origin.catalog import Catalog, PgEvents, PgManifests, SharedLock
from kvcdn.origin.config import OriginConfig
from kvcdn.origin.queue import LocalQueue, SharedQueue
from kvcdn.origin.store import EventLog, ManifestStore, check_document_name, with_ids
from kvcdn.spec.codecs import CODECS, best_prefix, max_encoded_bytes, parse_codecs
from kvcdn.spec.identity import block_keys, block_spans, check_read_request, content_digest, encoded_key
from kvcdn.spec.prices import check_price
from kvcdn.spec.provenance import Signer
from kvcdn.store.blockstore import BlockStore
from kvcdn.store.lru import ByteLRU
from kvcdn.store.singleflight import SingleFlight
from kvcdn.v1 import kvcdn_pb2 as pb
from kvcdn.wire.frames import EncodedBlock, Frame, encode_stored, stream_blocks

__all__ = ["Origin", "PublishResult"]

log = logging.getLogger(__name__)


_MAX_REVOCATION = 64 << 10
_MAX_BYTES_PER_TOKEN = 16
"""Text bytes per token a publish may bring before it is refused untokenized."""


@dataclass(frozen=True)
class PublishResult:
    manifest: pb.Manifest
    computed_blocks: int
    """Blocks this publish computed; 0 when everything was stored already."""
    prefill_s: float


class Origin:
    """Publishes documents with one model and serves their blocks."""

    def __init__(self, config: OriginConfig, model: LoadedModel) -> None:
        self.config = config
        self.model = model
        self.geometry = model.geometry
        self.blocks = BlockStore(config.store_dir / "blocks", quarantine=config.store_dir / "quarantine")
        if config.store_bytes:
            self.blocks.size()  # counted once now (a scan of the store), then kept up to date
        self.catalog: Catalog | None = None
        """The catalog shared with other workers (--catalog); None: this process's own store."""
        self.manifests: ManifestStore | PgManifests
        self.events: EventLog | PgEvents
        self._manifest_lock: asyncio.Lock | SharedLock
        self.queue: LocalQueue | SharedQueue
        if config.catalog:
            self.catalog = Catalog(config.catalog, self.fingerprint, self.geometry.to_proto(), config.catalog_connect_s)
            self.manifests, self.events = self.catalog.manifests, self.catalog.events
            self._manifest_lock = self.catalog.lock
            self.queue = SharedQueue(self.catalog, self._work, config.worker)
        else:
            self.manifests = ManifestStore(config.store_dir, config.store_dir / "quarantine")
            self.events = EventLog(config.store_dir, config.store_dir / "quarantine")
            self._manifest_lock = asyncio.Lock()
            self.queue = LocalQueue(self._work)
        self._new_event = asyncio.Condition()
        self._read_cache: ByteLRU[bytes, EncodedBlock] = ByteLRU(config.read_cache_bytes, lambda b: b.n_bytes)
        self._reserved = 0
        """Bytes publishes under way may still add to the store (counted against its budget)."""
        self._repairing: SingleFlight[bytes, asyncio.Future[None]] = SingleFlight()
        self._model_lock = asyncio.Lock()
        self.signer = Signer.from_file(config.signing_key) if config.signing_key is not None else None
        self._signed: ByteLRU[bytes, pb.BlockInfo] = ByteLRU(1 << 16, lambda _: 1)
        """Signed infos of recently looked-up blocks (a signature costs ~50 us; lookups repeat)."""
        self.prefill_runs = 0
        self.prefill_s_total = 0.0
        self.blocks_computed = 0
        self.blocks_repaired = 0
        self.publishes = 0

    async def start(self) -> None:
        """With a shared catalog: follow its notifications and feed, take publish jobs."""
        if self.catalog is not None and isinstance(self.queue, SharedQueue):
            self.catalog.start(self._on_events)
            self.queue.start()

    async def close(self) -> None:
        await self.queue.close()
        if self.catalog is not None:
            await self.catalog.close()

    async def _on_events(self, events: list[pb.InvalidationEvent]) -> None:
        """Other workers' purges: forget the blocks they removed, wake this worker's Watch streams."""
        self._forget([key for event in events for key in event.keys])
        async with self._new_event:
            self._new_event.notify_all()

    def _forget(self, keys: Sequence[bytes]) -> None:
        for key in keys:
            self.blocks.forget(key)
            self._read_cache.pop(key)
            self._signed.pop(key)

    @property
    def read_cache_bytes(self) -> int:
        return self._read_cache.bytes

    @property
    def fingerprint(self) -> str:
        return self.model.fingerprint_hex

    def info(self) -> pb.ServerInfo:
        return pb.ServerInfo(
            role="origin",
            fingerprint=self.fingerprint,
            model=self.model.name,
            geometry=self.geometry.to_proto(),
            max_document_tokens=self.config.max_document_tokens,
            invalidation_seq=self.events.last_seq,
        )

    # --- write side -------------------------------------------------------------------------------

    async def publish(
        self, document: str, text: str, codecs: Sequence[str] | None = None, price: pb.Price | None = None
    ) -> PublishResult:
        """Compute and store `document`'s cache (raw, and encoded with `codecs`, default the config's)
        and version its manifest (priced at `price`: kvcdn.spec.prices; None: free)."""
        check_document_name(document)
        if price is not None:
            check_price(price)
        offered = tuple(c for c in parse_codecs(codecs or self.config.codecs, "codecs", True) if c != "raw")
        if not text.strip():
            raise InvalidArgument("the document text is empty")
        # Checked before tokenizing: a token is rarely longer than 16 bytes of text, and tokenizing a
        # huge text would hold a worker for seconds. Tokenizing runs off the event loop.
        max_bytes = _MAX_BYTES_PER_TOKEN * self.config.max_document_tokens
        if len(text) > max_bytes or len(text.encode()) > max_bytes:
            raise LimitExceeded(
                f"document {document!r} is over {max_bytes} bytes of text, more than {self.config.max_document_tokens} "
                "tokens can hold (--max-document-tokens)"
            )
        ids = await asyncio.get_running_loop().run_in_executor(None, document_ids, self.model.tokenizer, text)
        if len(ids) > self.config.max_document_tokens:
            raise LimitExceeded(
                f"document {document!r} is {len(ids)} tokens; this origin accepts at most "
                f"{self.config.max_document_tokens} (--max-document-tokens)"
            )
        keys = block_keys(self.model.fingerprint, ids, self.geometry.block_tokens)
        digest = content_digest(ids)
        self.publishes += 1
        need = self._room_for(document, len(ids), keys, offered)
        self._reserved += need
        try:
            for _ in range(3):  # again if a purge removed some of its blocks before the manifest was written
                computed, prefill_s = await self.queue.run(digest, ids, offered)
                async with self._manifest_lock:
                    answer = await asyncio.get_running_loop().run_in_executor(
                        None, self._commit, document, ids, keys, offered, price
                    )
                if answer is not None:
                    break
            else:
                raise Unavailable(f"purges kept removing blocks of {document!r} while it was published; publish again")
        finally:
            self._reserved -= need
        manifest, fresh = answer
        if fresh:
            log.info(
                "published %s v%d: %d tokens, %d blocks (%d computed)",
                document,
                manifest.version,
                len(ids),
                len(keys),
                computed,
            )
        return PublishResult(self._answer(manifest, False, True), computed, prefill_s)

    def _commit(
        self, document: str, ids: list[int], keys: list[bytes], codecs: tuple[str, ...], price: pb.Price | None
    ) -> tuple[pb.Manifest, bool] | None:
        """Under the manifest lock: the document's latest manifest if it describes the same content
        in the same codecs at the same price (and False), else a new version's (and True); None if a
        block of `keys` is not on disk (purged since it was computed)."""
        digest = content_digest(ids)
        version = self.manifests.next_version(document)
        if version - 1 in self.manifests.versions(document):
            latest = self.manifests.get(document, version - 1)
            same_price = (latest.price if latest.HasField("price") else None) == price
            if latest.content_digest == digest and tuple(latest.codecs) == codecs and same_price:
                return latest, False
        # Read from the files, not remembered: another worker may have purged and recomputed a block.
        infos = [info for k in keys if (info := self.blocks.info(k, fresh=True)) is not None]
        if len(infos) < len(keys) or not all(encoded_key(k, c) in self.blocks for k in keys for c in codecs):
            return None
        manifest = pb.Manifest(
            document=document,
            version=version,
            fingerprint=self.fingerprint,
            geometry=self.geometry.to_proto(),
            token_count=len(ids),
            blocks=infos,
            content_digest=digest,
            codecs=codecs,
            token_ids=ids,
            issued_at=int(time.time()),
            price=price,
        )
        self.manifests.put(manifest)
        return manifest, True

    async def purge(self, document: str, version: int) -> tuple[list[int], int, int]:
        """Remove `document` (one version, or all for 0) and the blocks no other manifest uses; append
        an invalidation event. Returns (versions removed, blocks removed, event seq)."""
        check_document_name(document)
        async with self._manifest_lock:
            # Manifests, files and the feed are disk or database work: off the event loop, which keeps
            # serving meanwhile (every manifest change holds this lock).
            removed, orphans, event = await asyncio.get_running_loop().run_in_executor(
                None, self._purge, document, version
            )
            self._forget(orphans)
        async with self._new_event:
            self._new_event.notify_all()
        log.info("purged %s %s: %d blocks, event %d", document, removed, len(orphans), event.seq)
        return removed, len(orphans), event.seq

    def _purge(self, document: str, version: int) -> tuple[list[int], list[bytes], pb.InvalidationEvent]:
        """Delete the versions, then the blocks no remaining manifest uses (the store's index says
        which), then announce them; returns the versions, the blocks' keys and the event."""
        versions = self.manifests.versions(document)
        if version:
            if version not in versions:
                raise NotFound(f"document {document!r} has no version {version}")
            versions = [version]
        damaged = self.manifests.forget_damaged(document) if not version else []
        if not versions and not damaged:
            raise NotFound(f"document {document!r} has not been published")
        orphans = sorted({k for v in versions for k in self.manifests.delete(document, v)})
        for key in orphans:
            self.blocks.delete(key)
        return sorted([*versions, *damaged]), orphans, self.events.append(document, version, orphans)

    async def revoke(self, revocation: str) -> int:
        """Relay a grant issuer's signed revocation list to the edges in the feed; the event's seq. The
        edges check its signature (the origin holds no issuer key): here only its form and size."""
        if not 0 < len(revocation) <= _MAX_REVOCATION or revocation.count(".") != 2 or not revocation.isascii():
            raise InvalidArgument(
                f"a revocation is a compact JWS of at most {_MAX_REVOCATION} bytes (kvcdn keys revoke)"
            )
        async with self._manifest_lock:  # the feed's numbering, as a purge's
            event = await asyncio.get_running_loop().run_in_executor(None, self.events.append, "", 0, [], revocation)
        async with self._new_event:
            self._new_event.notify_all()
        return event.seq

    async def watch(self, after_seq: int) -> AsyncIterator[pb.InvalidationEvent]:
        """Invalidation events after `after_seq`, then each new one; never ends by itself."""
        seq = after_seq
        while True:
            for event in self.events.events[seq:]:
                yield event
                seq = event.seq
            async with self._new_event:
                await self._new_event.wait_for(functools.partial(self._has_events_after, seq))

    def _has_events_after(self, seq: int) -> bool:
        return self.events.last_seq > seq

    def _room_for(self, document: str, n_tokens: int, keys: Sequence[bytes], codecs: Sequence[str]) -> int:
        """The most bytes publishing `keys` (raw and in `codecs`) can add to the store; LimitExceeded
        if that could take it over its budget (with what publishes under way may still add)."""
        budget = self.config.store_bytes
        if not budget:
            return 0
        spans = block_spans(n_tokens, self.geometry.block_tokens)
        need = sum(
            max_encoded_bytes(codec, self.geometry, e - s)
            for key, (s, e) in zip(keys, spans, strict=True)
            for codec in ("raw", *codecs)
            if encoded_key(key, codec) not in self.blocks
        )
        used = self.blocks.size() + self._reserved
        if need and used + need > budget:
            raise LimitExceeded(
                f"publishing {document!r} may take {need / 1e6:.1f} MB and the store holds {used / 1e6:.1f} MB "
                f"of its {budget / 1e6:.1f} MB budget (--store-bytes): purge documents or raise the budget"
            )
        return need

    async def _work(self, ids: list[int], codecs: tuple[str, ...]) -> tuple[int, float]:
        """A publish queue's work (kvcdn.origin.queue): store `ids`' blocks raw and in `codecs`."""
        keys = block_keys(self.model.fingerprint, ids, self.geometry.block_tokens)
        computed, prefill_s = await self._compute(ids, keys)
        if codecs:
            await self._encode(ids, keys, codecs)
        return computed, prefill_s

    async def _compute(self, ids: list[int], keys: list[bytes], reuse: bool = True) -> tuple[int, float]:
        """Prefill what is not stored yet and store the new blocks, reusing the longest stored prefix
        (not with `reuse` False: a repair recomputes from the first token, as a first publish does)."""
        spans = block_spans(len(ids), self.geometry.block_tokens)
        missing = [i for i, key in enumerate(keys) if key not in self.blocks]
        if not missing:
            return 0, 0.0
        have = missing[0] if reuse else 0
        loop = asyncio.get_running_loop()
        async with self._model_lock:
            try:
                n = spans[have - 1][1] if have else 0
                past = await loop.run_in_executor(None, load_prefix, self.blocks, self.model, keys[:have], n)
            except DigestMismatch:  # a stored prefix block was corrupt (quarantined now): compute it too
                have, past = 0, None
            start = spans[have][0]
            layers, prefill_s = await loop.run_in_executor(
                None, adapter.timed_prefill, self.model.model, ids[start:], past
            )
            self.prefill_runs += 1
            self.prefill_s_total += prefill_s
        stored = 0
        for i in range(have, len(keys)):
            s, e = spans[i]
            block = await loop.run_in_executor(None, store_block, self.blocks, self.geometry, keys[i], i, layers, s, e)
            if block is not None:
                self._read_cache.put(keys[i], block)
                stored += 1
        self.blocks_computed += stored
        return stored, prefill_s

    async def _encode(self, ids: list[int], keys: list[bytes], codecs: Sequence[str]) -> None:
        """Store `keys`' blocks in `codecs` where missing; a raw block found corrupt on the way
        (quarantined) is recomputed first."""
        loop = asyncio.get_running_loop()
        shaping = None
        if not all(CODECS[codec].exact for codec in codecs):  # lossy codecs round keys by the model's queries
            async with self._model_lock:  # computed once, by a prefill
                shaping = await loop.run_in_executor(None, getattr, self.model, "key_shaping")
        try:
            await loop.run_in_executor(None, store_encodings, self.blocks, self.model, keys, codecs, shaping)
        except DigestMismatch:
            await self._compute(ids, keys, reuse=False)
            await loop.run_in_executor(None, store_encodings, self.blocks, self.model, keys, codecs, shaping)

    async def _repair(self, key: bytes) -> None:
        """Recompute the block `key`, whose stored file failed its digests (moved to quarantine), from
        the token ids of a manifest that uses it; manifests that describe it are updated if the new
        bytes differ (a block first computed after a stored prefix is recomputed from token 0)."""
        loop = asyncio.get_running_loop()
        async with self._manifest_lock:
            manifest = await loop.run_in_executor(None, self._a_user, key)
        if manifest is None or not manifest.token_ids:
            raise DigestMismatch(
                f"stored block {key.hex()[:16]}… was corrupt (quarantined) and no manifest with token ids uses "
                "it: publish its document again"
            )
        ids = list(manifest.token_ids)
        keys = block_keys(self.model.fingerprint, ids, self.geometry.block_tokens)
        await self._compute(ids, keys, reuse=False)
        if manifest.codecs:
            await self._encode(ids, keys, tuple(manifest.codecs))
        self.blocks_repaired += 1
        log.warning("recomputed corrupt block %s… from %s v%d", key.hex()[:16], manifest.document, manifest.version)
        async with self._manifest_lock:
            await loop.run_in_executor(None, self._redescribe, key)

    def _a_user(self, key: bytes) -> pb.Manifest | None:
        """The oldest manifest that uses the stored block `key`."""
        users = self.manifests.users(key)
        return self.manifests.get(*users[0]) if users else None

    def _redescribe(self, key: bytes) -> None:
        """Rewrite the manifests that use `key` where its recomputed bytes differ from what they say."""
        for document, version in self.manifests.users(key):
            stored = self.manifests.get(document, version)
            fresh = [self.blocks.info(b.key) or b for b in stored.blocks]
            if any(f.frame_digests != b.frame_digests for f, b in zip(fresh, stored.blocks, strict=True)):
                del stored.blocks[:]
                stored.blocks.extend(fresh)
                self.manifests.put(stored)

    # --- read side --------------------------------------------------------------------------------

    async def manifest(self, document: str, version: int, token_ids: bool = False) -> pb.Manifest:
        """The manifest of `document` (version 0: the latest), with its token ids if asked for, signed."""
        stored = await asyncio.get_running_loop().run_in_executor(None, self.manifests.get, document, version)
        return self._answer(stored, token_ids, version == 0)

    def _answer(self, manifest: pb.Manifest, token_ids: bool, latest: bool) -> pb.Manifest:
        """A manifest as answers carry it: token ids only if asked for, signed with the current key
        (as the `latest` version for --manifest-ttl from now)."""
        out = with_ids(manifest, token_ids)
        if self.signer is not None:
            if out is manifest:
                out = pb.Manifest()
                out.CopyFrom(manifest)
            self.signer.sign_manifest(out, self.config.manifest_ttl_s if latest else 0)
        return out

    def lookup(self, fingerprint: str, keys: Sequence[bytes], codecs: Sequence[str] = ()) -> list[pb.BlockInfo]:
        """The longest stored prefix of `keys`, in the first of `codecs` (empty: raw) that holds it,
        each info signed when the origin has a key."""
        check_read_request(fingerprint, self.fingerprint, keys)
        found = best_prefix(keys, parse_codecs(codecs, "codecs", allow_empty=True), self.blocks.info)
        found = found if self.signer is None else [self._sign(info) for info in found]
        return mark_priced(found, self.manifests.priced([i.key for i in found]))

    def _sign(self, info: pb.BlockInfo) -> pb.BlockInfo:
        assert self.signer is not None
        signed = self._signed.get(info.key)
        if signed is None or signed.frame_digests != info.frame_digests or signed.signer != self.signer.key_id:
            signed = self.signer.sign_block(self.model.fingerprint, info)
            self._signed.put(info.key, signed)
        return signed

    async def block(self, key: bytes) -> EncodedBlock:
        cached = self._read_cache.get(key)
        if cached is not None:
            return cached
        loop = asyncio.get_running_loop()
        try:
            info, payload, frame_bytes = await loop.run_in_executor(None, self.blocks.get, key)
        except DigestMismatch:  # the file is quarantined now: recompute the block (once, whoever asks)
            await self._repairing.do(key, functools.partial(self._repair, key))
            info, payload, frame_bytes = await loop.run_in_executor(None, self.blocks.get, key)
        block = encode_stored(info, payload, frame_bytes)
        self._read_cache.put(key, block)
        return block

    async def stream(self, fingerprint: str, keys: Sequence[bytes], start_frame: int) -> AsyncIterator[Frame]:
        """Encoded frames of `keys` in order, starting at frame `start_frame` of the first key."""
        check_read_request(fingerprint, self.fingerprint, keys)
        async for frame in stream_blocks(self._blocks(keys), start_frame):
            yield frame

    async def _blocks(self, keys: Sequence[bytes]) -> AsyncIterator[EncodedBlock]:
        for key in keys:
            yield await self.block(key)
