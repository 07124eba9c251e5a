"""The byte-bounded LRU and single-flight primitives."""

from __future__ import annotations

import asyncio

import pytest

from kvcdn.store.lru import ByteLRU
from kvcdn.store.singleflight import SingleFlight


def test_lru_respects_its_byte_budget_and_evicts_least_recent() -> None:
    lru: ByteLRU[str, bytes] = ByteLRU(10, len)
    lru.put("a", b"aaaa")
    lru.put("b", b"bbbb")
    assert lru.get("a") == b"aaaa"  # a is now most recent
    lru.put("c", b"cccc")
    assert "b" not in lru and "a" in lru and "c" in lru
    assert lru.bytes == 8 and lru.evictions == 1


def test_lru_does_not_admit_values_larger_than_its_budget() -> None:
    lru: ByteLRU[str, bytes] = ByteLRU(10, len)
    lru.put("a", b"aaaa")
    assert not lru.put("huge", b"x" * 11)
    assert "a" in lru and lru.bytes == 4


def test_lru_replacing_a_key_updates_the_byte_count() -> None:
    lru: ByteLRU[str, bytes] = ByteLRU(10, len)
    lru.put("a", b"aaaa")
    lru.put("a", b"aa")
    assert lru.bytes == 2 and len(lru) == 1


async def test_concurrent_callers_share_one_execution() -> None:
    sf: SingleFlight[int] = SingleFlight()
    calls = 0

    async def work() -> int:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        return 42

    results = await asyncio.gather(*(sf.do("k", work) for _ in range(20)))
    assert results == [42] * 20 and calls == 1 and len(sf) == 0


async def test_a_failure_reaches_every_waiter_and_the_next_call_retries() -> None:
    sf: SingleFlight[int] = SingleFlight()

    async def boom() -> int:
        await asyncio.sleep(0.01)
        raise RuntimeError("origin down")

    results = await asyncio.gather(*(sf.do("k", boom) for _ in range(3)), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)

    async def fine() -> int:
        return 1

    assert await sf.do("k", fine) == 1


async def test_a_cancelled_leader_does_not_cancel_the_waiters() -> None:
    sf: SingleFlight[int] = SingleFlight()

    async def slow() -> int:
        await asyncio.sleep(0.05)
        return 7

    leader = asyncio.create_task(sf.do("k", slow))
    await asyncio.sleep(0)
    waiter = asyncio.create_task(sf.do("k", slow))
    await asyncio.sleep(0)
    leader.cancel()
    assert await waiter == 7
    with pytest.raises(asyncio.CancelledError):
        await leader
