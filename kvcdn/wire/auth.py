"""Credentials of the control plane: bearer tokens with roles, checked where a call meets gRPC.

The origin's write side and its invalidation feed are not for everyone who can reach it: with a
tokens file (`kvcdn origin --tokens FILE`, lines `ROLE TOKEN`), Publish and Purge need a `publisher`
token and Watch an `edge` (or `publisher`) token, sent as gRPC metadata `authorization: Bearer TOKEN`.
No token, or an unknown one, is UNAUTHENTICATED; a token whose role may not call the method is
PERMISSION_DENIED. Reads (GetInfo, GetManifest, LookupPrefix, StreamBlocks, the bulk port) stay open:
what they return is public, and signed (kvcdn.spec.provenance). Tokens are compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path

from kvcdn.errors import InvalidArgument, PermissionDenied, Unauthenticated

__all__ = ["ROLES", "Authorizer", "bearer", "read_token", "write_tokens"]

ROLES: dict[str, frozenset[str]] = {
    "publisher": frozenset({"Publish", "Purge", "Watch"}),
    "edge": frozenset({"Watch"}),
}
"""What each role may call besides the open reads."""
GUARDED = frozenset(m for methods in ROLES.values() for m in methods)
"""Methods that need credentials when the server has a tokens file."""
_MIN_TOKEN = 16


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class Authorizer:
    """The tokens a server accepts and the role each grants."""

    def __init__(self, tokens: Mapping[str, str]) -> None:
        for token, role in tokens.items():
            if role not in ROLES:
                raise InvalidArgument(f"role {role!r} is not one of {', '.join(ROLES)}")
            if len(token) < _MIN_TOKEN:
                raise InvalidArgument(f"a {role} token is shorter than {_MIN_TOKEN} characters: use a random one")
        self._roles = [(_digest(t), r) for t, r in tokens.items()]

    @classmethod
    def from_file(cls, path: Path) -> Authorizer:
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
        return cls(tokens)

    def require(self, metadata: Iterable[tuple[str, str | bytes]] | None, method: str) -> None:
        """Nothing for open methods; else Unauthenticated / PermissionDenied unless the call carries a
        token whose role may call `method`."""
        if method not in GUARDED:
            return
        token = ""
        for key, value in metadata or ():
            if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
                token = value.removeprefix("Bearer ").strip()
        if not token:
            raise Unauthenticated(f"{method} needs credentials: send `authorization: Bearer TOKEN` (--token-file)")
        digest = _digest(token)
        role = next((r for d, r in self._roles if hmac.compare_digest(d, digest)), None)
        if role is None:
            raise Unauthenticated(f"{method}: the token is not one this server knows")
        if method not in ROLES[role]:
            raise PermissionDenied(f"a {role} token may not call {method}")


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
