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
    sf: SingleFlight[str, asyncio.Future[int]] = SingleFlight()
    calls = 0

    async def work() -> int:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        return 42

    results = await asyncio.gather(*(sf.do("k", work) for _ in range(20)))
    assert results == [42] * 20 and calls == 1 and len(sf) == 0


async def test_a_failure_reaches_every_waiter_and_the_next_call_retries() -> None:
    sf: SingleFlight[str, asyncio.Future[int]] = SingleFlight()

    async def boom() -> int:
        await asyncio.sleep(0.01)
        raise RuntimeError("origin down")

    results = await asyncio.gather(*(sf.do("k", boom) for _ in range(3)), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)

    async def fine() -> int:
        return 1

    assert await sf.do("k", fine) == 1


async def test_a_cancelled_leader_does_not_cancel_the_waiters() -> None:
    sf: SingleFlight[str, asyncio.Future[int]] = SingleFlight()

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


async def test_joiners_share_the_first_callers_state_and_the_key_frees_when_the_work_ends() -> None:
    sf: SingleFlight[str, list[int]] = SingleFlight()
    release = asyncio.Event()

    async def work(state: list[int]) -> None:
        await release.wait()
        state.append(1)

    first, started = sf.join("k", list, work)
    second, joined_started = sf.join("k", list, work)
    assert started and not joined_started and first is second and len(sf) == 1 and sf.get("k") is first
    release.set()
    await sf.settle()
    assert first == [1] and len(sf) == 0 and sf.get("k") is None and sf.executions == 1
    third, started_again = sf.join("k", list, work)
    assert started_again and third is not first
    await sf.settle()


async def test_work_runs_detached_from_its_callers_and_close_cancels_what_is_left() -> None:
    sf: SingleFlight[str, list[str]] = SingleFlight()
    never = asyncio.Event()

    async def stuck(state: list[str]) -> None:
        try:
            await never.wait()
        except asyncio.CancelledError:
            state.append("cancelled")
            raise

    async def caller() -> list[str]:
        state, _ = sf.join("k", list, stuck)
        await asyncio.sleep(3600)
        return state

    task = asyncio.create_task(caller())
    await asyncio.sleep(0.01)
    task.cancel()  # the caller goes away; the work does not
    await asyncio.gather(task, return_exceptions=True)
    state = sf.get("k")
    assert state == [] and len(sf) == 1
    await sf.close(timeout_s=0.05)
    assert state == ["cancelled"] and len(sf) == 0
