"""The edge's tiers behind one interface, and the admission rule as a pure function."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from kvcdn.edge.admission import admit
from kvcdn.edge.disk import DiskTier
from kvcdn.edge.tiers import MemoryTier, Tier
from kvcdn.wire.frames import EncodedBlock, encode_block

TierFactory = Callable[[Path, int], Tier]
TIERS: dict[str, TierFactory] = {
    "memory": lambda _root, max_bytes: MemoryTier(max_bytes),
    "disk": lambda root, max_bytes: DiskTier(root, max_bytes),
}


def _block(i: int, n_bytes: int = 5000) -> EncodedBlock:
    return encode_block(i.to_bytes(32, "big"), 0, 4, bytes([i % 256]) * n_bytes, 4096)


@pytest.mark.parametrize("kind", sorted(TIERS))
async def test_every_tier_keeps_gets_drops_and_counts_blocks_alike(kind: str, tmp_path: Path) -> None:
    tier = TIERS[kind](tmp_path, 3 * 5600)  # room for three blocks (plus each tier's overhead), not four
    blocks = [_block(i) for i in range(4)]
    for b in blocks:
        assert await tier.put(b)
    s = tier.stats()
    assert s.blocks == 3 and s.bytes <= s.max_bytes == 3 * 5600 and s.evictions == 1
    first = blocks[0].info.key
    assert first not in tier and tier.info(first) is None and await tier.get(first) is None  # least recent went
    key = blocks[3].info.key
    got = await tier.get(key)
    assert got is not None and got.frames == blocks[3].frames and got.frame_bytes == 4096
    assert tier.info(key) == blocks[3].info
    assert tier.drop(key) and key not in tier and not tier.drop(key)
    s = tier.stats()
    assert (s.hits, s.misses, s.blocks) == (1, 1, 2)


@pytest.mark.parametrize("kind", sorted(TIERS))
async def test_no_tier_keeps_a_block_larger_than_its_whole_budget(kind: str, tmp_path: Path) -> None:
    tier = TIERS[kind](tmp_path, 1000)
    block = _block(1)
    assert not await tier.put(block)
    assert block.info.key not in tier and tier.stats().blocks == 0 and tier.stats().bytes == 0


def test_admission_keeps_what_fits_without_evicting() -> None:
    assert admit(tier_bytes=10, tier_max_bytes=100, block_bytes=90, requests=1, seen_before=False, stale=False)
    assert not admit(tier_bytes=11, tier_max_bytes=100, block_bytes=90, requests=1, seen_before=False, stale=False)


def test_admission_keeps_what_is_wanted_more_than_once_even_in_a_full_tier() -> None:
    full = {"tier_bytes": 100, "tier_max_bytes": 100, "block_bytes": 10, "stale": False}
    assert admit(**full, requests=2, seen_before=False)  # several requests waited for its load
    assert admit(**full, requests=1, seen_before=True)  # it was missed before
    assert not admit(**full, requests=1, seen_before=False)  # a one-off: streamed through, not kept


def test_admission_never_keeps_a_block_purged_while_it_loaded() -> None:
    assert not admit(tier_bytes=0, tier_max_bytes=100, block_bytes=1, requests=5, seen_before=True, stale=True)
