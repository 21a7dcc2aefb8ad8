"""The OIDC test provider, as a real process on loopback: discovery, JWKS, tokens, rotation."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from authlib.integrations.base_client import OAuthError
from joserfc import jwt
from joserfc.errors import InvalidKeyIdError, SecurityWarning
from joserfc.jwk import KeySet
from joserfc.jwt import JWTClaimsRegistry

from tests.support.oidc_provider import (
    CLIENT_ID,
    CLIENT_SECRET,
    OidcProvider,
    oauth2_client,
    oidc_provider,
)
from tests.support.servers import REPO

PRIVATE_MEMBERS = {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}


@pytest.fixture(scope="module")
def idp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcProvider]:
    with oidc_provider(tmp_path_factory.mktemp("idp")) as provider:
        yield provider


def _verify(provider: OidcProvider, token: str, alg: str = "RS256") -> jwt.Token:
    keys = KeySet.import_key_set(provider.jwks())  # type: ignore[arg-type]
    return jwt.decode(token, keys, algorithms=[alg])


def _token_request(provider: OidcProvider, **kwargs: Any) -> httpx.Response:
    return httpx.post(provider.token_endpoint, timeout=5, **kwargs)


def test_discovery_document(idp: OidcProvider) -> None:
    assert idp.issuer == f"http://127.0.0.1:{idp.port}"
    assert idp.discovery() == {
        "issuer": idp.issuer,
        "jwks_uri": f"{idp.issuer}/jwks",
        "token_endpoint": f"{idp.issuer}/token",
        "response_types_supported": ["token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256", "ES256"],
        "grant_types_supported": ["client_credentials"],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
    }


def test_jwks_is_public_with_one_key_per_alg(idp: OidcProvider) -> None:
    keys = idp.jwks()["keys"]
    assert sorted(key["alg"] for key in keys) == ["ES256", "RS256"]
    assert len({key["kid"] for key in keys}) == 2
    for key in keys:
        assert key["use"] == "sig"
        assert not PRIVATE_MEMBERS & set(key), key
    by_alg = {key["alg"]: key for key in keys}
    assert by_alg["RS256"]["kty"] == "RSA"
    assert by_alg["ES256"]["kty"] == "EC"
    assert by_alg["ES256"]["crv"] == "P-256"


def test_token_verifies_against_jwks_with_requested_claims(idp: OidcProvider) -> None:
    before = int(time.time())
    token = idp.token("alice", audience="orders", claims={"scope": "read", "tenant": "t1"})
    decoded = _verify(idp, token)
    kids = {key["alg"]: key["kid"] for key in idp.jwks()["keys"]}
    assert decoded.header == {"alg": "RS256", "kid": kids["RS256"], "typ": "JWT"}
    claims = decoded.claims
    JWTClaimsRegistry(
        iss={"essential": True, "value": idp.issuer},
        aud={"essential": True, "value": "orders"},
        sub={"essential": True, "value": "alice"},
    ).validate(claims)
    assert claims["scope"] == "read"
    assert claims["tenant"] == "t1"
    assert before <= claims["iat"] <= int(time.time())
    assert claims["exp"] == claims["iat"] + 300
    assert claims["jti"]
    assert claims["jti"] != _verify(idp, idp.token("alice")).claims["jti"]


def test_token_options(idp: OidcProvider) -> None:
    es = _verify(idp, idp.token("bob", alg="ES256", audience=["a", "b"], lifetime=60), "ES256")
    assert es.header["alg"] == "ES256"
    assert es.claims["aud"] == ["a", "b"]
    assert es.claims["exp"] - es.claims["iat"] == 60
    assert "aud" not in _verify(idp, idp.token("bob")).claims

    expired = _verify(idp, idp.token("bob", lifetime=-60)).claims
    assert expired["exp"] < time.time()

    kid = next(key["kid"] for key in idp.jwks()["keys"] if key["alg"] == "ES256")
    assert _verify(idp, idp.token("bob", kid=kid), "ES256").header["kid"] == kid


def test_claims_override_everything_and_null_removes(idp: OidcProvider) -> None:
    forged = {"iss": "https://evil.example", "aud": "other", "exp": 1, "nbf": 2, "iat": 3}
    claims = _verify(idp, idp.token("mallory", audience="orders", claims=forged)).claims
    assert {name: claims[name] for name in forged} == forged
    bare = _verify(idp, idp.token("mallory", claims={"exp": None, "jti": None})).claims
    assert "exp" not in bare
    assert "jti" not in bare
    assert bare["sub"] == "mallory"


def test_client_secret_post_with_authlib(idp: OidcProvider) -> None:
    with oauth2_client(auth_method="client_secret_post") as client:
        answer = client.fetch_token(
            idp.token_endpoint, grant_type="client_credentials", sub="carol", lifetime="30"
        )
    assert answer["token_type"] == "Bearer"
    assert answer["expires_in"] == 30
    assert _verify(idp, answer["access_token"]).claims["sub"] == "carol"


def test_bad_client_is_401(idp: OidcProvider) -> None:
    form = {"grant_type": "client_credentials", "sub": "x"}
    basic = _token_request(idp, data=form, auth=(CLIENT_ID, "wrong"))
    assert basic.status_code == 401
    assert basic.json() == {"error": "invalid_client"}
    assert basic.headers["www-authenticate"].startswith("Basic")
    post = _token_request(idp, data={**form, "client_id": CLIENT_ID, "client_secret": "nope"})
    assert post.status_code == 401
    assert post.json() == {"error": "invalid_client"}
    assert _token_request(idp, data=form).status_code == 401

    with (
        oauth2_client(client_secret="wrong") as client,
        pytest.raises(OAuthError) as refused,
    ):
        client.fetch_token(idp.token_endpoint, grant_type="client_credentials", sub="x")
    assert refused.value.error == "invalid_client"


def test_bad_requests_are_400(idp: OidcProvider) -> None:
    auth = (CLIENT_ID, CLIENT_SECRET)
    grant = _token_request(idp, data={"grant_type": "password", "sub": "x"}, auth=auth)
    assert grant.status_code == 400
    assert grant.json() == {"error": "unsupported_grant_type"}
    for form in (
        {"grant_type": "client_credentials"},
        {"grant_type": "client_credentials", "sub": "x", "claims": "[1]"},
        {"grant_type": "client_credentials", "sub": "x", "alg": "PS512"},
        {"grant_type": "client_credentials", "sub": "x", "kid": "no-such-kid"},
        {"grant_type": "client_credentials", "sub": "x", "lifetime": "soon"},
    ):
        answer = _token_request(idp, data=form, auth=auth)
        assert answer.status_code == 400, form
        assert answer.json()["error"] == "invalid_request", form


def test_outage_fails_discovery_and_jwks_but_not_tokens(idp: OidcProvider) -> None:
    try:
        idp.outage(True)
        for url in (idp.discovery_url, idp.jwks_uri):
            assert httpx.get(url, timeout=5).status_code == 503
        token = idp.token("dave")
    finally:
        idp.outage(False)
    assert _verify(idp, token).claims["sub"] == "dave"
    assert idp.discovery()["issuer"] == idp.issuer


def test_stats_count_requests(idp: OidcProvider) -> None:
    before = idp.stats()
    idp.discovery()
    idp.jwks()
    idp.jwks()
    idp.token("erin")
    after = idp.stats()
    assert {name: after[name] - before[name] for name in after} == {
        "discovery": 1,
        "jwks": 2,
        "token": 1,
    }


def test_rotation_grace_then_retire(tmp_path: Path) -> None:
    with oidc_provider(tmp_path) as provider:
        first = {key["alg"]: key["kid"] for key in provider.jwks()["keys"]}
        old_rs256 = next(key for key in provider.jwks()["keys"] if key["alg"] == "RS256")
        old_token = provider.token("frank")

        rotated = provider.rotate()
        assert rotated["signing"].keys() == first.keys()
        assert set(rotated["signing"].values()).isdisjoint(first.values())
        assert set(rotated["kids"]) == {*first.values(), *rotated["signing"].values()}
        new_token = provider.token("frank")
        assert _verify(provider, new_token).header["kid"] == rotated["signing"]["RS256"]
        assert _verify(provider, old_token).header["kid"] == first["RS256"]  # grace

        retired = provider.retire()
        assert sorted(retired["kids"]) == sorted(rotated["signing"].values())
        assert retired["signing"] == rotated["signing"]
        assert {key["kid"] for key in provider.jwks()["keys"]} == set(retired["kids"])
        _verify(provider, new_token)
        with pytest.raises(InvalidKeyIdError):
            _verify(provider, old_token)

        # A retired key can still sign on request, for "unknown kid" tests.
        stale = provider.token("frank", kid=first["RS256"])
        assert jwt.decode(stale, KeySet.import_key_set({"keys": [old_rs256]})).claims["sub"]
        with pytest.raises(InvalidKeyIdError):
            _verify(provider, stale)


def test_other_algorithms_and_custom_issuer(tmp_path: Path) -> None:
    algs = ("EdDSA", "PS256", "ES384", "RS384")
    issuer = "https://idp.mesh.test/realms/mesh"
    with oidc_provider(tmp_path, algs=algs, issuer=issuer) as provider:
        assert provider.issuer == issuer
        document = provider.discovery()
        assert document["issuer"] == issuer
        assert document["jwks_uri"] == f"{issuer}/jwks"
        assert document["id_token_signing_alg_values_supported"] == list(algs)
        keys = provider.jwks()["keys"]
        assert [key["alg"] for key in keys] == list(algs)
        assert not any(PRIVATE_MEMBERS & set(key) for key in keys)
        for alg in algs:
            token = provider.token("gina", alg=alg)
            if alg == "EdDSA":
                with pytest.warns(SecurityWarning, match="EdDSA"):
                    decoded = _verify(provider, token, alg)
            else:
                decoded = _verify(provider, token, alg)
            assert decoded.header["alg"] == alg
            assert decoded.claims["iss"] == issuer
        # The default signing algorithm is the first one.
        assert provider.token("gina").startswith("eyJ")
        with pytest.warns(SecurityWarning):
            assert _verify(provider, provider.token("gina"), "EdDSA").header["alg"] == "EdDSA"


def test_script_rejects_unknown_algorithms() -> None:
    script = REPO / "tests" / "support" / "oidc_provider.py"
    result = subprocess.run(
        [sys.executable, str(script), "--port", "1", "--algs", "HS256"],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert b"--algs" in result.stderr
