"""End users in real processes: a real OIDC provider, apps under uvicorn and gunicorn, and a
real registry for forwarding users from one service to the next."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.registry.support import Registry, start_registry
from tests.support.oidc_provider import OidcProvider, oidc_provider
from tests.support.servers import free_port, gunicorn_argv, running, uvicorn_argv

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

FRONT = """\
service: {service}
inbound:
  authentication: permissive
  public: [/healthz]
  end_users:
    issuers:
      - issuer: "{issuer}"
        audiences: [shop]
  authorization:
    rules:
      - name: deny-anonymous-admin
        action: deny
        paths: [/admin/*]
        not_users: ["*"]
      - name: admins
        action: allow
        paths: [/admin/*]
        claims: {{groups: [admin]}}
      - name: everything-else
        action: allow
        not_paths: [/admin/*]
outbound:
  forward_user:
    to: [orders]
    claims: [email, groups]
"""

ORDERS = """\
service: orders
inbound:
  authentication: strict
  public: [/healthz]
  end_users:
    issuers:
      - issuer: "{issuer}"
        audiences: [shop]
    forwarded_from: [gateway, web]
  authorization:
    rules:
      - name: admins-through-the-front
        action: allow
        from: [gateway, web]
        users: ["{issuer}/*"]
        claims: {{groups: [admin]}}
"""

SERVERS = {
    "uvicorn": lambda port: uvicorn_argv("tests.support.end_user_app:asgi_app", port),
    "gunicorn": lambda port: gunicorn_argv("tests.support.end_user_app:wsgi_app", port),
    # The app (its Mesh, and the first key fetch) made in the master before the workers fork.
    "gunicorn-preload": lambda port: [
        *gunicorn_argv("tests.support.end_user_app:wsgi_app", port),
        "--preload",
    ],
}


def _env(tmp_path: Path, name: str, policy: str, **extra: str) -> dict[str, str]:
    path = tmp_path / f"{name}.yaml"
    path.write_text(policy)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env.update(MESH_POLICY=str(path), **extra)
    return env


@pytest.fixture
def idp(tmp_path: Path) -> Iterator[OidcProvider]:
    with oidc_provider(tmp_path / "idp", algs=("RS256", "ES256")) as provider:
        yield provider


def _bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


@pytest.mark.parametrize("server", ["uvicorn", "gunicorn", "gunicorn-preload"])
def test_a_running_app_authenticates_and_authorizes_end_users(
    server: str, idp: OidcProvider, tmp_path: Path
) -> None:
    """401 for bad tokens, anonymous without one, rules on principal and claims; the app reads
    the verified user; keys are fetched once, not per request."""
    port = free_port()
    env = _env(tmp_path, "front", FRONT.format(service="front", issuer=idp.issuer))
    alice = idp.token("alice", audience="shop", claims={"groups": ["admin"], "email": "a@x"})
    bob = idp.token("bob", audience="shop", claims={"groups": ["dev"]})
    with running(SERVERS[server](port), port=port, env=env, log_path=tmp_path / "app.log"):
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=10) as client:
            anonymous = client.get("/hello")
            assert anonymous.status_code == 200 and anonymous.json()["user"] is None
            hello = client.get("/hello", headers=_bearer(alice))
            assert hello.status_code == 200, hello.text
            assert hello.json()["user"] == f"{idp.issuer}/alice"
            assert hello.json()["claims"]["email"] == "a@x"
            denied = client.get("/admin/panel")
            assert denied.status_code == 403
            assert denied.json()["rule"] == "deny-anonymous-admin"
            assert client.get("/admin/panel", headers=_bearer(bob)).status_code == 403
            assert client.get("/admin/panel", headers=_bearer(alice)).status_code == 200
            for bad in (
                alice[:-4] + "AAAA",
                idp.token("alice", audience="other"),
                idp.token("alice", audience="shop", lifetime=-120),
                "not-a-jwt",
            ):
                refused = client.get("/hello", headers=_bearer(bad))
                assert refused.status_code == 401, refused.text
                assert refused.json()["error"] == "unauthenticated"
            # Each worker fetches the keys once, at its start (gunicorn's second worker may do
            # so only now): count from when every worker has answered a user of its own.
            workers = 1 if server == "uvicorn" else 2
            pids: set[int] = set()
            deadline = time.monotonic() + 20
            while len(pids) < workers and time.monotonic() < deadline:
                pids.add(client.get("/hello", headers=_bearer(alice)).json()["pid"])
            assert len(pids) == workers
            fetched = idp.stats()
            for _ in range(50):
                assert client.get("/hello", headers=_bearer(alice)).status_code == 200
            after = idp.stats()
            assert (after["discovery"], after["jwks"]) == (fetched["discovery"], fetched["jwks"])


def test_key_rotation_and_provider_outage(idp: OidcProvider, tmp_path: Path) -> None:
    """A token from a key published after start verifies (one refetch); when the provider goes
    down, tokens from keys already fetched keep verifying."""
    port = free_port()
    env = _env(tmp_path, "front", FRONT.format(service="front", issuer=idp.issuer))
    with running(SERVERS["uvicorn"](port), port=port, env=env, log_path=tmp_path / "app.log"):
        url = f"http://127.0.0.1:{port}/hello"
        first = idp.token("alice", audience="shop")
        assert httpx.get(url, headers=_bearer(first), timeout=10).status_code == 200
        idp.rotate()
        rotated = idp.token("alice", audience="shop")
        answer = httpx.get(url, headers=_bearer(rotated), timeout=10)
        assert answer.status_code == 200, answer.text
        idp.outage(True)
        for token in (first, rotated, idp.token("carol", audience="shop")):
            assert httpx.get(url, headers=_bearer(token), timeout=10).status_code == 200
        idp.retire()
        idp.rotate()
        unknown = idp.token("dave", audience="shop")
        refused = httpx.get(url, headers=_bearer(unknown), timeout=10)
        assert refused.status_code == 401  # a key it could not fetch: never let through
        assert "unknown key" in refused.json()["reason"]


def _wait_registered(registry: Registry, service: str, within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        answer = httpx.get(f"{registry.url}/v1/catalog/services/{service}", timeout=2)
        if answer.status_code == 200 and answer.json().get("instances"):
            return
        time.sleep(0.1)
    raise AssertionError(f"{service} never registered")


def _call(port: int, token: str | None) -> dict[str, Any]:
    headers = _bearer(token) if token else {}
    answer = httpx.get(f"http://127.0.0.1:{port}/call/orders/items", headers=headers, timeout=15)
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()
    return result


def test_users_are_forwarded_signed_by_the_mesh(idp: OidcProvider, tmp_path: Path) -> None:
    """gateway (FastAPI, httpx) and web (Flask under gunicorn, requests) forward the verified
    user to orders, which trusts them to: orders authorizes on the forwarded claims and sees
    who forwarded; a user's other claims stay behind; a forged header is worth nothing."""
    with start_registry(tmp_path / "registry", dev=True) as registry:
        mesh = {"MESH_REGISTRY_URL": registry.url}
        orders_port, gateway_port, web_port = free_port(), free_port(), free_port()
        orders_env = _env(tmp_path, "orders", ORDERS.format(issuer=idp.issuer), **mesh)
        gateway_env = _env(
            tmp_path, "gateway", FRONT.format(service="gateway", issuer=idp.issuer), **mesh
        )
        web_env = _env(tmp_path, "web", FRONT.format(service="web", issuer=idp.issuer), **mesh)
        admin = idp.token(
            "alice", audience="shop", claims={"groups": ["admin"], "email": "a@x", "ssn": "1"}
        )
        dev = idp.token("bob", audience="shop", claims={"groups": ["dev"]})
        with (
            running(
                SERVERS["uvicorn"](orders_port),
                port=orders_port,
                env=orders_env,
                log_path=tmp_path / "orders.log",
            ),
            running(
                SERVERS["uvicorn"](gateway_port),
                port=gateway_port,
                env=gateway_env,
                log_path=tmp_path / "gateway.log",
            ),
            running(
                SERVERS["gunicorn"](web_port),
                port=web_port,
                env=web_env,
                log_path=tmp_path / "web.log",
            ),
        ):
            _wait_registered(registry, "orders")
            for front_port, front in ((gateway_port, "gateway"), (web_port, "web")):
                passed = _call(front_port, admin)
                assert passed["status"] == 200, passed
                seen = passed["body"]
                assert seen["caller"] == front
                assert seen["user"] == f"{idp.issuer}/alice"
                assert seen["forwarded_by"] == front
                assert seen["claims"]["groups"] == ["admin"]
                assert seen["claims"]["email"] == "a@x"
                assert "ssn" not in seen["claims"]  # only the claims the policy forwards
                assert _call(front_port, dev)["status"] == 403
                assert _call(front_port, None)["status"] == 403
            # Without the mesh identity of a trusted forwarder, the header counts for nothing.
            forged = httpx.get(
                f"http://127.0.0.1:{orders_port}/items",
                headers={"x-mesh-user": "eyJhbGciOiJub25lIn0.e30.", **_bearer(dev)},
                timeout=10,
            )
            assert forged.status_code == 401  # strict: no mesh identity at all


def _attacks(idp: OidcProvider) -> dict[str, str]:
    """One token per JWT attack class of mesh identity tokens, made against this provider."""
    import base64
    import hashlib
    import hmac
    import json

    from joserfc import jwt
    from joserfc.jwk import RSAKey

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    def segment(document: dict[str, Any]) -> str:
        return b64(json.dumps(document).encode())

    now = int(time.time())
    claims = {"iss": idp.issuer, "sub": "mallory", "aud": "shop", "iat": now, "exp": now + 300}
    rsa = next(k for k in idp.jwks()["keys"] if k["kty"] == "RSA")
    kid = rsa["kid"]
    attacker = RSAKey.generate_key(2048)
    valid = idp.token("mallory", audience="shop")
    head, body, sig = valid.split(".")
    pem = RSAKey.import_key(rsa).as_pem(private=False)
    hs_head = segment({"alg": "HS256", "kid": kid, "typ": "JWT"})
    hs_sig = b64(hmac.new(pem, f"{hs_head}.{body}".encode(), hashlib.sha256).digest())
    embedded = {
        f"embedded-{param}": (f"{segment({'alg': 'RS256', 'kid': kid, param: value})}.{body}.{sig}")
        for param, value in (
            ("jwk", attacker.as_dict(private=False)),
            ("jku", "http://127.0.0.1:1/jwks"),
            ("x5u", "http://127.0.0.1:1/cert"),
            ("x5c", ["MIIB"]),
            ("crit", ["exp"]),
        )
    }
    return {
        "forged-signature": jwt.encode({"alg": "RS256", "kid": kid}, claims, attacker),
        "tampered-payload": f"{head}.{segment({**claims, 'sub': 'root'})}.{sig}",
        "expired": idp.token("mallory", audience="shop", lifetime=-120),
        "not-yet-valid": idp.token("mallory", audience="shop", claims={"nbf": now + 3600}),
        "wrong-audience": idp.token("mallory", audience="other"),
        "wrong-issuer": idp.token("mallory", audience="shop", claims={"iss": "https://evil"}),
        "alg-none": f"{segment({'alg': 'none', 'kid': kid})}.{body}.",
        "alg-none-signed": f"{segment({'alg': 'none', 'kid': kid})}.{body}.c2ln",
        "hs256-with-the-public-key": f"{hs_head}.{body}.{hs_sig}",
        **embedded,
        "unknown-kid": jwt.encode({"alg": "RS256", "kid": "stranger"}, claims, attacker),
        "truncated": valid[: len(valid) // 2],
        "garbage": "e30.e30.c2ln",
    }


@pytest.mark.parametrize("server", ["uvicorn", "gunicorn"])
def test_every_jwt_attack_class_is_refused_for_end_user_tokens(
    server: str, idp: OidcProvider, tmp_path: Path
) -> None:
    """Through a real server, each attack is a 401 with a JSON reason; the app never runs."""
    port = free_port()
    env = _env(tmp_path, "front", FRONT.format(service="front", issuer=idp.issuer))
    attacks = _attacks(idp)
    with (
        running(SERVERS[server](port), port=port, env=env, log_path=tmp_path / "app.log"),
        httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client,
    ):
        for name, token in attacks.items():
            answer = client.get("/hello", headers=_bearer(token))
            assert answer.status_code == 401, (name, answer.text)
            refusal = answer.json()
            assert refusal["error"] == "unauthenticated", name
            assert refusal["reason"].startswith("end-user token"), (name, refusal)
        assert client.get("/hello").status_code == 200  # the server is still fine
