"""JWT-SVIDs are verified locally; every malformed, forged or misdirected token is refused."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import pytest
from joserfc import jwt
from joserfc.jwk import OKPKey

from mesh_middleware import IdentityError, TokenIssuer, UnknownSigningKey
from mesh_middleware.identity.keys import KeyStore, parse_jwks
from mesh_middleware.identity.verifier import TokenVerifier

AUDIENCE = "spiffe://mesh.local/svc/inventory"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _segment(document: dict[str, Any]) -> str:
    return _b64(json.dumps(document).encode())


def _claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": "spiffe://mesh.local",
        "sub": "spiffe://mesh.local/svc/orders",
        "aud": [AUDIENCE],
        "iat": now,
        "exp": now + 600,
        "jti": "j1",
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def _verifier(issuer: TokenIssuer, **options: Any) -> TokenVerifier:
    return TokenVerifier(KeyStore(keys=parse_jwks(issuer.jwks())), **options)


def _reason(verifier: TokenVerifier, token: str) -> str:
    with pytest.raises(IdentityError) as caught:
        verifier.verify(token, AUDIENCE)
    return caught.value.reason


def _signed(issuer: TokenIssuer, header: dict[str, Any], claims: dict[str, Any]) -> str:
    return jwt.encode(header, claims, issuer.key, algorithms=[header["alg"]])


def test_a_valid_token_gives_the_caller(issuer: TokenIssuer) -> None:
    """A token minted for this audience names the calling service."""
    identity = _verifier(issuer).verify(issuer.mint("orders", "inventory"), AUDIENCE)
    assert identity.service == "orders"
    assert identity.spiffe_id == "spiffe://mesh.local/svc/orders"
    assert identity.trust_domain == "mesh.local"


def test_a_token_under_the_older_eddsa_name_is_accepted(issuer: TokenIssuer) -> None:
    """`alg: EdDSA` with an Ed25519 key is the same algorithm and verifies."""
    header = {"alg": "EdDSA", "kid": issuer.kid}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        token = _signed(issuer, header, _claims())
    assert _verifier(issuer).verify(token, AUDIENCE).service == "orders"


def test_forged_signature(issuer: TokenIssuer) -> None:
    """A token signed by another key under our kid fails the signature check."""
    forger = TokenIssuer()
    header = {"alg": "Ed25519", "kid": issuer.kid}
    token = jwt.encode(header, _claims(), forger.key, algorithms=["Ed25519"])
    assert _reason(_verifier(issuer), token) == "identity token signature is invalid"


def test_tampered_payload(issuer: TokenIssuer) -> None:
    """Changing the claims after signing breaks the signature."""
    head, _, sig = issuer.mint("orders", "inventory").split(".")
    payload = _segment(_claims(sub="spiffe://mesh.local/svc/admin"))
    assert (
        _reason(_verifier(issuer), f"{head}.{payload}.{sig}")
        == "identity token signature is invalid"
    )


def test_expired(issuer: TokenIssuer) -> None:
    """A token past exp (beyond the leeway) is refused."""
    token = issuer.mint("orders", "inventory", now=time.time() - 3600)
    assert _reason(_verifier(issuer), token) == "identity token expired"


def test_expiry_is_checked_again_on_a_cache_hit(issuer: TokenIssuer) -> None:
    """A cached token stops working when it expires."""
    clock = [time.time()]
    verifier = TokenVerifier(
        KeyStore(keys=parse_jwks(issuer.jwks())), clock=lambda: clock[0], leeway=0
    )
    token = issuer.mint("orders", "inventory", lifetime=60, now=clock[0])
    verifier.verify(token, AUDIENCE)
    clock[0] += 61
    assert _reason(verifier, token) == "identity token expired"


def test_not_yet_valid(issuer: TokenIssuer) -> None:
    """A token whose nbf or iat lies in the future is refused."""
    later = int(time.time()) + 3600
    verifier = _verifier(issuer)
    header = {"alg": "Ed25519", "kid": issuer.kid}
    assert (
        _reason(verifier, _signed(issuer, header, _claims(nbf=later)))
        == "identity token is not valid yet"
    )
    assert (
        _reason(verifier, _signed(issuer, header, _claims(iat=later)))
        == "identity token is not valid yet"
    )


def test_wrong_audience(issuer: TokenIssuer) -> None:
    """A token for another service cannot be replayed here."""
    token = issuer.mint("orders", "payments")
    assert _reason(_verifier(issuer), token) == "identity token is for another audience"


def test_wrong_audience_is_refused_from_the_cache_too(issuer: TokenIssuer) -> None:
    """A token verified for one audience is not accepted for another from the cache."""
    verifier = _verifier(issuer)
    token = issuer.mint("orders", "payments")
    verifier.verify(token, "spiffe://mesh.local/svc/payments")
    assert _reason(verifier, token) == "identity token is for another audience"


def test_wrong_issuer(issuer: TokenIssuer) -> None:
    """Only tokens from the trust domain's issuer count."""
    other = TokenIssuer(issuer.key, issuer="https://evil.example")
    assert (
        _reason(_verifier(issuer), other.mint("orders", "inventory"))
        == "identity token issuer is not trusted"
    )


def test_other_trust_domain(issuer: TokenIssuer) -> None:
    """A subject from another trust domain is refused even when signed by our key."""
    header = {"alg": "Ed25519", "kid": issuer.kid}
    token = _signed(issuer, header, _claims(sub="spiffe://evil.org/svc/orders"))
    assert _reason(_verifier(issuer), token) == "identity token is from another trust domain"


def test_subject_must_be_a_service_id(issuer: TokenIssuer) -> None:
    """`sub` must be spiffe://<td>/svc/<service>."""
    header = {"alg": "Ed25519", "kid": issuer.kid}
    token = _signed(issuer, header, _claims(sub="orders"))
    assert "SPIFFE ID" in _reason(_verifier(issuer), token)


@pytest.mark.parametrize("missing", ["exp", "sub", "aud", "iss"])
def test_essential_claims(issuer: TokenIssuer, missing: str) -> None:
    """exp, sub, aud and iss are all required."""
    header = {"alg": "Ed25519", "kid": issuer.kid}
    token = _signed(issuer, header, _claims(**{missing: None}))
    assert "lacks required claims" in _reason(_verifier(issuer), token)


def test_alg_none(issuer: TokenIssuer) -> None:
    """Unsigned tokens are refused, with or without a trailing signature segment."""
    verifier = _verifier(issuer)
    head = _segment({"alg": "none", "kid": issuer.kid})
    body = _segment(_claims())
    assert _reason(verifier, f"{head}.{body}.") == "identity token is not a compact JWS"
    assert (
        _reason(verifier, f"{head}.{body}.c2ln")
        == "identity token algorithm 'none' is not accepted"
    )


def test_hs256_signed_with_the_public_key(issuer: TokenIssuer) -> None:
    """The classic key-confusion attack: HMAC keyed with the public key bytes is refused."""
    public = issuer.jwks()["keys"][0]
    secret = base64.urlsafe_b64decode(public["x"] + "==")
    head = _segment({"alg": "HS256", "kid": issuer.kid, "typ": "JWT"})
    body = _segment(_claims())
    sig = _b64(hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest())
    assert (
        _reason(_verifier(issuer), f"{head}.{body}.{sig}")
        == "identity token algorithm 'HS256' is not accepted"
    )


@pytest.mark.parametrize("param", ["jwk", "jku", "x5u", "x5c", "crit"])
def test_embedded_key_parameters_are_refused(issuer: TokenIssuer, param: str) -> None:
    """A token may not bring or point at its own key."""
    attacker = OKPKey.generate_key("Ed25519")
    values: dict[str, Any] = {
        "jwk": attacker.as_dict(private=False),
        "jku": "http://127.0.0.1:1/jwks",
        "x5u": "http://127.0.0.1:1/cert",
        "x5c": ["MIIB"],
        "crit": ["exp"],
    }
    head = _segment({"alg": "Ed25519", "kid": issuer.kid, param: values[param]})
    body = _segment(_claims())
    reason = _reason(_verifier(issuer), f"{head}.{body}.c2ln")
    assert reason == f"identity token header may not carry ['{param}']"


def test_unknown_kid(issuer: TokenIssuer) -> None:
    """A token from an unknown key raises UnknownSigningKey (401 unless a refetch finds it)."""
    stranger = TokenIssuer()
    with pytest.raises(UnknownSigningKey) as caught:
        _verifier(issuer).verify(stranger.mint("orders", "inventory"), AUDIENCE)
    assert caught.value.kid == stranger.kid


@pytest.mark.parametrize(
    "token",
    ["", "garbage", "a.b", "a.b.c.d", "...", "!!!.e30.c2ln", "e30.e30.c2ln", "W10.e30.c2ln"],
)
def test_garbage(issuer: TokenIssuer, token: str) -> None:
    """Anything that is not a JWS is refused with a reason, never an unexpected exception."""
    assert _reason(_verifier(issuer), token)


def test_truncated(issuer: TokenIssuer) -> None:
    """Every truncation of a valid token is refused."""
    verifier = _verifier(issuer)
    token = issuer.mint("orders", "inventory")
    for cut in range(0, len(token), 7):
        with pytest.raises(IdentityError):
            verifier.verify(token[:cut], AUDIENCE)


def test_oversized(issuer: TokenIssuer) -> None:
    """A huge header is refused before parsing."""
    assert _reason(_verifier(issuer), "a" * 9000) == "identity token is too large"


def test_the_cache_is_bounded(issuer: TokenIssuer) -> None:
    """The verified-token cache never holds more than its size."""
    verifier = _verifier(issuer, cache_size=5)
    for _ in range(20):
        verifier.verify(issuer.mint("orders", "inventory"), AUDIENCE)
    assert len(verifier._cache) == 5


def test_a_key_set_change_drops_cached_verifications(issuer: TokenIssuer) -> None:
    """When a key is withdrawn from the JWKS, tokens it signed stop verifying at once."""
    store = KeyStore(keys=parse_jwks(issuer.jwks()))
    verifier = TokenVerifier(store)
    token = issuer.mint("orders", "inventory")
    verifier.verify(token, AUDIENCE)
    store.replace(parse_jwks(TokenIssuer().jwks()))
    with pytest.raises(UnknownSigningKey):
        verifier.verify(token, AUDIENCE)


def test_a_token_valid_for_too_long_is_refused(issuer: TokenIssuer) -> None:
    """A token whose exp lies more than a day ahead is refused, however well signed."""
    token = issuer.mint("orders", "inventory", lifetime=10 * 365 * 24 * 3600)
    assert (
        _reason(_verifier(issuer), token)
        == "identity token lifetime is longer than the mesh allows"
    )


def test_a_key_withdrawn_during_verification_is_not_cached(
    issuer: TokenIssuer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A verification racing a key rotation decides again and caches nothing stale."""
    store = KeyStore(keys=parse_jwks(issuer.jwks()))
    verifier = TokenVerifier(store)
    real = store.get
    calls = []

    def racing(kid: str) -> Any:
        key = real(kid)
        if not calls:
            store.replace(parse_jwks(TokenIssuer().jwks()))  # rotation lands mid-verification
        calls.append(1)
        return key

    monkeypatch.setattr(store, "get", racing)
    with pytest.raises(UnknownSigningKey):
        verifier.verify(issuer.mint("orders", "inventory"), AUDIENCE)
    assert len(calls) == 2  # decided again, against the new keys
    assert verifier._cache == {}


def test_new_key_material_under_an_old_kid_drops_the_cache(issuer: TokenIssuer) -> None:
    """Replacing a key under the same kid counts as a change of the key set."""
    store = KeyStore(keys=parse_jwks(issuer.jwks()))
    verifier = TokenVerifier(store)
    verifier.verify(issuer.mint("orders", "inventory"), AUDIENCE)
    impostor = TokenIssuer().jwks()
    impostor["keys"][0]["kid"] = issuer.kid
    store.replace(parse_jwks(impostor))
    assert verifier._cache == {}
