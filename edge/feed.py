"""An edge follows its origin's invalidation feed (kvcdn.edge.edge applies each event): from where
the edge stands, so one that was down, or whose disk outlived it, catches up on what it missed, and
up to the feed's current end before serving, so a restarted edge never serves a purged block."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from kvcdn.errors import Unavailable
from kvcdn.v1 import kvcdn_pb2 as pb
from kvcdn.wire.stub import CacheReader

__all__ = ["Feed"]

log = logging.getLogger(__name__)


class Feed:
    """The origin's invalidation feed as `upstream` serves it; each of `apply` takes each event in
    order, and `seq` is how far the events applied so far reach."""

    def __init__(self, upstream: CacheReader, *apply: Callable[[pb.InvalidationEvent], None]) -> None:
        self.upstream = upstream
        self.apply = apply
        self.seq = 0
        """Last invalidation event applied."""
        self._follower: asyncio.Task[None] | None = None

    def _apply(self, event: pb.InvalidationEvent) -> None:
        for apply in self.apply:
            apply(event)
        self.seq = event.seq

    def start(self, retry_s: float = 1.0) -> None:
        """Follow the feed in the background, reconnecting `retry_s` after it breaks."""
        self._follower = asyncio.create_task(self._follow(retry_s))

    async def _follow(self, retry_s: float) -> None:
        while True:
            try:
                async for event in self.upstream.watch(self.seq):
                    self._apply(event)
            except Unavailable as exc:
                log.debug("invalidation feed: %s; reconnecting", exc)
            except Exception:
                log.exception("invalidation feed failed; reconnecting")
            await asyncio.sleep(retry_s)

    async def catch_up(self, timeout_s: float) -> None:
        """Apply the feed up to its current end; if the origin is unreachable within `timeout_s`, the
        edge serves what it holds and catches up when the feed reconnects."""
        try:
            async with asyncio.timeout(timeout_s):
                target = (await self.upstream.info()).invalidation_seq
                if self.seq < target:
                    async for event in self.upstream.watch(self.seq):
                        self._apply(event)
                        if event.seq >= target:
                            break
        except (Unavailable, TimeoutError) as exc:
            log.warning("could not catch up on invalidations before serving (%s); serving what is held", exc)

    async def close(self) -> None:
        if self._follower is not None:
            self._follower.cancel()
            await asyncio.gather(self._follower, return_exceptions=True)
