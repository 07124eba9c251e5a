"""Single-flight: concurrent callers asking for the same key share one execution of the work.

The one primitive for it in kvcdn. The first caller of `join` starts the work as a task of its own,
detached from every caller, so a caller that goes away (a client hanging up) never cancels it for the
others; callers that arrive while it runs get the same flight state back and follow it however they
like: the origin's publishes wait for a result (`do`), an edge's block loads are followed frame by
frame as they arrive. The key is free again as soon as the work has ended, so the next caller after
a failure starts afresh.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Generic, TypeVar

__all__ = ["SingleFlight"]

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)
S = TypeVar("S")
V = TypeVar("V")


class SingleFlight(Generic[K, S]):
    """At most one piece of work per key at a time, each with a state its callers share."""

    def __init__(self) -> None:
        self._flights: dict[K, tuple[S, asyncio.Task[None]]] = {}
        self.executions = 0
        """Pieces of work started so far."""

    def __len__(self) -> int:
        return len(self._flights)

    def get(self, key: K) -> S | None:
        """The state of the flight in progress for `key`, or None."""
        flight = self._flights.get(key)
        return flight[0] if flight is not None else None

    def join(self, key: K, state: Callable[[], S], work: Callable[[S], Awaitable[Any]]) -> tuple[S, bool]:
        """(state, started): the flight in progress for `key` (started False), or a new one whose state
        is `state()` and whose work `work(state)` starts now as a detached task (started True)."""
        flight = self._flights.get(key)
        if flight is not None:
            return flight[0], False
        value = state()
        task = asyncio.create_task(self._run(key, value, work))
        self._flights[key] = (value, task)
        self.executions += 1
        return value, True

    async def _run(self, key: K, value: S, work: Callable[[S], Awaitable[Any]]) -> None:
        try:
            await work(value)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("work for %r failed outside its own error handling", key)
        finally:
            del self._flights[key]

    async def do(self: SingleFlight[K, asyncio.Future[V]], key: K, work: Callable[[], Awaitable[V]]) -> V:
        """`work()`'s result, computed once however many callers ask for `key` meanwhile; its error
        reaches every one of them. Cancelling a caller cancels only its wait."""

        async def settle(future: asyncio.Future[V]) -> None:
            try:
                future.set_result(await work())
            except asyncio.CancelledError:
                future.cancel()
                raise
            except BaseException as exc:
                future.set_exception(exc)
                future.exception()  # retrieved: callers that went away leave no "never retrieved" noise

        future, _ = self.join(key, asyncio.get_running_loop().create_future, settle)
        return await asyncio.shield(future)

    async def settle(self, timeout_s: float | None = None) -> None:
        """Wait until the work in progress has ended (at most `timeout_s`)."""
        tasks = {task for _, task in self._flights.values()}
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)

    async def close(self, timeout_s: float) -> None:
        """Let the work in progress end (at most `timeout_s`), then cancel what is left."""
        await self.settle(timeout_s)
        tasks = [task for _, task in self._flights.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._flights.clear()  # a task cancelled before it ran never reached its own cleanup
