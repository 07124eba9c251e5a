"""Grants and their proofs (kvcdn.spec.grants): a grant with a fresh proof of the agent's key loads
and is charged; expired, forged, revoked, wrong-scope and over-cap grants are refused with their
status; a stolen grant without the agent's key is useless, and a proof is good for one load at one
edge, once."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kvcdn.errors import LimitExceeded, PermissionDenied, Unauthenticated
from kvcdn.spec.grants import GrantChecker, Scope, issue_grant, make_proof

EDGE = "edge0.example:7080"
NOW = 1_800_000_000.0
LOAD = {"publisher": "pub1", "document": "handbook", "model": "fp1", "price": 40, "asset": "USDC"}


@pytest.fixture
def parties() -> tuple[Ed25519PrivateKey, Ed25519PrivateKey, GrantChecker]:
    issuer, agent = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    return issuer, agent, GrantChecker([issuer.public_key()], EDGE)


def _grant(issuer: Ed25519PrivateKey, agent: Ed25519PrivateKey, **kw: object) -> str:
    args: dict[str, object] = {"scope": Scope(publishers=("pub1",)), "cap": 100, "asset": "USDC", "now": NOW}
    args.update(kw)
    return issue_grant(issuer, agent.public_key(), "agent-7", **args)  # type: ignore[arg-type]


def _check(checker: GrantChecker, grant: str, proof: str, now: float = NOW, **load: object) -> object:
    return checker.check(grant, proof, **{**LOAD, "request": "handbook@1", **load}, now=now)  # type: ignore[arg-type]


def test_a_grant_with_a_fresh_proof_loads_and_is_charged_up_to_its_cap(
    parties: tuple[Ed25519PrivateKey, Ed25519PrivateKey, GrantChecker],
) -> None:
    issuer, agent, checker = parties
    grant = _grant(issuer, agent, grant_id="g1")
    first = _check(checker, grant, make_proof(agent, grant, EDGE, "handbook@1", now=NOW))
    assert first.id == "g1" and first.agent == "agent-7" and first.cap == 100  # type: ignore[attr-defined]
    _check(checker, grant, make_proof(agent, grant, EDGE, "handbook@1", now=NOW + 1), now=NOW + 1)
    assert checker.spent == {"g1": 80}
    with pytest.raises(LimitExceeded, match="20 USDC left of its cap of 100"):  # RESOURCE_EXHAUSTED
        _check(checker, grant, make_proof(agent, grant, EDGE, "handbook@1", now=NOW + 2), now=NOW + 2)
    assert checker.spent == {"g1": 80}  # a refused load is not charged


def test_expired_forged_and_revoked_grants_are_unauthenticated(
    parties: tuple[Ed25519PrivateKey, Ed25519PrivateKey, GrantChecker],
) -> None:
    issuer, agent, checker = parties
    old = _grant(issuer, agent, ttl_s=600, now=NOW - 3600)
    with pytest.raises(Unauthenticated, match="expired"):
        _check(checker, old, make_proof(agent, old, EDGE, "handbook@1", now=NOW))
    stranger = _grant(Ed25519PrivateKey.generate(), agent)  # signed by an issuer nobody trusts
    with pytest.raises(Unauthenticated, match="issuer is not one this edge trusts"):
        _check(checker, stranger, make_proof(agent, stranger, EDGE, "handbook@1", now=NOW))
    good = _grant(issuer, agent, grant_id="g2")
    head, _, signature = good.split(".")
    forged = f"{head}.{_grant(issuer, agent, cap=10**9).split('.')[1]}.{signature}"  # a bigger cap, old signature
    with pytest.raises(Unauthenticated, match="forged or altered"):
        _check(checker, forged, make_proof(agent, forged, EDGE, "handbook@1", now=NOW))
    checker.revoke(["g2"])
    with pytest.raises(Unauthenticated, match="revoked"):
        _check(checker, good, make_proof(agent, good, EDGE, "handbook@1", now=NOW))
    with pytest.raises(Unauthenticated, match="present a grant"):
        _check(checker, "", "")
    with pytest.raises(Unauthenticated, match="not a compact JWS"):
        _check(checker, "garbage", "garbage")


def test_a_grant_covers_only_its_scope_and_asset(
    parties: tuple[Ed25519PrivateKey, Ed25519PrivateKey, GrantChecker],
) -> None:
    issuer, agent, checker = parties
    grant = _grant(issuer, agent, scope=Scope(publishers=("pub1",), documents=("handbook",), models=("fp1",)))

    def load(**kw: object) -> object:
        return _check(checker, grant, make_proof(agent, grant, EDGE, "handbook@1", now=NOW), **kw)

    for field, value in (("publisher", "pub2"), ("document", "secrets"), ("model", "fp9")):
        with pytest.raises(PermissionDenied, match=f"does not cover {field} '{value}'"):
            load(**{field: value})
    with pytest.raises(PermissionDenied, match="pays in USDC, this document is priced in EURC"):
        load(asset="EURC")
    load()  # in scope
    assert checker.spent == {next(iter(checker.spent)): 40}


def test_a_stolen_grant_is_useless_and_a_proof_serves_one_load_at_one_edge_once(
    parties: tuple[Ed25519PrivateKey, Ed25519PrivateKey, GrantChecker],
) -> None:
    issuer, agent, checker = parties
    grant = _grant(issuer, agent)
    thief = Ed25519PrivateKey.generate()
    with pytest.raises(Unauthenticated, match="not made with the key the grant is bound to"):
        _check(checker, grant, make_proof(thief, grant, EDGE, "handbook@1", now=NOW))
    proof = make_proof(agent, grant, EDGE, "handbook@1", now=NOW)
    _check(checker, grant, proof)
    with pytest.raises(Unauthenticated, match="used before"):  # replayed by whoever saw it
        _check(checker, grant, proof)
    with pytest.raises(Unauthenticated, match="another edge or another load"):
        _check(checker, grant, make_proof(agent, grant, "edge1.example:7080", "handbook@1", now=NOW))
    with pytest.raises(Unauthenticated, match="another edge or another load"):
        _check(checker, grant, make_proof(agent, grant, EDGE, "handbook@2", now=NOW))
    other = _grant(issuer, agent)
    with pytest.raises(Unauthenticated, match="for another grant"):
        _check(checker, grant, make_proof(agent, other, EDGE, "handbook@1", now=NOW))
    with pytest.raises(Unauthenticated, match="too old"):
        _check(checker, grant, make_proof(agent, grant, EDGE, "handbook@1", now=NOW - 3600))
    assert sum(checker.spent.values()) == 40  # only the one good load was charged
