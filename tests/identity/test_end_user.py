"""End-user tokens are verified locally against a real OIDC provider's keys; every JWT attack
class refused for mesh identity tokens is refused for end-user tokens too."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey

from mesh_middleware.errors import IdentityError, RequestError
from mesh_middleware.identity.end_user import (
    EndUserAuthentication,
    EndUserKeysPending,
    EndUserKeysUnavailable,
    UnknownUserSigningKey,
)
from mesh_middleware.identity.end_user_keys import EndUserKeyring
from mesh_middleware.policy.schema import EndUsersPolicy
from tests.support.oidc_provider import OidcProvider, oidc_provider

AUDIENCE = "orders-api"


@pytest.fixture(scope="module")
def idp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcProvider]:
    with oidc_provider(tmp_path_factory.mktemp("idp"), algs=("RS256", "ES256")) as provider:
        yield provider


def _auth(idp: OidcProvider, **issuer: Any) -> EndUserAuthentication:
    spec = {"issuer": idp.issuer, "audiences": [AUDIENCE], **issuer}
    auth = EndUserAuthentication(EndUsersPolicy.model_validate({"issuers": [spec]}))
    keyring = EndUserKeyring()
    auth.bind(keyring)
    for store in keyring.stores():
        store.refresh()
    return auth


@pytest.fixture(scope="module")
def auth(idp: OidcProvider) -> EndUserAuthentication:
    return _auth(idp)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _segment(document: dict[str, Any]) -> str:
    return _b64(json.dumps(document).encode())


def _claims(idp: OidcProvider, **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": idp.issuer,
        "sub": "alice",
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + 300,
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def _kid(idp: OidcProvider, alg: str = "RS256") -> str:
    return str(next(k["kid"] for k in idp.jwks()["keys"] if k["alg"] == alg))


def _reason(auth: EndUserAuthentication, token: str) -> str:
    with pytest.raises(IdentityError) as caught:
        auth.verify(token)
    return caught.value.reason


def test_a_valid_token_gives_the_user(idp: OidcProvider, auth: EndUserAuthentication) -> None:
    """A provider token verifies: principal iss/sub, claims kept, read-only."""
    token = idp.token("alice", audience=AUDIENCE, claims={"groups": ["admin"]})
    user = auth.verify(token)
    assert user.principal == f"{idp.issuer}/alice"
    assert user.claims["groups"] == ["admin"]
    assert user.forwarded_by is None
    with pytest.raises(TypeError):
        user.claims["groups"] = ["root"]  # type: ignore[index]


def test_every_allowed_algorithm(idp: OidcProvider, auth: EndUserAuthentication) -> None:
    """RS256 and ES256 tokens both verify with the matching key from the JWKS."""
    for alg in ("RS256", "ES256"):
        assert auth.verify(idp.token("bob", audience=AUDIENCE, alg=alg)).subject == "bob"


def test_an_algorithm_the_issuer_does_not_allow(idp: OidcProvider) -> None:
    """An issuer limited to RS256 refuses an ES256 token before looking at keys."""
    auth = _auth(idp, algorithms=["RS256"])
    token = idp.token("alice", audience=AUDIENCE, alg="ES256")
    assert _reason(auth, token) == "end-user token algorithm 'ES256' is not accepted"


def test_alg_none(idp: OidcProvider, auth: EndUserAuthentication) -> None:
    """Unsigned tokens are refused, with or without a signature segment."""
    head = _segment({"alg": "none", "kid": _kid(idp)})
    body = _segment(_claims(idp))
    assert _reason(auth, f"{head}.{body}.") == "end-user token is not a compact JWS"
    assert _reason(auth, f"{head}.{body}.c2ln") == "end-user token algorithm 'none' is not accepted"


def test_hs256_keyed_with_the_public_key(idp: OidcProvider, auth: EndUserAuthentication) -> None:
    """Key confusion: HMAC keyed with the RSA public key (PEM or modulus) is refused."""
    public = RSAKey.import_key(next(k for k in idp.jwks()["keys"] if k["kty"] == "RSA"))
    pem = public.as_pem(private=False)
    head = _segment({"alg": "HS256", "kid": _kid(idp), "typ": "JWT"})
    body = _segment(_claims(idp))
    for secret in (pem, base64.urlsafe_b64decode(public.as_dict()["n"] + "==")):
        sig = _b64(hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest())
        reason = _reason(auth, f"{head}.{body}.{sig}")
        assert reason == "end-user token algorithm 'HS256' is not accepted"


def test_an_algorithm_that_does_not_fit_the_key(
    idp: OidcProvider, auth: EndUserAuthentication
) -> None:
    """An ES256 header naming the RSA key's kid does not verify (no cross-type confusion)."""
    attacker = ECKey.generate_key("P-256")
    header = {"alg": "ES256", "kid": _kid(idp, "RS256")}
    token = jwt.encode(header, _claims(idp), attacker, algorithms=["ES256"])
    assert _reason(auth, token) == "end-user token does not verify with its issuer's keys"


@pytest.mark.parametrize("param", ["jwk", "jku", "x5u", "x5c", "crit"])
def test_embedded_key_parameters_are_refused(
    idp: OidcProvider, auth: EndUserAuthentication, param: str
) -> None:
    """A token may not bring or point at its own key."""
    attacker = RSAKey.generate_key(2048)
    values: dict[str, Any] = {
        "jwk": attacker.as_dict(private=False),
        "jku": "http://127.0.0.1:1/jwks",
        "x5u": "http://127.0.0.1:1/cert",
        "x5c": ["MIIB"],
        "crit": ["exp"],
    }
    head = _segment({"alg": "RS256", "kid": _kid(idp), param: values[param]})
    reason = _reason(auth, f"{head}.{_segment(_claims(idp))}.c2ln")
    assert reason == f"end-user token header may not carry ['{param}']"


def test_a_token_signed_by_another_key(idp: OidcProvider, auth: EndUserAuthentication) -> None:
    """A forged signature under the provider's kid is refused; so is a tampered payload."""
    attacker = RSAKey.generate_key(2048)
    forged = jwt.encode({"alg": "RS256", "kid": _kid(idp)}, _claims(idp), attacker)
    assert _reason(auth, forged) == "end-user token signature is invalid"
    head, _, sig = idp.token("alice", audience=AUDIENCE).split(".")
    tampered = f"{head}.{_segment(_claims(idp, sub='root'))}.{sig}"
    assert _reason(auth, tampered) == "end-user token signature is invalid"


def test_an_unknown_kid(idp: OidcProvider, auth: EndUserAuthentication) -> None:
    """A kid the JWKS lacks raises UnknownUserSigningKey, carrying the keys to refetch."""
    attacker = RSAKey.generate_key(2048)
    token = jwt.encode({"alg": "RS256", "kid": "nobody"}, _claims(idp), attacker)
    with pytest.raises(UnknownUserSigningKey) as caught:
        auth.verify(token)
    assert caught.value.kid == "nobody"
    assert caught.value.keys.issuer == idp.issuer


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"exp": -60}, "end-user token expired"),
        ({"nbf": 3600}, "end-user token is not valid yet"),
        ({"iat": 3600}, "end-user token is not valid yet"),
        ({"aud": "another-api"}, "end-user token is for another audience"),
        ({"aud": ["x", "y"]}, "end-user token is for another audience"),
        ({"aud": None}, "end-user token lacks required claims: aud"),
        ({"exp": None}, "end-user token lacks required claims: exp"),
        ({"sub": None}, "end-user token lacks required claims: sub"),
        ({"iss": "https://evil.example"}, "end-user token issuer is not trusted here"),
        ({"iss": None}, "end-user token issuer is not trusted here"),
        ({"aud": 7}, "end-user token audience (aud) is not a string or a list of them"),
        ({"aud": [7, AUDIENCE]}, "end-user token audience (aud) is not a string or a list of them"),
        ({"aud": {AUDIENCE: 1}}, "end-user token audience (aud) is not a string or a list of them"),
        ({"iat": "yesterday"}, "end-user token iat is not a number"),
        ({"nbf": True}, "end-user token nbf is not a number"),
    ],
)
def test_claims_are_checked(
    idp: OidcProvider, auth: EndUserAuthentication, claims: dict[str, Any], reason: str
) -> None:
    """Expiry, not-before, issued-at, audience, subject and issuer, as the provider signs them."""
    now = int(time.time())
    signed: dict[str, Any] = {"aud": AUDIENCE}
    for name, value in claims.items():
        relative = name in {"exp", "nbf", "iat"} and type(value) is int
        signed[name] = now + value if relative and value else value
    token = idp.token("alice", claims=signed)
    assert _reason(auth, token) == reason


def test_clock_skew_is_the_issuers(idp: OidcProvider) -> None:
    """A token expired 30 s ago passes with the default 60 s skew, not with 5 s."""
    expired = idp.token("alice", audience=AUDIENCE, claims={"exp": int(time.time()) - 30})
    assert _auth(idp).verify(expired).subject == "alice"
    assert _reason(_auth(idp, clock_skew="5s"), expired) == "end-user token expired"


def test_no_audiences_means_aud_is_not_checked(idp: OidcProvider) -> None:
    """As Istio: an issuer without audiences takes a token for any audience."""
    auth = _auth(idp, audiences=[])
    assert auth.verify(idp.token("alice", audience="anything")).subject == "alice"


@pytest.mark.parametrize(
    "token",
    ["", "garbage", "a.b", "a.b.c.d", "...", "!!!.e30.c2ln", "e30.e30.c2ln", "W10.e30.c2ln"],
)
def test_garbage(auth: EndUserAuthentication, token: str) -> None:
    """Anything that is not a JWS is refused with a reason, never an unexpected exception."""
    assert _reason(auth, token)


def test_truncated(idp: OidcProvider, auth: EndUserAuthentication) -> None:
    """Every truncation of a valid token is refused."""
    token = idp.token("alice", audience=AUDIENCE)
    for cut in range(0, len(token), 11):
        with pytest.raises(IdentityError):
            auth.verify(token[:cut])


def test_oversized(auth: EndUserAuthentication) -> None:
    """A huge token is refused before parsing."""
    assert _reason(auth, "a" * 17_000) == "end-user token is too large"


def test_expiry_is_checked_again_on_a_cache_hit(idp: OidcProvider) -> None:
    """A cached verification stops counting once the token expires."""
    clock = [time.time()]
    spec = {"issuer": idp.issuer, "audiences": [AUDIENCE], "clock_skew": "0s"}
    auth = EndUserAuthentication(
        EndUsersPolicy.model_validate({"issuers": [spec]}), clock=lambda: clock[0]
    )
    keyring = EndUserKeyring()
    auth.bind(keyring)
    keyring.stores()[0].refresh()
    token = idp.token("alice", audience=AUDIENCE, lifetime=60)
    clock[0] = time.time() + 1  # not before the token's iat (whole seconds), with no skew
    user = auth.verify(token)
    assert user.subject == "alice"
    clock[0] = user.expires_at - 1  # still good, from the cache
    assert auth.verify(token) is user
    clock[0] = user.expires_at + 1
    assert _reason(auth, token) == "end-user token expired"


def test_the_cache_is_bounded(idp: OidcProvider) -> None:
    """The verified-token cache never holds more than its size."""
    spec = {"issuer": idp.issuer, "audiences": [AUDIENCE]}
    auth = EndUserAuthentication(EndUsersPolicy.model_validate({"issuers": [spec]}), cache_size=3)
    keyring = EndUserKeyring()
    auth.bind(keyring)
    keyring.stores()[0].refresh()
    for n in range(8):
        auth.verify(idp.token(f"user-{n}", audience=AUDIENCE))
    assert len(auth._cache) <= 3


def test_a_cached_token_is_used_only_for_that_very_token(
    idp: OidcProvider, auth: EndUserAuthentication
) -> None:
    """The cache is keyed by the signature's end: a token that shares it (the same signature on
    a payload naming someone else) is verified afresh, and refused."""
    token = idp.token("alice", audience=AUDIENCE)
    assert auth.verify(token).subject == "alice"
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    forged = ".".join([header, _b64(json.dumps({**claims, "sub": "mallory"}).encode()), signature])
    assert forged[-43:] == token[-43:]
    assert _reason(auth, forged) == "end-user token signature is invalid"
    assert auth.verify(token).subject == "alice"


def test_a_key_set_change_drops_cached_verifications(idp: OidcProvider, tmp_path: Path) -> None:
    """Once the provider retires a key, tokens it signed stop verifying, cached or not."""
    with oidc_provider(tmp_path, algs=("RS256",)) as own:
        auth = _auth(own)
        token = own.token("alice", audience=AUDIENCE)
        assert auth.verify(token).subject == "alice"
        own.rotate()
        own.retire()
        store = next(iter(auth._issuers.values())).keys
        assert store is not None and store.refresh()
        with pytest.raises(UnknownUserSigningKey):
            auth.verify(token)


def test_rotation_is_followed_through_a_refetch(tmp_path: Path) -> None:
    """A token from a key published after the last fetch triggers one refetch, then verifies."""
    with oidc_provider(tmp_path, algs=("RS256",)) as own:
        auth = _auth(own)
        own.rotate()
        token = own.token("alice", audience=AUDIENCE)
        with pytest.raises(UnknownUserSigningKey) as caught:
            auth.verify(token)
        assert caught.value.keys.refresh_for_unknown_kid(caught.value.kid, timeout=5)
        assert auth.verify(token).subject == "alice"


def test_an_unreachable_provider_keeps_the_last_good_keys(tmp_path: Path) -> None:
    """During an outage the refresh fails and the keys fetched before still verify."""
    with oidc_provider(tmp_path, algs=("RS256",)) as own:
        auth = _auth(own)
        token = own.token("alice", audience=AUDIENCE)
        own.outage(True)
        store = next(iter(auth._issuers.values())).keys
        assert store is not None
        assert not store.refresh()
        assert "503" in (store.last_error or "")
        assert auth.verify(token).subject == "alice"


def test_keys_never_fetched_refuse_with_unavailable(tmp_path: Path) -> None:
    """Before any key was fetched (provider down from the start), tokens are not let through."""
    with oidc_provider(tmp_path, algs=("RS256",)) as own:
        token = own.token("alice", audience=AUDIENCE)
        own.outage(True)
        spec = {"issuer": own.issuer, "audiences": [AUDIENCE]}
        auth = EndUserAuthentication(EndUsersPolicy.model_validate({"issuers": [spec]}))
        keyring = EndUserKeyring()
        auth.bind(keyring)
        store = keyring.stores()[0]
        assert not store.refresh()
        # The first token starts one more fetch (rate-limited) and is told to wait for it...
        with pytest.raises(EndUserKeysPending) as pending:
            auth.verify(token)
        assert not store.refresh_for_unknown_kid(pending.value.kid, timeout=5)
        # ...which fails too: from then on, 503 at once, never a token let through.
        for _ in range(3):
            with pytest.raises(EndUserKeysUnavailable):
                auth.verify(token)


def test_verification_does_not_fetch_per_token(idp: OidcProvider) -> None:
    """Fifty tokens, verified: not one more discovery or JWKS request than the first fetch."""
    auth = _auth(idp)
    before = idp.stats()
    for n in range(50):
        auth.verify(idp.token(f"u{n}", audience=AUDIENCE))
    after = idp.stats()
    assert (after["discovery"], after["jwks"]) == (before["discovery"], before["jwks"])


def test_discovery_must_name_the_configured_issuer(tmp_path: Path) -> None:
    """A discovery document for another issuer is not believed: no keys are taken from it."""
    with oidc_provider(tmp_path, algs=("RS256",), issuer="https://idp.example.com") as own:
        spec = {"issuer": f"http://127.0.0.1:{own.port}", "audiences": [AUDIENCE]}
        auth = EndUserAuthentication(EndUsersPolicy.model_validate({"issuers": [spec]}))
        keyring = EndUserKeyring()
        auth.bind(keyring)
        store = keyring.stores()[0]
        assert not store.refresh()
        assert "names issuer 'https://idp.example.com'" in (store.last_error or "")


def test_explicit_jwks_uri_skips_discovery(tmp_path: Path) -> None:
    """With jwks_uri, keys come from there and discovery is never asked."""
    with oidc_provider(tmp_path, algs=("RS256",)) as own:
        auth = _auth(own, jwks_uri=own.jwks_uri)
        assert auth.verify(own.token("alice", audience=AUDIENCE)).subject == "alice"
        assert own.stats()["discovery"] == 0


def test_inline_jwks(idp: OidcProvider) -> None:
    """An inline JWKS (Istio's `jwks`) verifies without any fetch."""
    auth = _auth(idp, jwks=json.dumps(idp.jwks()))
    assert auth.verify(idp.token("alice", audience=AUDIENCE)).subject == "alice"


def test_private_and_symmetric_keys_in_a_jwks_are_dropped() -> None:
    """A JWKS entry with private material, an HMAC secret or an encryption key is not kept."""
    from mesh_middleware.identity.oidc import parse_issuer_jwks

    rsa = RSAKey.generate_key(2048)
    private = {**rsa.as_dict(private=True), "kid": "priv"}
    public = {**rsa.as_dict(private=False), "kid": "pub"}
    encrypting = {**rsa.as_dict(private=False), "kid": "enc", "use": "enc"}
    secret = {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"}
    keys = parse_issuer_jwks({"keys": [private, public, encrypting, secret]})
    assert list(keys) == ["pub"]


def test_token_locations(idp: OidcProvider) -> None:
    """Bearer header by default (any case of 'Bearer'); a named header and a cookie when given;
    two different tokens at once are refused."""
    token = idp.token("alice", audience=AUDIENCE)
    default = _auth(idp)
    assert default.token_in({"authorization": f"Bearer {token}"}) is not None
    assert default.token_in({"authorization": f"bearer {token}"}) is not None
    assert default.token_in({"authorization": f"Basic {token}"}) is None
    assert default.token_in({"x-jwt": token}) is None
    custom = _auth(idp, from_headers=[{"name": "x-jwt", "prefix": ""}], from_cookies=["session"])
    assert custom.token_in({"authorization": f"Bearer {token}"}) is None
    found = custom.token_in({"x-jwt": token})
    assert found is not None and found[0] == token
    found = custom.token_in({"cookie": f"theme=dark; session={token}"})
    assert found is not None and found[0] == token
    other = idp.token("bob", audience=AUDIENCE)
    with pytest.raises(RequestError):
        custom.token_in({"x-jwt": token, "cookie": f"session={other}"})


def test_a_token_is_taken_only_where_its_issuer_reads_tokens(tmp_path: Path) -> None:
    """Two issuers, each with its own header: a token sent in the other's header is refused."""
    with (
        oidc_provider(tmp_path / "a", algs=("RS256",)) as first,
        oidc_provider(tmp_path / "b", algs=("RS256",)) as second,
    ):
        issuers = [
            {"issuer": first.issuer, "from_headers": [{"name": "x-first"}]},
            {"issuer": second.issuer, "from_headers": [{"name": "x-second"}]},
        ]
        auth = EndUserAuthentication(EndUsersPolicy.model_validate({"issuers": issuers}))
        keyring = EndUserKeyring()
        auth.bind(keyring)
        for store in keyring.stores():
            store.refresh()
        token = second.token("bob")
        found = auth.token_in({"x-second": token})
        assert found is not None and auth.verify(*found).principal == f"{second.issuer}/bob"
        found = auth.token_in({"x-first": token})
        assert found is not None
        with pytest.raises(IdentityError, match="not accepted where it was sent"):
            auth.verify(*found)


def test_the_provider_answers_authlib(idp: OidcProvider) -> None:
    """The discovery document passes Authlib's checks the keyring makes (issuer, jwks_uri)."""
    document = httpx.get(idp.discovery_url, timeout=5).json()
    assert document["issuer"] == idp.issuer
