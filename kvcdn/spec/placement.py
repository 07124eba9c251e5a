"""Where a block lives: a consistent-hash ring over the edges, shared by clients and edges.

Built on `uhashring` (maintained; its MD5-point ring is written out in proto/kvcdn/v1/SPEC.md section
6, with test vectors): 160 virtual nodes per unit of weight keep the load within ~10% of the mean over
8 nodes, and adding or removing one of N nodes moves about 1/N of the keys, only to or from that
node. A key's owners are the first R distinct nodes clockwise from it; clients ask them in that order
and then the rest of the ring, so losing an owner moves its load onto the next replica instead of
reshuffling everyone's.

Membership comes from flags (`HOST:PORT` entries, optionally `=WEIGHT`), from files named by `@PATH`
entries (one entry a line: a Kubernetes ConfigMap mounted as a file), and from DNS names that
resolve to several addresses (a Kubernetes headless service), expanded by `resolve_edges`. A name
that resolves to one address stays the edge's name (a StatefulSet pod's): TLS checks the server's
certificate for it, and the ring does not change when the pod comes back with another address.
`Membership` follows files and names while a process runs, so edges come and go without restarts.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from uhashring import HashRing

from kvcdn.errors import InvalidArgument, Unavailable

__all__ = [
    "DEFAULT_REPLICAS",
    "Membership",
    "Placement",
    "balance",
    "is_loopback",
    "parse_edges",
    "read_edges",
    "resolve_edges",
]

log = logging.getLogger(__name__)

DEFAULT_REPLICAS = 2
VNODES = 160


def is_loopback(address: str) -> bool:
    """Whether `HOST:PORT` (or a bare host) names this machine only: a loopback address or
    `localhost`. A wildcard (`0.0.0.0`, `[::]`) or any other name reaches beyond it."""
    host = address.rpartition(":")[0] if address.count(":") == 1 or address.startswith("[") else address
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_edges(specs: Sequence[str]) -> dict[str, int]:
    """`["h:1", "h:2=3"]` -> `{"h:1": 1, "h:2": 3}`: addresses with their weights (default 1)."""
    out: dict[str, int] = {}
    for spec in specs:
        address, _, weight = spec.strip().partition("=")
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise InvalidArgument(f"edge {spec!r} is not HOST:PORT[=WEIGHT]")
        if weight and (not weight.isdigit() or int(weight) < 1):
            raise InvalidArgument(f"edge {spec!r}: the weight must be a positive whole number")
        out[address] = int(weight or 1)
    if not out:
        raise InvalidArgument("no edge address given (--edges HOST:PORT[,...])")
    return out


def read_edges(specs: Sequence[str]) -> dict[str, int]:
    """`parse_edges` of `specs` with each `@PATH` entry replaced by the entries of that file: one
    `HOST:PORT[=WEIGHT]` a line (or several, comma-separated), blank lines and `#` comments skipped.
    InvalidArgument names a file that cannot be read or lists no edge."""
    entries: list[str] = []
    for spec in specs:
        if not spec.strip().startswith("@"):
            entries.append(spec)
            continue
        path = Path(spec.strip()[1:])
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise InvalidArgument(f"cannot read the edge list {path}: {why}") from None
        listed = [e for line in text.splitlines() for e in line.partition("#")[0].split(",") if e.strip()]
        if not listed:
            raise InvalidArgument(f"the edge list {path} names no edge (one HOST:PORT a line)")
        entries += listed
    return parse_edges(entries)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def resolve_edges(edges: Mapping[str, int], strict: bool = True) -> dict[str, int]:
    """Expand each DNS name that resolves to several addresses into one edge per address (IPv4
    first), same weight; a name with one address is kept. A name that does not resolve is
    Unavailable, or with `strict` False kept as it is (an edge's peers: a pod starting beside it
    may not be in DNS yet)."""
    out: dict[str, int] = {}
    for address, weight in edges.items():
        host, _, port = address.rpartition(":")
        if _is_ip(host):
            out[address] = weight
            continue
        try:
            infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            if strict:
                raise Unavailable(f"edge name {host!r} does not resolve: {exc.strerror}") from None
            out[address] = weight
            continue
        addresses = {
            f"[{sockaddr[0]}]:{port}" if family == socket.AF_INET6 else f"{sockaddr[0]}:{port}": family
            for family, *_, sockaddr in infos
        }
        if len(addresses) == 1:
            out[address] = weight
            continue
        for resolved in sorted(addresses, key=lambda a: addresses[a] != socket.AF_INET):
            out[resolved] = weight
    return out


class Placement:
    """Consistent-hash ring of edge addresses with a replication factor."""

    def __init__(self, edges: Mapping[str, int] | Sequence[str], replicas: int = DEFAULT_REPLICAS) -> None:
        weights = dict(edges) if isinstance(edges, Mapping) else dict.fromkeys(edges, 1)
        if not weights:
            raise InvalidArgument("a placement needs at least one edge")
        if replicas < 1:
            raise InvalidArgument("the replication factor must be at least 1")
        self.replicas = replicas
        self._ring = HashRing(nodes={a: {"weight": w} for a, w in weights.items()}, vnodes=VNODES)

    @property
    def nodes(self) -> list[str]:
        return sorted(self._ring.get_nodes())

    def add(self, address: str, weight: int = 1) -> None:
        self._ring.add_node(address, {"weight": weight})

    def remove(self, address: str) -> None:
        self._ring.remove_node(address)

    def owners(self, key: bytes) -> list[str]:
        """The key's R distinct owners in ring order (fewer when the ring has fewer nodes)."""
        return self.route(key)[: self.replicas]

    def route(self, key: bytes) -> list[str]:
        """Every node in the order to ask for `key`: its owners first, then the rest clockwise."""
        nodes = self._ring.range(key.hex(), size=len(self._ring.get_nodes()), unique=True)
        return [str(node["nodename"]) for node in nodes]


class Membership:
    """The ring of an edge set that may change while a process runs: `specs` as `read_edges` takes
    them, re-read and re-resolved by `refresh` (`@PATH` files, DNS names; a list of addresses alone
    never changes). A new set gives a new `placement`: consistent hashing moves only the keys whose
    owners changed, about 1/N of them when one of N edges comes or goes. A list that cannot be read
    or resolved, or comes out empty, keeps the ring as it is (logged): a file half-written or a DNS
    hiccup must not empty the ring."""

    def __init__(
        self, specs: Sequence[str], replicas: int = DEFAULT_REPLICAS, refresh_s: float = 5.0, strict: bool = True
    ) -> None:
        self.specs = tuple(specs)
        self.replicas = replicas
        self.refresh_s = refresh_s
        self.strict = strict
        self.edges = resolve_edges(read_edges(self.specs), strict)
        """The edges with their weights, as last read."""
        self.placement = Placement(self.edges, replicas)
        self.previous: Placement | None = None
        """The ring before the last change (where a block's previous owners are)."""
        self.changed_at = 0.0
        """`time.monotonic()` of the last change (0: none yet)."""
        self.changes = 0
        """How many times the edge set changed since the start."""
        self._read_at = time.monotonic()

    @property
    def follows(self) -> bool:
        """Whether the set can change: some entry is a file or a DNS name."""
        entries = [s.strip() for s in self.specs]
        return any(e.startswith("@") or not _is_ip(e.partition("=")[0].rpartition(":")[0]) for e in entries)

    @property
    def due(self) -> bool:
        """Whether `refresh_s` has passed since the list was last read (never, for a fixed list)."""
        return self.follows and time.monotonic() - self._read_at >= self.refresh_s

    def refresh(self) -> bool:
        """Read the list again (it may block on DNS: call it off the event loop); True when the edge
        set changed and `placement` is a new ring."""
        self._read_at = time.monotonic()
        try:
            edges = resolve_edges(read_edges(self.specs), self.strict)
        except (InvalidArgument, Unavailable) as exc:
            log.warning("keeping the ring of %d edges: the edge list cannot be read now (%s)", len(self.edges), exc)
            return False
        if edges == self.edges:
            return False
        added = sorted(set(edges) - set(self.edges))
        removed = sorted(set(self.edges) - set(edges))
        log.info("edge set changed: %d edges (joined: %s; left: %s)", len(edges), added or "-", removed or "-")
        self.edges, self.previous, self.placement = edges, self.placement, Placement(edges, self.replicas)
        self.changed_at = time.monotonic()
        self.changes += 1
        return True


def balance(choices: Sequence[Sequence[str]], sizes: Sequence[int]) -> list[str]:
    """One of `choices[i]` for each item i of `sizes` bytes, so that the most bytes any one choice gets
    is small: each item goes to the least loaded of its choices (the first on a tie), then items move
    off the busiest choice while a move lowers it (as many moves as there are items at most)."""
    picked = [c[0] for c in choices]
    load: dict[str, int] = {}
    for i, size in enumerate(sizes):
        picked[i] = min(choices[i], key=lambda c: load.get(c, 0))
        load[picked[i]] = load.get(picked[i], 0) + size
    for _ in sizes:
        busiest = max(load, key=lambda c: load[c], default="")
        move = next(
            (
                (i, c)
                for i, size in enumerate(sizes)
                if picked[i] == busiest
                for c in choices[i]
                if load.get(c, 0) + size < load[busiest]
            ),
            None,
        )
        if move is None:
            break
        i, to = move
        load[busiest] -= sizes[i]
        load[to] = load.get(to, 0) + sizes[i]
        picked[i] = to
    return picked
