"""Per-client rate limits: a token bucket per client on every server that is given a rate.

A client is its token where the server knows it (`--tokens`: a reader token is one party wherever it
connects from), else its peer address. Callers holding an `edge` or `publisher` token are not limited:
they are the deployment's own (an origin that throttled its edges would throttle every agent behind
them). Each call (gRPC, or a bulk-port stream) takes one unit; a client over its rate gets
RESOURCE_EXHAUSTED with the time to wait, before any work is done, and other clients are not affected.
Buckets of clients not seen for a while are forgotten (at most `max_clients` are kept, least recently
seen dropped first: a dropped client starts again with a full burst). A call is counted before its
credentials are checked (`check_call`), so failed authentications take from the caller's address's
bucket too: guessing tokens goes no faster than the rate. The same identity names the caller of the
call being served (`CALLER`): an edge holds each client to a share of its pinned bytes (kvcdn.edge.pins).
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from contextvars import ContextVar

from kvcdn.errors import InvalidArgument, LimitExceeded
from kvcdn.wire.auth import Authorizer

__all__ = ["CALLER", "RateLimiter", "caller", "check_call", "peer_host"]

UNLIMITED_ROLES = frozenset({"edge", "publisher"})

CALLER: ContextVar[str | None] = ContextVar("kvcdn_caller", default=None)
"""Who the call being served is for (`caller`), set by `check_call` in the task that serves it; None
for the deployment's own callers (`edge` and `publisher` tokens) and outside a served call."""


def peer_host(peer: str) -> str:
    """The host of a gRPC peer string (`ipv4:127.0.0.1:5050`, `ipv6:[::1]:5050`), or the string."""
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return peer
    host, _, _ = rest.rpartition(":")
    return host.strip("[]") or rest


class RateLimiter:
    """`rate` calls a second per client, in bursts of up to `burst` (default: 2 s worth)."""

    def __init__(self, rate: float, burst: float = 0, max_clients: int = 65536) -> None:
        if rate <= 0:
            raise InvalidArgument("--rate-limit takes calls per second per client, above 0")
        self.rate = rate
        self.burst = burst or max(1.0, 2 * rate)
        if self.burst < 1:
            raise InvalidArgument("a rate limit's burst must allow at least one call")
        self._max_clients = max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        """client -> (units left, when last counted), least recently seen first."""

    def admit(self, client: str | None, method: str) -> None:
        """Take one unit for `client` (`caller`; None: not limited), or LimitExceeded."""
        if client is None:
            return
        now = time.monotonic()
        left, then = self._buckets.pop(client, (self.burst, now))
        left = min(self.burst, left + (now - then) * self.rate)
        if left < 1:
            self._buckets[client] = (left, now)
            raise LimitExceeded(
                f"{method}: {client} is over its rate of {self.rate:g} calls/s (--rate-limit); "
                f"retry in {(1 - left) / self.rate:.2f} s"
            )
        self._buckets[client] = (left - 1, now)
        while len(self._buckets) > self._max_clients:
            self._buckets.popitem(last=False)


def caller(peer: str, token: str, auth: Authorizer | None) -> str | None:
    """A caller's identity (`peer` address, `token` as sent): its token where the server knows it, else
    its address (an unknown token counts as its address); None for `edge` and `publisher` tokens."""
    role = auth.role(token) if auth is not None and token else None
    if role in UNLIMITED_ROLES:
        return None
    return f"{role} token {hashlib.sha256(token.encode()).hexdigest()[:8]}" if role else f"peer {peer}"


def check_call(auth: Authorizer | None, limiter: RateLimiter | None, peer: str, token: str, method: str) -> None:
    """The checks every call passes before any work, gRPC and bulk alike: who calls (`CALLER`, set for
    the rest of the task serving the call), the caller's rate (a guessed token costs its address a
    unit), then its credentials (Unauthenticated / PermissionDenied); LimitExceeded once over the rate."""
    client = caller(peer, token, auth)
    CALLER.set(client)
    if limiter is not None:
        limiter.admit(client, method)
    if auth is not None:
        auth.check(token, method)
