"""The edge's admission rule, one pure function so it can be read and tested on its own.

A loaded block is kept in a tier if the tier has room for it without evicting anything, or if it is
wanted more than once: several requests joined its load, or it was missed before (the edge remembers
its recent misses). So a huge document that one agent reads once streams through a full tier without
flushing the hot working set, and a block that comes back is admitted the second time. A block purged
while it loaded (`stale`) is kept nowhere. (A block larger than a tier's whole budget is refused by
the tier itself.)
"""

from __future__ import annotations

__all__ = ["admit"]


def admit(
    *, tier_bytes: int, tier_max_bytes: int, block_bytes: int, requests: int, seen_before: bool, stale: bool
) -> bool:
    """Whether a tier holding `tier_bytes` of `tier_max_bytes` keeps a loaded block of `block_bytes`
    that `requests` requests waited for (`seen_before`: it was missed before this load)."""
    if stale:
        return False
    return tier_bytes + block_bytes <= tier_max_bytes or requests > 1 or seen_before
