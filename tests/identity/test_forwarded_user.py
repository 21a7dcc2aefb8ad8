"""Forwarded end users: signed by the forwarding service's own key, which its mesh identity
token binds (cnf); refused when anything about them does not hold."""

from __future__ import annotations

import time
from typing import Any

import pytest
from joserfc import jwt
from joserfc.jwk import OKPKey

from mesh_middleware import TokenIssuer
from mesh_middleware.errors import IdentityError
from mesh_middleware.identity.end_user import EndUser
from mesh_middleware.identity.forwarded_user import (
    ForwardedUserVerifier,
    UserForwarder,
    confirmation_key,
)
from mesh_middleware.identity.keys import KeyStore, parse_jwks
from mesh_middleware.identity.verifier import CallerIdentity, TokenVerifier
from mesh_middleware.inbound.engine import InboundEngine
from mesh_middleware.policy.compiled import compile_policy_text

GATEWAY = "spiffe://mesh.local/svc/gateway"
ORDERS = "spiffe://mesh.local/svc/orders"

ALICE = EndUser(
    issuer="https://idp.example.com",
    subject="alice",
    claims={"groups": ["admin"], "email": "a@x", "ssn": "123"},
    expires_at=time.time() + 600,
)


def _caller(forwarder: UserForwarder, service: str = "gateway") -> CallerIdentity:
    return CallerIdentity(
        service=service,
        spiffe_id=f"spiffe://mesh.local/svc/{service}",
        trust_domain="mesh.local",
        expires_at=time.time() + 600,
        confirmation=forwarder.public_jwk["x"],
    )


def _reason(assertion: str, caller: CallerIdentity, audience: str = ORDERS) -> str:
    with pytest.raises(IdentityError) as caught:
        ForwardedUserVerifier().verify(assertion, caller, audience)
    return caught.value.reason


def test_a_forwarded_user_verifies_with_the_key_the_caller_token_binds() -> None:
    forwarder = UserForwarder()
    assertion = forwarder.assertion(ALICE, forwarder=GATEWAY, audience=ORDERS, claims=["groups"])
    user = ForwardedUserVerifier().verify(assertion, _caller(forwarder), ORDERS)
    assert user.principal == ALICE.principal
    assert user.forwarded_by == "gateway"
    assert dict(user.claims) == {"groups": ["admin"], "iss": ALICE.issuer, "sub": "alice"}
    assert user.expires_at <= ALICE.expires_at


def test_assertions_are_cached_per_user_and_destination() -> None:
    forwarder = UserForwarder()
    one = forwarder.assertion(ALICE, forwarder=GATEWAY, audience=ORDERS)
    assert forwarder.assertion(ALICE, forwarder=GATEWAY, audience=ORDERS) is one
    other = forwarder.assertion(ALICE, forwarder=GATEWAY, audience="spiffe://mesh.local/svc/x")
    assert other != one


def test_another_services_key_does_not_verify() -> None:
    """An assertion signed by any key but the one the caller's token binds is refused."""
    assertion = UserForwarder().assertion(ALICE, forwarder=GATEWAY, audience=ORDERS)
    assert _reason(assertion, _caller(UserForwarder())) == "forwarded end user signature is invalid"


def test_a_caller_token_that_binds_no_key() -> None:
    forwarder = UserForwarder()
    assertion = forwarder.assertion(ALICE, forwarder=GATEWAY, audience=ORDERS)
    caller = CallerIdentity("gateway", GATEWAY, "mesh.local", time.time() + 60)
    assert "binds no key" in _reason(assertion, caller)


def test_for_another_service_or_from_another_forwarder() -> None:
    forwarder = UserForwarder()
    elsewhere = forwarder.assertion(ALICE, forwarder=GATEWAY, audience="spiffe://mesh.local/svc/x")
    assert _reason(elsewhere, _caller(forwarder)) == "forwarded end user is not for this service"
    # Replayed by another service that happens to hold the same key: the issuer is checked.
    assert _reason(
        forwarder.assertion(ALICE, forwarder=GATEWAY, audience=ORDERS), _caller(forwarder, "web")
    ) == ("forwarded end user is not for this service")


def test_an_expired_user_is_not_forwarded_nor_taken() -> None:
    forwarder = UserForwarder()
    gone = EndUser("https://idp", "old", {}, time.time() - 1)
    with pytest.raises(IdentityError):
        forwarder.assertion(gone, forwarder=GATEWAY, audience=ORDERS)
    past = UserForwarder(key=forwarder.key, clock=lambda: time.time() - 3600)
    stale = past.assertion(
        EndUser("https://idp", "old", {}, time.time() - 3000), forwarder=GATEWAY, audience=ORDERS
    )
    assert _reason(stale, _caller(forwarder)) == "forwarded end user expired"


def _signed(key: OKPKey, header: dict[str, Any], payload: dict[str, Any]) -> str:
    return jwt.encode(header, payload, key, algorithms=[header["alg"]])


def test_a_plain_jwt_is_not_a_forwarded_user() -> None:
    """The assertion's type is checked, so no other token signed by that key passes for one."""
    forwarder = UserForwarder()
    now = int(time.time())
    payload = {"iss": GATEWAY, "aud": ORDERS, "exp": now + 60, "user": {"iss": "i", "sub": "s"}}
    token = _signed(forwarder.key, {"alg": "Ed25519"}, payload)
    assert _reason(token, _caller(forwarder)) == "forwarded end user is not a mesh user assertion"


def test_alg_none_and_garbage_are_refused() -> None:
    forwarder = UserForwarder()
    for token in ("eyJhbGciOiJub25lIn0.e30.", "garbage", "a.b.c", "x" * 20_000):
        assert _reason(token, _caller(forwarder))


def test_confirmation_keys_are_public_ed25519_only() -> None:
    private = OKPKey.generate_key("Ed25519")
    assert confirmation_key(private.as_dict(private=False))["kty"] == "OKP"
    with pytest.raises(ValueError, match="'d' is not allowed"):
        confirmation_key(private.as_dict(private=True))
    with pytest.raises(ValueError, match="is an Ed25519 public key"):
        confirmation_key({"kty": "EC", "crv": "P-256", "x": "a", "y": "b"})
    with pytest.raises(ValueError, match="needs its 'x'"):
        confirmation_key({"kty": "OKP", "crv": "Ed25519", "x": "short"})


def test_the_identity_token_carries_the_confirmation_key() -> None:
    """What the registry mints with `cnf` is read back by the verifier as the caller's key."""
    issuer = TokenIssuer()
    forwarder = UserForwarder()
    token = issuer.mint("gateway", "orders", extra_claims={"cnf": {"jwk": forwarder.public_jwk}})
    verifier = TokenVerifier(KeyStore(keys=parse_jwks(issuer.jwks())))
    caller = verifier.verify(token, ORDERS)
    assert caller.confirmation == forwarder.public_jwk["x"]


POLICY = """\
service: orders
inbound:
  authentication: strict
  end_users:
    issuers: [{issuer: "https://idp.example.com", jwks: '{"keys": []}'}]
    forwarded_from: [gateway]
  authorization:
    rules:
      - {name: admins, action: allow, claims: {groups: admin}}
"""


def _engine(issuer: TokenIssuer) -> InboundEngine:
    compiled = compile_policy_text(POLICY)
    verifier = TokenVerifier(KeyStore(keys=parse_jwks(issuer.jwks())))
    return InboundEngine(lambda: (compiled, ORDERS), verifier)


def test_the_engine_takes_forwarded_users_only_from_trusted_callers() -> None:
    """Trusted forwarder: its user decides. Another caller: the header is ignored (anonymous).
    A trusted forwarder with a bad assertion: 401."""
    issuer = TokenIssuer()
    engine = _engine(issuer)
    forwarder = UserForwarder()
    bound = {"cnf": {"jwk": forwarder.public_jwk}}
    for service, expected in (("gateway", None), ("web", 403)):
        svid = issuer.mint(service, "orders", extra_claims=bound)
        assertion = forwarder.assertion(
            ALICE,
            forwarder=f"spiffe://mesh.local/svc/{service}",
            audience=ORDERS,
            claims=["groups"],
        )
        admission = engine.admit("GET", "/x", svid, {"x-mesh-user": assertion})
        assert admission.status == expected, admission
        if expected is None:
            assert admission.user is not None and admission.user.forwarded_by == "gateway"
    svid = issuer.mint("gateway", "orders", extra_claims=bound)
    other = UserForwarder().assertion(ALICE, forwarder=GATEWAY, audience=ORDERS)
    refused = engine.admit("GET", "/x", svid, {"x-mesh-user": other})
    assert refused.status == 401 and b"signature is invalid" in refused.body
