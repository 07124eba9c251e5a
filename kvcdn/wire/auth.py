"""Credentials: bearer tokens with roles, checked where a call meets gRPC (and on the bulk port).

The origin's write side and its invalidation feed are not for everyone who can reach it: with a
tokens file (`kvcdn origin --tokens FILE`, lines `ROLE TOKEN`), Publish, Purge and Revoke need a `publisher`
token and Watch an `edge` (or `publisher`) token, sent as gRPC metadata `authorization: Bearer TOKEN`.
No token, or an unknown one, is UNAUTHENTICATED; a token whose role may not call the method is
PERMISSION_DENIED. Reads (GetManifest, LookupPrefix, StreamBlocks, the bulk port) are open by
default: what they return is signed (kvcdn.spec.provenance). A deployment whose documents are not
for everyone closes them (`--closed-reads`, on the origin and on every edge): then reads need a token
of any role (`reader` for agents; edges read from the origin and each other with their `edge` token),
and the bulk port takes it in its request. GetInfo and health stay open. Tokens are compared in
constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path

from kvcdn.errors import InvalidArgument, PermissionDenied, Unauthenticated
from kvcdn.wire.logs import ThrottledWarning

__all__ = ["ROLES", "Authorizer", "bearer", "read_token", "token_of", "write_tokens"]

READS = frozenset({"GetManifest", "LookupPrefix", "StreamBlocks"})
"""Methods that need a token only where reads are closed."""
ROLES: dict[str, frozenset[str]] = {
    "publisher": frozenset({"Publish", "Purge", "Revoke", "Watch"}) | READS,
    "edge": frozenset({"Watch"}) | READS,
    "reader": READS,
}
"""What each role may call."""
WRITES = frozenset(m for methods in ROLES.values() for m in methods) - READS
"""Methods that need credentials whenever a server has a tokens file."""
_MIN_TOKEN = 16


log = logging.getLogger(__name__)

REFUSALS_LOGGED_EVERY_S = 60.0
"""Calls refused for their credentials are logged once in this long, with how many there were."""


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class Authorizer:
    """The tokens a server accepts and the role each grants."""

    def __init__(self, tokens: Mapping[str, str], closed_reads: bool = False) -> None:
        for token, role in tokens.items():
            if role not in ROLES:
                raise InvalidArgument(f"role {role!r} is not one of {', '.join(ROLES)}")
            if len(token) < _MIN_TOKEN:
                raise InvalidArgument(f"a {role} token is shorter than {_MIN_TOKEN} characters: use a random one")
        self._roles = [(_digest(t), r) for t, r in tokens.items()]
        self.guarded = WRITES | READS if closed_reads else WRITES
        """The methods a call needs a token for."""
        self._refusals = ThrottledWarning(log, REFUSALS_LOGGED_EVERY_S)

    @classmethod
    def from_file(cls, path: Path, closed_reads: bool = False) -> Authorizer:
        """Lines `ROLE TOKEN`; blank lines and `#` comments ignored."""
        try:
            lines = path.read_text().splitlines()
        except OSError as exc:
            raise InvalidArgument(f"--tokens {path}: {exc.strerror}") from None
        tokens: dict[str, str] = {}
        for n, line in enumerate(lines, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 2:
                raise InvalidArgument(f"--tokens {path} line {n}: expected `ROLE TOKEN`")
            tokens[parts[1]] = parts[0]
        if not tokens:
            raise InvalidArgument(f"--tokens {path} holds no token")
        return cls(tokens, closed_reads)

    def role(self, token: str) -> str | None:
        """The role `token` grants, or None for a token this server does not know."""
        digest = _digest(token)
        return next((r for d, r in self._roles if hmac.compare_digest(d, digest)), None)

    def check(self, token: str, method: str) -> None:
        """Nothing for open methods; else Unauthenticated / PermissionDenied unless `token`'s role
        may call `method`."""
        if method not in self.guarded:
            return
        try:
            if not token:
                raise Unauthenticated(f"{method} needs credentials: send `authorization: Bearer TOKEN` (--token-file)")
            role = self.role(token)
            if role is None:
                raise Unauthenticated(f"{method}: the token is not one this server knows")
            if method not in ROLES[role]:
                raise PermissionDenied(f"a {role} token may not call {method}")
        except (Unauthenticated, PermissionDenied) as exc:
            self._refusals("refused calls for their credentials; the latest: %s", exc)
            raise

    @property
    def refused(self) -> int:
        """Calls refused for missing, unknown or insufficient credentials (also a metric: the calls
        handled with UNAUTHENTICATED or PERMISSION_DENIED)."""
        return self._refusals.count


def token_of(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The token a gRPC call carries as `authorization: Bearer TOKEN` metadata ("": none)."""
    token = ""
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            token = value.removeprefix("Bearer ").strip()
    return token


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries `token` ("": none)."""
    return (("authorization", f"Bearer {token}"),) if token else ()


def read_token(path: Path | None) -> str:
    """The token in a file (its first line), or "" for no file."""
    if path is None:
        return ""
    try:
        token = path.read_text().strip().splitlines()[0].strip()
    except (OSError, IndexError):
        raise InvalidArgument(f"--token-file {path} is missing or empty") from None
    return token


def write_tokens(folder: Path) -> tuple[Path, dict[str, Path]]:
    """A tokens file with a fresh random token per role, and one file per role holding its token
    (all mode 0600): what `kvcdn up` hands the origin, the edges and the publishers."""
    folder.mkdir(parents=True, exist_ok=True)
    tokens = {role: secrets.token_urlsafe(32) for role in ROLES}

    def private(path: Path, text: str) -> Path:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return path

    table = private(folder / "tokens", "".join(f"{role} {token}\n" for role, token in tokens.items()))
    return table, {role: private(folder / f"{role}.token", token + "\n") for role, token in tokens.items()}
