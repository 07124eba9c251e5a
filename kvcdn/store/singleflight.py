"""Single-flight: concurrent callers asking for the same key share one execution of the work."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["SingleFlight"]

V = TypeVar("V")


class SingleFlight(Generic[V]):
    """Runs `fn` once per key at a time; callers arriving meanwhile await the same result (or error)."""

    def __init__(self) -> None:
        self._inflight: dict[Hashable, asyncio.Future[V]] = {}
        self.executions = 0

    def __len__(self) -> int:
        return len(self._inflight)

    async def do(self, key: Hashable, fn: Callable[[], Awaitable[V]]) -> V:
        while (existing := self._inflight.get(key)) is not None:
            try:
                return await asyncio.shield(existing)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if existing.cancelled() and not (task and task.cancelling()):
                    continue  # the leader was cancelled, not us: take over the work
                raise
        future: asyncio.Future[V] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        self.executions += 1
        try:
            result = await fn()
        except asyncio.CancelledError:
            future.cancel()
            raise
        except BaseException as exc:
            future.set_exception(exc)
            # Waiters re-raise it; mark it retrieved so an unawaited failure does not log noise.
            future.exception()
            raise
        else:
            future.set_result(result)
            return result
        finally:
            del self._inflight[key]
