"""Block payload layout: cut from a prefill, reassembled in place from arbitrary frame boundaries."""

from __future__ import annotations

import pytest
import torch

from kvcdn.errors import InvalidArgument
from kvcdn.model.receiving import KVAssembler
from kvcdn.model.staging import StagingPool
from kvcdn.model.tensors import TORCH_DTYPES, block_payload
from kvcdn.spec.geometry import Geometry
from kvcdn.spec.identity import block_spans


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("frame_bytes", [100, 1536, 1 << 20])
@pytest.mark.parametrize("staged", [False, True], ids=["in-place", "staged"])
def test_blocks_cut_and_reassembled_are_bit_identical(dtype: str, frame_bytes: int, staged: bool) -> None:
    # staged: the GPU's path with an unpinned pool (frames land in wire order, each block is copied
    # whole and scattered into the layers), run on the CPU.
    g = Geometry(layers=3, kv_heads=2, head_dim=8, dtype=dtype, block_tokens=16, frame_bytes=frame_bytes)
    torch.manual_seed(0)
    n = 45
    layers = [
        (torch.randn(1, 2, n, 8).to(TORCH_DTYPES[g.dtype]), torch.randn(1, 2, n, 8).to(TORCH_DTYPES[g.dtype]))
        for _ in range(3)
    ]
    pool = StagingPool(pin=False) if staged else None
    asm = KVAssembler(g, n, torch.device("cpu"), pool)
    for start, end in block_spans(n, g.block_tokens):
        payload = block_payload(g, layers, start, end)
        assert len(payload) == g.block_bytes(end - start)
        for off in range(0, len(payload), frame_bytes):
            asm.write(start, end - start, off, memoryview(payload)[off : off + frame_bytes])
        if start == 0:
            asm.block_done(start, end - start)  # the others land when layers() finds them missing
    for (k, v), (rk, rv) in zip(asm.layers(), layers, strict=True):
        assert k.shape == rk.shape == (1, 2, n, 8)
        assert torch.equal(k, rk) and torch.equal(v, rv)
    if pool is not None:  # the staging went back once every block had landed
        assert pool.free_bytes == n * g.token_bytes and pool.allocations == 1 and pool.leased == 0


def test_geometry_rejects_bad_values() -> None:
    with pytest.raises(InvalidArgument, match="dtype"):
        Geometry(layers=1, kv_heads=1, head_dim=1, dtype="int8")
    with pytest.raises(InvalidArgument, match="positive"):
        Geometry(layers=0, kv_heads=1, head_dim=1, dtype="float32")
    with pytest.raises(InvalidArgument, match="4 MiB"):
        Geometry(layers=1, kv_heads=1, head_dim=1, dtype="float32", frame_bytes=8 << 20)


@pytest.mark.parametrize("staged", [False, True], ids=["in-place", "staged"])
def test_assembler_rejects_frames_outside_the_cache(staged: bool) -> None:
    g = Geometry(layers=1, kv_heads=1, head_dim=4, dtype="float32", block_tokens=4)
    asm = KVAssembler(g, 4, torch.device("cpu"), StagingPool(pin=False) if staged else None)
    with pytest.raises(InvalidArgument):
        asm.write(4, 4, 0, memoryview(bytes(16)))
    with pytest.raises(InvalidArgument):
        asm.write(0, 4, g.block_bytes(4) - 8, memoryview(bytes(16)))


def test_geometry_round_trips_through_proto() -> None:
    g = Geometry(layers=30, kv_heads=3, head_dim=64, dtype="bfloat16")
    assert Geometry.from_proto(g.to_proto()) == g
    assert g.token_bytes == 30 * 2 * 3 * 64 * 2 == 23040


def test_staging_pool_reuses_its_buffers_and_keeps_at_most_its_budget() -> None:
    pool = StagingPool(pin=False, keep_bytes=3000)
    a = pool.lease(1000)
    assert a.buffer.numel() >= 1000 and pool.allocations == 1 and pool.leased == 1
    a.release()
    b = pool.lease(800)  # a smaller fetch reuses the free buffer
    assert b.buffer.data_ptr() == a.buffer.data_ptr() and pool.allocations == 1
    c = pool.lease(900)  # the only free buffer is leased: a new one
    assert pool.allocations == 2 and pool.leased == 2
    b.release()
    c.release()
    assert pool.free_bytes <= 3000 and pool.leased == 0
    pool.lease(2500).release()  # over the budget: the smallest free buffers go
    assert pool.free_bytes <= 3000 and pool.allocations == 3
    big = pool.lease(2500)
    assert pool.allocations == 3
    big.release()
    small = pool.lease(100)  # an encoded block's buffer: not the big one a raw cache needs next
    assert small.buffer.data_ptr() != big.buffer.data_ptr() and pool.allocations == 4


def test_staging_pool_hands_out_the_buffer_it_picked_among_buffers_of_other_sizes() -> None:
    # Took the first lossy fetch on a GPU down: the pool removed its pick from the free list by
    # tensor equality, which compares buffers of different sizes elementwise and raises.
    pool = StagingPool(pin=False)
    big, small = pool.lease(4000), pool.lease(1500)
    small.release()
    big.release()  # free, largest first: [big, small]
    again = pool.lease(1200)
    assert again.buffer is small.buffer and pool.free_bytes == big.buffer.numel()
    assert pool.lease(4000).buffer is big.buffer and pool.free_bytes == 0 and pool.allocations == 2


def test_a_staging_lease_goes_back_once_and_only_to_its_pool() -> None:
    pool, other = StagingPool(pin=False), StagingPool(pin=False)
    lease = pool.lease(64)
    lease.release()
    with pytest.raises(RuntimeError, match="twice"):
        lease.release()  # else two fetches would land in one buffer
    assert pool.leased == 0 and pool.free_bytes == 64
    stolen = pool.lease(64)
    stolen._pool = other  # a holder that hands it to the wrong pool
    with pytest.raises(RuntimeError, match="did not grant"):
        stolen.release()
    assert other.free_bytes == 0


def test_a_failed_fetch_gives_its_staging_back() -> None:
    # A fetch that fails after its first frames never calls layers(): close() must release its lease.
    g = Geometry(layers=2, kv_heads=2, head_dim=8, dtype="float32", block_tokens=16)
    pool = StagingPool(pin=False)
    asm = KVAssembler(g, 40, torch.device("cpu"), pool)
    asm.write(0, 16, 0, memoryview(bytes(64)))
    assert pool.leased == 1
    asm.close()
    assert pool.leased == 0 and pool.free_bytes == 40 * g.token_bytes
    asm.close()  # closing twice releases nothing twice
    assert pool.leased == 0


def test_a_cpu_assembler_is_the_cache_itself() -> None:
    g = Geometry(layers=1, kv_heads=1, head_dim=4, dtype="float32", block_tokens=2)
    asm = KVAssembler(g, 2, torch.device("cpu"))
    payload = torch.arange(16, dtype=torch.float32).numpy().tobytes()
    asm.write(0, 2, 0, memoryview(payload))
    asm.block_done(0, 2)  # nothing to copy on the CPU
    [(k, v)] = asm.layers()
    assert k.data_ptr() == asm.layers()[0][0].data_ptr()  # views of the same buffers, no copy
    assert k.flatten().tolist() == list(range(8)) and v.flatten().tolist() == list(range(8, 16))
