"""Grants: what lets an agent load a priced document, checked by an edge offline.

A *grant* is a JWT (RFC 7519) signed by an issuer the edges trust, with JWS algorithm `Ed25519`
(EdDSA over Ed25519, as RFC 9864 names it; the key files are `kvcdn keys generate`'s). Its claims:

    iss    the issuer's key id (kvcdn.spec.provenance.key_id; also the header's `kid`)
    sub    the agent's account, charged in the ledger
    jti    the grant's id (receipts name it; edges refuse revoked ids)
    iat, nbf, exp
    cnf    {"jkt": RFC 7638 thumbprint of the agent's Ed25519 public key}: proof of possession (RFC 7800)
    scope  {"publishers": [...], "documents": [...], "models": [...]}: key ids, names, model fingerprints;
           an empty list allows any
    cap    {"amount": N, "asset": "USDC"}: the most the grant may be charged, in the asset's smallest unit

A grant alone is not enough: each use carries a *proof*, a JWT of type `kvcdn-pop+jwt` signed by the
agent's own key (its public half in the header's `jwk`, as DPoP does, RFC 9449) with `ath` (SHA-256 of
the grant, base64url), `aud` (the edge it is sent to), `req` (what is loaded), `iat` and a unique `jti`.
So a grant stolen without the agent's key is useless, and a proof cannot be replayed: not to another
edge, not for another load, not twice within its window, not after it.

Refusals are typed (kvcdn.errors): a grant or proof that is missing, forged, expired, revoked or made
with another key is UNAUTHENTICATED; one whose scope or asset does not cover the load is
PERMISSION_DENIED; one that the load would take over its cap is RESOURCE_EXHAUSTED. An edge tracks
what it charged each grant itself (offline): the cap holds per edge, and the ledger sees the total.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import OKPKey

from kvcdn.errors import InvalidArgument, LimitExceeded, PermissionDenied, Unauthenticated
from kvcdn.spec.prices import request_name
from kvcdn.spec.provenance import Signer, key_id
from kvcdn.v1 import kvcdn_pb2 as pb

__all__ = [
    "ALG",
    "Grant",
    "GrantChecker",
    "Scope",
    "Wallet",
    "issue_grant",
    "issue_revocation",
    "make_proof",
    "thumbprint",
]

ALG = "Ed25519"
_PROOF_TYPE = "kvcdn-pop+jwt"
_REVOCATION_TYPE = "kvcdn-revocation+jwt"


def thumbprint(public: Ed25519PublicKey) -> str:
    """RFC 7638 thumbprint (SHA-256, base64url) of an Ed25519 public key as a JWK."""
    return str(OKPKey.import_key(public).thumbprint())


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(frozen=True)
class Scope:
    """What a grant covers; an empty tuple allows any."""

    publishers: tuple[str, ...] = ()
    documents: tuple[str, ...] = ()
    models: tuple[str, ...] = ()

    def refusal(self, publisher: str, document: str, model: str) -> str:
        """Why the scope does not cover the load ("" when it does)."""
        for what, allowed, value in (
            ("publisher", self.publishers, publisher),
            ("document", self.documents, document),
            ("model", self.models, model),
        ):
            if allowed and value not in allowed:
                return f"the grant does not cover {what} {value!r} (it covers {', '.join(allowed)})"
        return ""


@dataclass(frozen=True)
class Grant:
    """A grant that checked out."""

    id: str
    agent: str
    issuer: str
    expires: float
    scope: Scope
    cap: int
    asset: str


def issue_grant(
    issuer: Ed25519PrivateKey,
    agent_key: Ed25519PublicKey,
    agent: str,
    scope: Scope,
    cap: int,
    asset: str,
    ttl_s: float = 3600.0,
    grant_id: str = "",
    now: float | None = None,
) -> str:
    """A grant (compact JWS) for `agent`, bound to `agent_key`, valid `ttl_s` from `now`."""
    t = int(time.time() if now is None else now)
    kid = key_id(issuer.public_key())
    claims = {
        "iss": kid,
        "sub": agent,
        "jti": grant_id or secrets.token_hex(16),
        "iat": t,
        "nbf": t,
        "exp": t + int(ttl_s),
        "cnf": {"jkt": thumbprint(agent_key)},
        "scope": {
            "publishers": list(scope.publishers),
            "documents": list(scope.documents),
            "models": list(scope.models),
        },
        "cap": {"amount": cap, "asset": asset},
    }
    return str(jwt.encode({"alg": ALG, "typ": "JWT", "kid": kid}, claims, OKPKey.import_key(issuer), algorithms=[ALG]))


def issue_revocation(issuer: Ed25519PrivateKey, grant_ids: Iterable[str], now: float | None = None) -> str:
    """A revocation list signed by `issuer`: edges that trust it refuse those of its grants from the
    moment it reaches them (the origin relays it in its invalidation feed: `kvcdn keys revoke`)."""
    kid = key_id(issuer.public_key())
    claims = {"iss": kid, "iat": int(time.time() if now is None else now), "revoked": sorted(set(grant_ids))}
    header = {"alg": ALG, "typ": _REVOCATION_TYPE, "kid": kid}
    return str(jwt.encode(header, claims, OKPKey.import_key(issuer), algorithms=[ALG]))


def make_proof(agent_key: Ed25519PrivateKey, grant: str, audience: str, request: str, now: float | None = None) -> str:
    """A proof that the holder of `agent_key` uses `grant` for `request` at the edge `audience`."""
    key = OKPKey.import_key(agent_key)
    claims = {
        "ath": _b64(hashlib.sha256(grant.encode()).digest()),
        "aud": audience,
        "req": request,
        "iat": int(time.time() if now is None else now),
        "jti": secrets.token_hex(16),
    }
    header = {"alg": ALG, "typ": _PROOF_TYPE, "jwk": key.as_dict(private=False)}
    return str(jwt.encode(header, claims, key, algorithms=[ALG]))


@dataclass(frozen=True)
class Wallet:
    """What an agent pays for priced loads with: its grant and the key the grant is bound to."""

    grant: str
    key: Ed25519PrivateKey

    @classmethod
    def from_files(cls, grant: Path, key: Path) -> Wallet:
        """The grant in `grant` (its compact JWS, as issued) and the agent's key in `key` (`kvcdn keys generate`)."""
        try:
            token = grant.read_text().strip()
        except OSError as exc:
            raise InvalidArgument(f"cannot read the grant {grant}: {exc.strerror}") from None
        return cls(token, Signer.from_file(key).key)

    def load(self, document: str, version: int, audience: str, idempotency_key: str) -> pb.Load:
        """A request's Load: the grant and a fresh proof for `audience` (the edge asked)."""
        request = request_name(document, version, idempotency_key)
        proof = make_proof(self.key, self.grant, audience, request)
        return pb.Load(
            document=document, version=version, grant=self.grant, proof=proof, idempotency_key=idempotency_key
        )


def _num(claims: Mapping[str, object], name: str) -> float:
    value = claims.get(name, 0)
    return float(value) if isinstance(value, int | float) else 0.0


def _part(claims: Mapping[str, object], name: str) -> dict[str, object]:
    value = claims.get(name)
    return value if isinstance(value, dict) else {}


def _names(value: object) -> tuple[str, ...]:
    return tuple(str(v) for v in value) if isinstance(value, list) else ()


def _unverified_header(token: str) -> dict[str, object]:
    try:
        head = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    except (ValueError, IndexError):
        head = None
    if not isinstance(head, dict):
        raise Unauthenticated("the grant or proof is not a compact JWS")
    return head


class GrantChecker:
    """An edge's check of grants and proofs, offline: the issuers it trusts, the ids revoked (pushed
    to it), the proofs seen lately (no replay), and what each grant was charged here."""

    def __init__(
        self,
        issuers: Iterable[Ed25519PublicKey],
        audience: str,
        skew_s: float = 60.0,
        proof_window_s: float = 300.0,
    ) -> None:
        self.issuers = {key_id(k): OKPKey.import_key(k) for k in issuers}
        self.audience = audience
        self.skew_s = skew_s
        self.proof_window_s = proof_window_s
        self.revoked: set[str] = set()
        self.spent: dict[str, int] = {}
        """What this edge charged each grant, by grant id."""
        self._seen: OrderedDict[str, float] = OrderedDict()
        """Proof ids seen, with when they stop being acceptable anyway."""

    def revoke(self, grant_ids: Iterable[str]) -> None:
        """Refuse these grant ids, whoever issued them (an operator's list: `kvcdn edge --revocations`)."""
        self.revoked.update(grant_ids)

    def revoke_signed(self, revocation: str) -> list[str]:
        """Refuse the grants a revocation list (`issue_revocation`) names, of the issuer that signed it;
        returns their ids. Unauthenticated for a list no trusted issuer signed."""
        head = _unverified_header(revocation)
        issuer = self.issuers.get(str(head.get("kid", "")))
        if head.get("typ") != _REVOCATION_TYPE or issuer is None:
            raise Unauthenticated("the revocation list is not signed by a grant issuer this edge trusts")
        claims = self._decode(revocation, issuer, "revocation list")
        ids = _names(claims.get("revoked"))
        self.revoked.update(f"{claims.get('iss')}:{gid}" for gid in ids)
        return list(ids)

    def _decode(self, token: str, key: OKPKey, what: str) -> Mapping[str, object]:
        try:
            return dict(jwt.decode(token, key, algorithms=[ALG]).claims)
        except (JoseError, ValueError) as exc:
            raise Unauthenticated(f"the {what} does not verify ({exc}): forged or altered") from None

    def check(
        self,
        grant: str,
        proof: str,
        *,
        publisher: str,
        document: str,
        model: str,
        request: str,
        price: int,
        asset: str,
        now: float | None = None,
    ) -> Grant:
        """The grant, if it and the proof let this load happen at `price`; charges it here. Raises
        Unauthenticated, PermissionDenied or LimitExceeded (see the module docstring)."""
        t = time.time() if now is None else now
        if not grant or not proof:
            raise Unauthenticated("this document is priced: present a grant and a proof of its key")
        issuer = self.issuers.get(str(_unverified_header(grant).get("kid", "")))
        if issuer is None:
            raise Unauthenticated("the grant's issuer is not one this edge trusts")
        claims = self._decode(grant, issuer, "grant")
        gid = str(claims.get("jti", ""))
        if not _num(claims, "nbf") - self.skew_s <= t < _num(claims, "exp") + self.skew_s:
            raise Unauthenticated(f"grant {gid} is expired or not yet valid: ask its issuer for a new one")
        if gid in self.revoked or f"{claims.get('iss')}:{gid}" in self.revoked:
            raise Unauthenticated(f"grant {gid} was revoked by its issuer")
        self._check_proof(grant, proof, claims, request, t)
        scope_claim, cap_claim = _part(claims, "scope"), _part(claims, "cap")
        scope = Scope(*(_names(scope_claim.get(k)) for k in ("publishers", "documents", "models")))
        why = scope.refusal(publisher, document, model)
        if why:
            raise PermissionDenied(f"grant {gid}: {why}")
        cap, cap_asset = int(_num(cap_claim, "amount")), str(cap_claim.get("asset", ""))
        if price and cap_asset != asset:
            raise PermissionDenied(f"grant {gid} pays in {cap_asset or 'nothing'}, this document is priced in {asset}")
        if self.spent.get(gid, 0) + price > cap:
            left = cap - self.spent.get(gid, 0)
            raise LimitExceeded(f"grant {gid} has {left} {cap_asset} left of its cap of {cap}; this load costs {price}")
        self.spent[gid] = self.spent.get(gid, 0) + price
        agent, issuer_id = str(claims.get("sub", "")), str(claims.get("iss", ""))
        return Grant(gid, agent, issuer_id, _num(claims, "exp"), scope, cap, cap_asset)

    def _check_proof(self, grant: str, proof: str, claims: Mapping[str, object], request: str, t: float) -> None:
        head = _unverified_header(proof)
        if head.get("typ") != _PROOF_TYPE or not isinstance(head.get("jwk"), dict):
            raise Unauthenticated(f"the proof is not a {_PROOF_TYPE} with the agent's key in its header")
        try:
            key = OKPKey.import_key(head["jwk"])  # type: ignore[arg-type]
        except (JoseError, ValueError, KeyError, TypeError):
            raise Unauthenticated("the proof's key is not an Ed25519 JWK") from None
        if key.thumbprint() != _part(claims, "cnf").get("jkt"):
            raise Unauthenticated("the proof is not made with the key the grant is bound to: the grant is not yours")
        p = self._decode(proof, key, "proof")
        if p.get("ath") != _b64(hashlib.sha256(grant.encode()).digest()):
            raise Unauthenticated("the proof is for another grant")
        if p.get("aud") != self.audience or p.get("req") != request:
            raise Unauthenticated("the proof is for another edge or another load")
        issued = _num(p, "iat")
        if not t - self.proof_window_s <= issued <= t + self.skew_s:
            raise Unauthenticated("the proof is too old (or from the future): make a new one for each load")
        while self._seen and next(iter(self._seen.values())) < t:
            self._seen.popitem(last=False)
        jti = str(p.get("jti", ""))
        if not jti or jti in self._seen:
            raise Unauthenticated("the proof was used before: make a new one for each load")
        self._seen[jti] = issued + self.proof_window_s + self.skew_s
