"""What an edge remembers of its origin's answers, so that agents' questions do not each become the
origin's: the origin's ServerInfo (kept on the disk tier too, so a restarted edge serves what it holds
while the origin is down) and its manifests.

Manifests: identical questions asked at once share one origin call (single-flight); a numbered
version, which never changes, is kept (LRU); the latest version is kept `manifest_cache_s` (the
origin's own signature gives the latest a longer validity, `--manifest-ttl`); an unknown document or
version is answered NOT_FOUND again for `miss_ttl_s` without asking. A purge of the document (its
invalidation event) forgets what was kept of it. Before, every GetManifest at an edge reached the
origin, unknown documents included, and was signed there afresh."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

from kvcdn.errors import NotFound, Unavailable
from kvcdn.store.files import atomic_write
from kvcdn.store.lru import ByteLRU
from kvcdn.store.singleflight import SingleFlight
from kvcdn.v1 import kvcdn_pb2 as pb
from kvcdn.wire.stub import CacheReader

__all__ = ["OriginAnswers"]

Question = tuple[str, int, bool]
"""(document, version, token_ids) as GetManifest asks it."""


class OriginAnswers:
    """The origin's ServerInfo and manifests as `upstream` answers them, kept as the module says."""

    def __init__(
        self,
        upstream: CacheReader,
        info_path: Path | None,
        manifest_cache_s: float,
        miss_ttl_s: float,
        remembered: int = 4096,
    ) -> None:
        self.upstream = upstream
        self._info_path = info_path
        self.info: pb.ServerInfo | None = None
        """The origin's ServerInfo once it answered (None before)."""
        self.fingerprint: str | None = None
        """The model's fingerprint, once known from the origin or the copy kept on disk."""
        self._latest_s = manifest_cache_s
        self._miss_ttl_s = miss_ttl_s
        self._kept: ByteLRU[Question, tuple[pb.Manifest, float]] = ByteLRU(remembered, lambda _: 1)
        self._missed: ByteLRU[Question, tuple[NotFound, float]] = ByteLRU(remembered, lambda _: 1)
        self._asking: SingleFlight[Question, asyncio.Future[pb.Manifest]] = SingleFlight()
        self.manifest_calls = 0
        """GetManifest calls this edge sent its origin."""

    async def edge_info(self) -> pb.ServerInfo:
        """What an edge answers GetInfo with: the origin's, as an edge (without the origin's ports)."""
        info = pb.ServerInfo()
        info.CopyFrom(await self.server_info())
        info.role = "edge"
        info.ClearField("bulk_port")  # the origin's; the server answers with its own
        info.ClearField("metrics_port")
        return info

    async def server_info(self) -> pb.ServerInfo:
        """The origin's ServerInfo; with a disk tier, from the copy kept there while the origin is
        unreachable."""
        if self.info is None:
            try:
                self.info = await self.upstream.info()
            except Unavailable:
                saved = None
                if self._info_path is not None:
                    with contextlib.suppress(Exception):  # absent, unreadable or not a ServerInfo
                        saved = pb.ServerInfo.FromString(self._info_path.read_bytes())
                if saved is None:
                    raise
                self.fingerprint = saved.fingerprint
                return saved
            if self._info_path is not None:
                atomic_write(self._info_path, self.info.SerializeToString())
            self.fingerprint = self.info.fingerprint
        return self.info

    async def manifest(self, document: str, version: int, token_ids: bool) -> pb.Manifest:
        question = (document, version, token_ids)
        now = time.monotonic()
        kept = self._kept.get(question)
        if kept is not None and (version or now - kept[1] < self._latest_s):
            return kept[0]
        missed = self._missed.get(question)
        if missed is not None and now - missed[1] < self._miss_ttl_s:
            raise NotFound(str(missed[0]))
        return await self._asking.do(question, lambda: self._ask(question))

    async def _ask(self, question: Question) -> pb.Manifest:
        self.manifest_calls += 1
        try:
            manifest = await self.upstream.manifest(*question)
        except NotFound as exc:
            self._missed.put(question, (exc, time.monotonic()))
            raise
        self._kept.put(question, (manifest, time.monotonic()))
        return manifest

    def forget(self, document: str) -> None:
        """Drop what is kept of `document` (it was purged)."""
        for question in [q for q in self._kept.keys() if q[0] == document]:  # noqa: SIM118 (an LRU, not a dict)
            self._kept.pop(question)
