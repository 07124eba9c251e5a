"""Provenance: the publisher signs what a client relies on, so an edge run by another party cannot
forge a cache (a cache steers a model: a forged one is prompt injection no text filter sees).

Each block info is signed on its own (an Ed25519 signature over a *block statement*: the model
fingerprint, the block's key, position, sizes, codec and frame digests), so an edge can serve any
prefix of a document and the client checks every block it uses. A block's key is the hash of its
whole token prefix, so a statement never goes stale: the bytes of a key never change. Manifests are
signed whole (a *manifest statement*, with the time they were issued); a client remembers the highest
version it has seen of each document and refuses an older one offered as the latest (rollback). A
manifest answering "the latest" is signed afresh with a time it is valid until (the origin's
`--manifest-ttl`, as TUF's timestamp role): after it, the answer is refused, so an edge that replays
the latest it once saw cannot freeze a client that never saw the newer version for longer than that.

Clients and edges pin the publisher keys they trust (`--trust FILE`, `KVCDN_TRUST`, kvcdn.flags). Keys
are PEM files (`kvcdn keys generate`); a key id is the first 8 bytes, hex, of SHA-256 of the raw
public key. A public key file may carry an expiry (a line `Expires: 2027-01-31T00:00:00Z` before the
PEM block, written by `kvcdn keys generate --days N`): after it, nothing it signed is accepted and an
origin refuses to sign with it, so a key that leaked stops working by itself. Rotation is a new key
whose public half is added to the trust files before the origin signs with it; edges answer lookups
for blocks they hold under a key no longer trusted with the origin's fresh signatures (the bytes of a
key never change), so the old key can be dropped at once. Statement layouts: proto/kvcdn/v1/SPEC.md.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import re
import struct
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from kvcdn.errors import DigestMismatch, InvalidArgument
from kvcdn.v1 import kvcdn_pb2 as pb

__all__ = [
    "Signer",
    "TrustStore",
    "Untrusted",
    "block_statement",
    "generate_key",
    "key_id",
    "manifest_statement",
    "read_expiry",
    "statement_text",
    "utc_text",
]

log = logging.getLogger(__name__)

_BLOCK = b"kvcdn-block-v1\x00"
_EXPIRES = re.compile(rb"^Expires:(.*)$", re.MULTILINE)
_MANIFEST = b"kvcdn-manifest-v2\x00"
_PRICED_MANIFEST = b"kvcdn-manifest-v3\x00"


class Untrusted(DigestMismatch):
    """Data not signed by a trusted publisher (DATA_LOSS on the wire: the receiver fails over)."""


def statement_text(s: str) -> bytes:
    """A text in a signed statement: `u32 length | UTF-8` (the publisher's and the edges' alike)."""
    raw = s.encode("utf-8")
    return struct.pack("<I", len(raw)) + raw


def block_statement(fingerprint: bytes, info: pb.BlockInfo) -> bytes:
    """What a block signature covers: `"kvcdn-block-v1\\0" | fingerprint (32) | key (32) | u32 index |
    u32 n_tokens | u64 n_bytes | u64 raw_bytes | u32 len | codec (UTF-8, "" for raw) | u32 n | n frame
    digests (32 each)`, little-endian."""
    return b"".join(
        (
            _BLOCK,
            fingerprint,
            info.key,
            struct.pack("<IIQQ", info.index, info.n_tokens, info.n_bytes, info.raw_bytes),
            statement_text(info.codec if info.codec != "raw" else ""),
            struct.pack("<I", len(info.frame_digests)),
            *info.frame_digests,
        )
    )


def manifest_statement(manifest: pb.Manifest) -> bytes:
    """What a manifest signature covers: `"kvcdn-manifest-v2\\0" | text document | u32 version | text
    fingerprint (hex) | text content_digest | u32 token_count | u64 issued_at | u64 valid_until | u32 n |
    n block keys | u32 m | m texts codecs`, texts as `u32 length | UTF-8`. A priced manifest's starts
    `"kvcdn-manifest-v3\\0"` and ends `| u64 per_load | u64 per_token | text asset | text pay_to`, so a
    price can be neither stripped from a signed manifest nor added to one."""
    priced = manifest.HasField("price")
    price = manifest.price
    return b"".join(
        (
            _PRICED_MANIFEST if priced else _MANIFEST,
            statement_text(manifest.document),
            struct.pack("<I", manifest.version),
            statement_text(manifest.fingerprint),
            statement_text(manifest.content_digest),
            struct.pack("<IQQI", manifest.token_count, manifest.issued_at, manifest.valid_until, len(manifest.blocks)),
            *(b.key for b in manifest.blocks),
            struct.pack("<I", len(manifest.codecs)),
            *(statement_text(c) for c in manifest.codecs),
            *(_price_statement(price) if priced else ()),
        )
    )


def _price_statement(price: pb.Price) -> tuple[bytes, ...]:
    amounts = struct.pack("<QQ", price.per_load, price.per_token)
    return amounts, statement_text(price.asset), statement_text(price.pay_to)


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).digest()[:8].hex()


def utc_text(t: float) -> str:
    """`t` (seconds since the epoch) as `2027-01-31T00:00:00Z`."""
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def read_expiry(pem: bytes, path: Path) -> float | None:
    """The `Expires:` time of a public key file (seconds since the epoch), or None for none."""
    m = _EXPIRES.search(pem)
    if m is None:
        return None
    try:
        when = datetime.datetime.strptime(m.group(1).decode().strip(), "%Y-%m-%dT%H:%M:%SZ")
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgument(f"{path}: `Expires:` takes a UTC time such as 2027-01-31T00:00:00Z") from None
    return when.replace(tzinfo=datetime.UTC).timestamp()


def generate_key(private_path: Path, days: float = 0) -> tuple[Path, str]:
    """Write a new Ed25519 key to `private_path` (mode 0600) and its public half beside it (`.pub`,
    with an `Expires:` line `days` from now; 0: no expiry); returns the public file and the key id.
    Refuses to overwrite a key."""
    public_path = private_path.with_suffix(".pub")
    for p in (private_path, public_path):
        if p.exists():
            raise InvalidArgument(f"{p} exists: kvcdn never overwrites a key (move it away first)")
    private_path.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public = key.public_key()
    pem_public = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    expires = f"Expires: {utc_text(time.time() + days * 86400)}\n".encode() if days > 0 else b""
    public_path.write_bytes(expires + pem_public)
    return public_path, key_id(public)


class Signer:
    """The origin's publisher key: signs block infos and manifests."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.key_id = key_id(key.public_key())

    @property
    def key(self) -> Ed25519PrivateKey:
        """The private key (an edge signs its receipts with its own: kvcdn.spec.receipts)."""
        return self._key

    @classmethod
    def from_file(cls, path: Path) -> Signer:
        """The key in `path`; refused if its public half beside it (`.pub`) says it has expired."""
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise InvalidArgument(f"--signing-key {path}: not a readable PEM private key ({exc})") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise InvalidArgument(f"--signing-key {path} is not an Ed25519 key (make one: kvcdn keys generate)")
        public = path.with_suffix(".pub")
        expires = read_expiry(public.read_bytes(), public) if public.exists() else None
        if expires is not None and expires <= time.time():
            raise InvalidArgument(
                f"--signing-key {path} expired at {utc_text(expires)} ({public}): make a new key "
                "(kvcdn keys generate), add its .pub to every --trust list, and sign with it"
            )
        if expires is not None and expires - time.time() < 14 * 86400:
            log.warning("signing key %s expires at %s: rotate it soon", path, utc_text(expires))
        return cls(key)

    def sign_block(self, fingerprint: bytes, info: pb.BlockInfo) -> pb.BlockInfo:
        """A signed copy of `info`."""
        out = pb.BlockInfo()
        out.CopyFrom(info)
        out.signature = self._key.sign(block_statement(fingerprint, info))
        out.signer = self.key_id
        return out

    def sign_manifest(self, manifest: pb.Manifest, valid_s: float = 0) -> None:
        """Sign `manifest` in place (its `issued_at` must be set); with `valid_s`, as the latest version
        for that many seconds from now (`valid_until`), else for no time (`valid_until` 0)."""
        manifest.valid_until = int(time.time() + valid_s) if valid_s > 0 else 0
        manifest.signature = self._key.sign(manifest_statement(manifest))
        manifest.signer = self.key_id


class TrustStore:
    """The publisher keys a client or an edge trusts, and what it has already checked."""

    def __init__(self, keys: Iterable[Ed25519PublicKey], expires: dict[str, float] | None = None) -> None:
        self.keys = {key_id(k): k for k in keys}
        if not self.keys:
            raise InvalidArgument("a trust store needs at least one publisher key")
        self.expires = dict(expires or {})
        """Expiry (seconds since the epoch) of the keys that have one, by key id."""
        self._verified: set[bytes] = set()
        self._latest: dict[str, int] = {}
        """Highest manifest version seen per document (rollback protection)."""

    @classmethod
    def from_files(cls, paths: Sequence[Path]) -> TrustStore:
        keys, expires = [], {}
        for path in paths:
            try:
                pem = path.read_bytes()
                key = serialization.load_pem_public_key(pem[pem.find(b"-----BEGIN") :])
            except (OSError, ValueError) as exc:
                raise InvalidArgument(f"--trust {path}: not a readable PEM public key ({exc})") from None
            if not isinstance(key, Ed25519PublicKey):
                raise InvalidArgument(f"--trust {path} is not an Ed25519 public key (kvcdn keys generate makes one)")
            keys.append(key)
            if (when := read_expiry(pem, path)) is not None:
                expires[key_id(key)] = when
        return cls(keys, expires)

    def accepts(self, signer: str) -> bool:
        """Whether `signer` is a trusted key that has not expired."""
        return signer in self.keys and self.expires.get(signer, float("inf")) > time.time()

    def _check(self, what: str, signer: str, signature: bytes, statement: bytes, sender: str) -> None:
        key = self.keys.get(signer)
        if not signature or key is None:
            who = f"key {signer}" if signer else "no key"
            raise Untrusted(f"{sender} sent {what} signed by {who}, not by a trusted publisher")
        if not self.accepts(signer):
            raise Untrusted(
                f"{sender} sent {what} signed by key {signer}, which expired at {utc_text(self.expires[signer])}: "
                "the publisher has to sign with a new key"
            )
        digest = hashlib.sha256(signature + statement).digest()
        if digest in self._verified:
            return
        try:
            key.verify(signature, statement)
        except InvalidSignature:
            raise Untrusted(f"{sender} sent {what} whose signature does not match it (forged or altered)") from None
        if len(self._verified) > 1_000_000:
            self._verified.clear()
        self._verified.add(digest)

    def check_block(self, fingerprint: bytes, info: pb.BlockInfo, sender: str = "the server") -> None:
        """Untrusted unless `info` is signed by a trusted publisher for this model."""
        statement = block_statement(fingerprint, info)
        self._check(f"block {info.index} ({info.key.hex()[:16]}…)", info.signer, info.signature, statement, sender)

    def check_manifest(self, manifest: pb.Manifest, latest: bool, sender: str = "the server") -> None:
        """Untrusted unless `manifest` is signed by a trusted publisher and, when it was asked for as
        the latest version, is not older than a version of the document seen before and was signed
        as the latest for a time that has not passed (a replayed answer)."""
        what = f"manifest {manifest.document!r} v{manifest.version}"
        self._check(what, manifest.signer, manifest.signature, manifest_statement(manifest), sender)
        seen = self._latest.get(manifest.document, 0)
        if latest and manifest.version < seen:
            raise Untrusted(f"{sender} offered {what} as the latest, but v{seen} was seen before (a rollback)")
        if latest and manifest.valid_until <= time.time():
            when = f"until {utc_text(manifest.valid_until)}" if manifest.valid_until else "for no time"
            raise Untrusted(
                f"{sender} offered {what} as the latest, but the publisher vouched for that {when}: a stale "
                "answer (replayed, or this machine's clock is off)"
            )
        self._latest[manifest.document] = max(seen, manifest.version)
