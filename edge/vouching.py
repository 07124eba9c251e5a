"""Which block infos an edge that trusts publisher keys (`--trust`) takes in and serves: every info
from upstream is checked against the trusted keys (kvcdn.spec.provenance), and so is every info it
serves from its own tiers, in full, not by signer id: a disk tier can be written to by whoever holds
the host, and a block whose stored info no trusted signature covers is dropped and loaded again."""

from __future__ import annotations

import logging

from kvcdn.edge.tiers import Tier
from kvcdn.spec.provenance import TrustStore, Untrusted
from kvcdn.store.lru import ByteLRU
from kvcdn.v1 import kvcdn_pb2 as pb
from kvcdn.wire.frames import EncodedBlock

__all__ = ["Voucher"]

log = logging.getLogger(__name__)


class Voucher:
    """The edge's trusted publisher keys (None: it trusts whatever its origin sends) and what it
    verified already."""

    def __init__(self, trust: TrustStore | None, fresh: ByteLRU[bytes, pb.BlockInfo], remembered: int) -> None:
        self.trust = trust
        self._fresh = fresh
        """The infos upstream answered lookups with (checked by `upstream` when they arrived)."""
        self._verified: ByteLRU[bytes, bytes] = ByteLRU(remembered, lambda _: 1)
        """Held blocks' infos (serialized, by key) whose signatures verified."""
        self.dropped = 0
        """Blocks a tier held that no trusted signature covered, dropped (and loaded again)."""

    def upstream(self, fingerprint: str, infos: list[pb.BlockInfo], sender: str) -> list[pb.BlockInfo]:
        """`infos` as `sender` answered, each checked: Untrusted for the first unsigned or forged one."""
        if self.trust is not None:
            raw_fingerprint = bytes.fromhex(fingerprint)
            for info in infos:
                self.trust.check_block(raw_fingerprint, info, sender)
        return infos

    def held(self, info: pb.BlockInfo, fingerprint: str | None) -> pb.BlockInfo | None:
        """`info`, of a block the edge holds, as it may be served: as it is where no keys are trusted
        or a trusted signature over it verifies; else upstream's fresh info for the same frames (a
        block signed under a key since rotated away); else None (forged, or not signed afresh yet, or
        the model's `fingerprint` not known yet)."""
        if self.trust is None:
            return info
        stored = info.SerializeToString()
        if self._verified.get(info.key) == stored:
            return info
        fresh = self._fresh.get(info.key)
        if fresh is not None and fresh.frame_digests == info.frame_digests:
            return fresh
        if fingerprint is None:
            return None
        try:
            self.trust.check_block(bytes.fromhex(fingerprint), info, "this edge's own tier")
        except Untrusted:
            return None
        self._verified.put(info.key, stored)
        return info

    def kept(self, tier: Tier, block: EncodedBlock | None, fingerprint: str | None) -> EncodedBlock | None:
        """`block` as `tier` returned it, if it may be served (`held`); else None, and it is dropped
        from the tier."""
        if block is None or self.held(block.info, fingerprint) is not None:
            return block
        log.warning(
            "%s tier: block %s… is not signed by a trusted publisher; dropped, loading it again",
            tier.metrics.tier,
            block.info.key.hex()[:16],
        )
        tier.drop(block.info.key)
        self.dropped += 1
        return None
