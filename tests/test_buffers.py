"""The edge's pool of block buffers (kvcdn.edge.buffers): loads reuse the memory of blocks nobody holds
any more, never of one whose frames are still referenced, within a bound."""

from __future__ import annotations

import asyncio
import gc

import numpy as np

from kvcdn.edge.buffers import BlockBuffers
from kvcdn.edge.pulls import Pull, PullTarget
from kvcdn.spec.geometry import Geometry
from kvcdn.spec.identity import digest
from kvcdn.v1 import kvcdn_pb2 as pb

GEOMETRY = Geometry(layers=2, kv_heads=2, head_dim=8, dtype="float32", block_tokens=40, frame_bytes=4096)


def address(a: np.ndarray | memoryview) -> int:
    return int(np.frombuffer(a, dtype=np.uint8).__array_interface__["data"][0])


def test_a_buffer_nobody_holds_is_reused_and_one_still_held_is_not() -> None:
    pool = BlockBuffers(max_bytes=3 * 1000)
    first = pool.lease(900, 1000)
    at = address(first)
    del first
    again = pool.lease(1000, 1000)
    assert address(again) == at  # the same pages, no new allocation
    piece = memoryview(again)[10:20]  # what a frame is: a view cut from the lease
    del again
    other = pool.lease(1000, 1000)
    assert address(other) != at  # a frame of it still lives: its buffer is not handed out
    del piece
    gc.collect()
    assert address(pool.lease(1000, 1000)) == at
    assert pool.pooled_bytes == 2 * 1000


def test_the_pool_is_bounded_and_larger_leases_get_buffers_of_their_own() -> None:
    pool = BlockBuffers(max_bytes=2 * 1000)
    held = [pool.lease(1000, 1000) for _ in range(3)]  # the third is past the bound
    assert (pool.leased_from_pool, pool.allocated, pool.pooled_bytes) == (2, 1, 2000)
    big = pool.lease(1001, 1000)
    assert len(big) == 1001 and pool.allocated == 2
    held.clear()
    del big
    assert pool.pooled_bytes == 2000  # kept for the next loads, not grown
    pool.lease(500, 1000)
    assert pool.leased_from_pool == 3


def test_a_new_slot_size_starts_a_new_pool() -> None:
    pool = BlockBuffers(max_bytes=10_000)
    old = pool.lease(1000, 1000)
    new = pool.lease(2000, 2000)  # another origin geometry
    assert pool.pooled_bytes == 2000
    del old
    assert address(pool.lease(2000, 2000)) != address(new)  # the old size's buffer never comes back


async def test_blocks_loaded_one_after_another_land_in_the_same_buffer_once_the_first_is_dropped() -> None:
    # What a cold pull through an edge does once its memory tier is full: the block evicted gives its
    # buffer to the next load, whose pages are already mapped.
    buffers = BlockBuffers(1 << 20)
    loop = asyncio.get_running_loop()
    starts = []
    for n in range(3):
        payload = bytes([n]) * 10240
        chunks = [payload[at : at + 4096] for at in range(0, len(payload), 4096)]
        info = pb.BlockInfo(
            key=bytes([n]) * 32, n_tokens=40, n_bytes=len(payload), frame_digests=[digest(c) for c in chunks]
        )
        target = PullTarget(info, GEOMETRY, Pull(seen_before=False, from_peers=False), loop, buffers)
        for i, chunk in enumerate(chunks):
            [region] = target.regions(0, 40, i * 4096, len(chunk))
            region[:] = np.frombuffer(chunk, dtype=np.uint8)
            target.frame_done(0, 40, i * 4096 + len(chunk))
        starts.append(address(target.frames[0]))
        assert bytes(target.frames[2]).endswith(bytes([n]) * 2048)
        del target, region
        await asyncio.sleep(0)  # the pull's appends, scheduled on the loop, run and let go
    assert starts[0] == starts[1] == starts[2]
    assert (buffers.leased_from_pool, buffers.allocated) == (3, 0)


def test_a_full_pool_collects_leases_only_a_reference_cycle_keeps() -> None:
    # A cancelled stream's traceback holds its blocks in a cycle: the full pool collects once
    # (at most once a second) instead of allocating.
    pool = BlockBuffers(max_bytes=1000)
    gc.disable()
    try:
        cycle: list[object] = []
        cycle += [cycle, memoryview(pool.lease(1000, 1000))]
        at = address(cycle[1])  # type: ignore[arg-type]
        del cycle
        held = pool.lease(1000, 1000)
        assert address(held) == at
        assert (pool.collections, pool.allocated) == (1, 0)
        pool.lease(1000, 1000)  # full again within the second: a buffer of its own, no second collection
        assert (pool.collections, pool.allocated) == (1, 1)
    finally:
        gc.enable()
