"""An edge's peers (kvcdn.edge.edge asks them): the ring it is on, which of its peers to ask for a
block's info or frames, their stubs, and which recently failed (skipped for `peer_suspect_s`).

A block this edge does not own is loaded from its owners in ring order, a block it owns as a replica
from the primary owner, before the origin; the primary, and any edge a peer asks, loads from its
tiers or the origin only, so no request goes round the ring, and the origin sends each block once
(to its primary) however many edges are asked for it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

from kvcdn.edge.config import EdgeConfig
from kvcdn.errors import InvalidArgument, KVCDNError
from kvcdn.spec.identity import encoded_key
from kvcdn.spec.placement import Membership, Placement
from kvcdn.spec.provenance import Untrusted
from kvcdn.v1 import kvcdn_pb2 as pb
from kvcdn.wire.source import Suspects
from kvcdn.wire.stub import CacheReader

__all__ = ["HANDOFF_S", "Peers", "reader_for"]

HANDOFF_S = 600.0
"""How long after the edge set changes a block's new primary asks its previous owners first."""

log = logging.getLogger(__name__)


def reader_for(config: EdgeConfig, address: str) -> CacheReader:
    """The stub an edge loads blocks with from `address` (its origin or a peer), with the config's
    deadlines (`origin_timeout_s` a call, ten times that a stream), its token and its TLS files."""
    return CacheReader(address, config.origin_timeout_s, 10 * config.origin_timeout_s, config.token, config.tls)


class Peers:
    """The other edges on the ring of `config.peers`, as the edge named `address` on it sees them.

    A list that can change (`@PATH` files, DNS names) is followed by `start`'s task: an edge that
    joins owns its share of the blocks from the next read on (loading each from its previous owners
    on first request, for `HANDOFF_S` after the change), one that leaves is no longer asked. An edge
    a followed list does not name yet (a pod that starts before its ConfigMap lists it) serves as a
    non-owner until it does."""

    def __init__(self, config: EdgeConfig, address: str) -> None:
        self.membership = Membership(config.peers, config.replicas, config.membership_refresh_s, strict=False)
        name = config.advertise or address
        if name not in self.membership.edges:
            fix = "list every edge, this one included, as the clients do, or name this edge with --advertise"
            if not self.membership.follows:
                raise InvalidArgument(f"the peer list does not name this edge ({name}): {fix}")
            log.warning("the peer list does not name this edge (%s) yet: serving as a non-owner (%s)", name, fix)
        self.config = config
        self.address = name
        """This edge's name on the ring."""
        self.suspects = Suspects(config.peer_suspect_s)
        """Peers that recently failed to answer or to send a block: not asked for a while."""
        self._readers: dict[str, CacheReader] = {}
        self._following: asyncio.Task[None] | None = None

    @property
    def ring(self) -> Placement:
        """The ring of the edge set as last read."""
        return self.membership.placement

    def start(self) -> None:
        """Follow the peer list in the background, where it can change."""
        if self.membership.follows:
            self._following = asyncio.create_task(self._follow())

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(self.membership.refresh_s)
            try:
                await asyncio.to_thread(self.membership.refresh)
            except Exception:  # the edge goes on with the ring it has, and tries again
                log.exception("could not re-read the peer list")

    def reader(self, address: str) -> CacheReader:
        if address not in self._readers:
            self._readers[address] = reader_for(self.config, address)
        return self._readers[address]

    def sources(self, key: bytes) -> list[str]:
        """Edges to load the block from before the origin, suspects left out: for its primary owner,
        the owners it had before the edge set last changed, for `HANDOFF_S` after it (they hold it:
        a block moves from edge to edge, not again from the origin), else none; the primary for
        another owner; every owner in ring order for an edge that owns it not."""
        owners = self.ring.owners(key)
        if owners[0] == self.address:
            before = self.membership.previous
            if before is None or time.monotonic() - self.membership.changed_at > HANDOFF_S:
                return []  # long after a change, a previous owner would only relay the origin's copy
            asked = [a for a in before.owners(key) if a != self.address]
        else:
            asked = owners[:1] if self.address in owners else owners
        return [a for a in asked if a not in self.suspects]

    async def infos(
        self,
        fingerprint: str,
        keys: Sequence[bytes],
        accepted: Sequence[str],
        held: Callable[[bytes], bool],
        trusted: Callable[[str, list[pb.BlockInfo], str], list[pb.BlockInfo]],
    ) -> dict[bytes, pb.BlockInfo]:
        """Infos, by encoded key, of the blocks of `keys` this edge lacks (`held` says which it holds,
        by encoded key) that their owners hold: one from_peer lookup per peer that owns some of them,
        in parallel, each bounded by the peer timeout (a peer that fails or is slow counts as holding
        nothing), each answer checked by `trusted(fingerprint, infos, peer)`."""
        asked: dict[str, list[bytes]] = {}
        for key in keys:
            if any(held(encoded_key(key, codec)) for codec in accepted):
                continue
            # An encoded block lives with the owners of its own key; clients stream from any of them.
            owners = {o for codec in accepted for o in self.ring.owners(encoded_key(key, codec))}
            for owner in sorted(owners):
                if owner != self.address and owner not in self.suspects:
                    asked.setdefault(owner, []).append(key)

        async def ask(peer: str, peer_keys: list[bytes]) -> list[pb.BlockInfo]:
            try:
                async with asyncio.timeout(self.config.peer_timeout_s):
                    infos = await self.reader(peer).lookup(fingerprint, peer_keys, accepted, from_peer=True)
                return trusted(fingerprint, infos, peer)
            except Untrusted as exc:
                self.suspects.suspect(peer)
                log.warning("peer %s: %s; not asking it for a while", peer, exc)
                return []
            except (KVCDNError, TimeoutError) as exc:
                log.debug("peer %s could not answer a lookup: %s", peer, exc or "timed out")
                return []

        answers = await asyncio.gather(*(ask(peer, peer_keys) for peer, peer_keys in asked.items()))
        return {info.key: info for infos in answers for info in infos}

    async def close(self) -> None:
        if self._following is not None:
            self._following.cancel()
            await asyncio.gather(self._following, return_exceptions=True)
        for reader in self._readers.values():
            await reader.close()
