"""The bytes an edge's streams hold, within one budget (`--pinned-bytes`).

A stream holds the block it is sending and the ones it loads ahead (kvcdn.edge.edge `_ahead`); those
references keep a block's memory alive whatever the memory tier evicts, so readers that never read
once held readers x 5 blocks (32 over distinct 11.8 MB blocks: +477 MiB beside a 16 MiB tier). Here a
stream loads ahead only while the budget has room, and waits for room before its next block; when
it must wait, streams that sent nothing for `stall_s` are cut (their caller sees the stream end), so
a stalled reader gives way to a reading one instead of holding its blocks for the send deadline.

Each client (kvcdn.wire.ratelimit.CALLER: its token, else its address) holds at most a share of the
budget (`CLIENT_SHARE`, at least two blocks), so one client's streams cannot take all of it: 16 readers
from one address that never read made every other client's stream wait `stall_s` for room, until they
were cut. The deployment's own callers (edges, publishers) and in-process callers are not held to it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from kvcdn.wire.ratelimit import CALLER

__all__ = ["CLIENT_SHARE", "Hold", "Pins"]

CLIENT_SHARE = 0.25
"""The part of the budget one client's streams may hold together (at least two of their blocks)."""


@dataclass(eq=False)
class Hold:
    """What one stream holds."""

    task: asyncio.Task[object] | None
    client: str | None = None
    """Who the stream is for (None: not held to a share)."""
    bytes: int = 0
    progress: float = field(default_factory=time.monotonic)
    cut: bool = False

    def touch(self) -> None:
        """The stream sent something (its caller asked for the next frame)."""
        self.progress = time.monotonic()


class Pins:
    """Bytes held by an edge's streams, at most `budget` (one block more when nothing is held, so a
    block larger than the budget still streams)."""

    def __init__(self, budget: int, stall_s: float) -> None:
        self.budget = budget
        self.stall_s = stall_s
        self.used = 0
        self.released = 0
        """Bytes released, all streams together, ever (blocks that may since have been freed)."""
        self.streams_cut = 0
        self._holds: set[Hold] = set()
        self._by_client: Counter[str] = Counter()
        """Bytes held, by client (the ones held to a share)."""
        self._freed = asyncio.Event()

    @contextlib.contextmanager
    def stream(self) -> Iterator[Hold]:
        """A hold for the stream the current task serves, released whole when the stream ends (or
        its task does: a cut stream's generator may be closed later)."""
        task = asyncio.current_task()
        hold = Hold(task, CALLER.get())
        self._holds.add(hold)
        if task is not None:
            task.add_done_callback(lambda _: self._release_all(hold))
        try:
            yield hold
        finally:
            self._release_all(hold)

    async def take(self, hold: Hold, n: int, wait: bool) -> bool:
        """Hold `n` more bytes for `hold`'s stream: at once if the budget has room, else (with
        `wait`) once streams release or stalled ones are cut; without `wait`, False when no room."""
        while n and ((self.used and self.used + n > self.budget) or self._over_share(hold, n)):
            if not wait:
                return False
            self._cut_stalled()
            self._freed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._freed.wait(), self.stall_s / 4)
        self.used += n
        hold.bytes += n
        if hold.client is not None:
            self._by_client[hold.client] += n
        return True

    def _over_share(self, hold: Hold, n: int) -> bool:
        """Whether `n` more bytes would take `hold`'s client past its share (a client holding nothing
        may take a block of any size)."""
        if hold.client is None or not (held := self._by_client[hold.client]):
            return False
        return held + n > max(self.budget * CLIENT_SHARE, 2 * n)

    def release(self, hold: Hold, n: int) -> None:
        n = min(n, hold.bytes)
        hold.bytes -= n
        self.used -= n
        if hold.client is not None:
            self._by_client[hold.client] -= n
            if not self._by_client[hold.client]:
                del self._by_client[hold.client]
        self.released += n
        if n:
            self._freed.set()

    def _release_all(self, hold: Hold) -> None:
        self.release(hold, hold.bytes)
        self._holds.discard(hold)

    def _cut_stalled(self) -> None:
        """Cancel the tasks of streams that hold bytes and sent nothing for `stall_s`."""
        now = time.monotonic()
        for hold in list(self._holds):
            if hold.bytes and not hold.cut and now - hold.progress > self.stall_s and hold.task is not None:
                hold.cut = True
                self.streams_cut += 1
                hold.task.cancel()
