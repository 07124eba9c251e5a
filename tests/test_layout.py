"""Block payload layout: cut from a prefill, reassembled in place from arbitrary frame boundaries."""

from __future__ import annotations

import pytest
import torch

from kvcdn.errors import InvalidArgument
from kvcdn.model.tensors import TORCH_DTYPES, KVAssembler, StagingPool, block_payload
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
        assert pool.free_bytes == n * g.token_bytes and pool.allocations == 1


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
    a = pool.take(1000)
    assert a.numel() >= 1000 and pool.allocations == 1
    pool.give(a)
    b = pool.take(800)  # a smaller fetch reuses the free buffer
    assert b.data_ptr() == a.data_ptr() and pool.allocations == 1
    c = pool.take(900)  # the only free buffer is taken: a new one
    assert pool.allocations == 2
    pool.give(b)
    pool.give(c)
    assert pool.free_bytes <= 3000
    pool.give(pool.take(2500))  # over the budget: the smallest free buffers go
    assert pool.free_bytes <= 3000 and pool.allocations == 3
    big = pool.take(2500)
    assert pool.allocations == 3
    pool.give(big)
    small = pool.take(100)  # an encoded block's buffer: not the big one a raw cache needs next
    assert small.data_ptr() != big.data_ptr() and pool.allocations == 4


def test_staging_pool_hands_out_the_buffer_it_picked_among_buffers_of_other_sizes() -> None:
    # Took the first lossy fetch on a GPU down: the pool removed its pick from the free list by
    # tensor equality, which compares buffers of different sizes elementwise and raises.
    pool = StagingPool(pin=False)
    big, small = pool.take(4000), pool.take(1500)
    pool.give(small)
    pool.give(big)  # free, largest first: [big, small]
    again = pool.take(1200)
    assert again is small and pool.free_bytes == big.numel()
    assert pool.take(4000) is big and pool.free_bytes == 0 and pool.allocations == 2


def test_a_cpu_assembler_is_the_cache_itself() -> None:
    g = Geometry(layers=1, kv_heads=1, head_dim=4, dtype="float32", block_tokens=2)
    asm = KVAssembler(g, 2, torch.device("cpu"))
    payload = torch.arange(16, dtype=torch.float32).numpy().tobytes()
    asm.write(0, 2, 0, memoryview(payload))
    asm.block_done(0, 2)  # nothing to copy on the CPU
    [(k, v)] = asm.layers()
    assert k.data_ptr() == asm.layers()[0][0].data_ptr()  # views of the same buffers, no copy
    assert k.flatten().tolist() == list(range(8)) and v.flatten().tolist() == list(range(8, 16))
