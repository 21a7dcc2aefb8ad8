"""The end-user JWT cases, against real apps with real tokens from real OIDC providers.

Every case of ``tests/policy/test_end_user_cases.py`` runs here as an HTTP request to a FastAPI
app served by uvicorn behind ``MeshMiddleware`` (one process per policy, all started once for
the module). End-user tokens come from OpenID Connect provider processes
(``tests/support/oidc_provider.py``): one per issuer the policies name (Istio's
``testing@secure.istio.io``, the URL issuer ``https://accounts.example.com/realms/shop``, and
one found by OIDC discovery at its own URL), plus a rogue provider that signs with the
``testing@secure.istio.io`` name but keys of its own. Mesh service identities are minted by a
``TokenIssuer`` and sent in ``x-mesh-identity``.
"""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from mesh_middleware import TokenIssuer
from mesh_middleware.policy.explain import split_principal
from tests.policy.test_end_user_cases import (
    BAD_SIGNATURE,
    CASES,
    EXPIRED,
    GARBAGE,
    ISSUER_DISCOVERY,
    JWKS_INLINE_SHOP,
    JWKS_URI_SHOP,
    JWKS_URI_TESTING,
    NOT_YET_VALID,
    POLICIES,
    SHOP,
    TAMPERED,
    TESTING,
    Case,
    render,
    rule_line,
)
from tests.support.oidc_provider import OidcProvider, oidc_provider
from tests.support.servers import free_port, running, uvicorn_argv

pytestmark = pytest.mark.timeout(120)

T = TypeVar("T")

# What Istio's task sends as an invalid token ([authz-jwt]: "Authorization: Bearer invalidToken").
INVALID_TOKEN = "invalidToken"


def _enter_all(stack: ExitStack, managers: list[AbstractContextManager[T]]) -> list[T]:
    """Enter context managers concurrently (each starts a process and waits for it)."""
    entered: list[T | None] = [None] * len(managers)
    errors: list[BaseException] = []

    def enter(index: int) -> None:
        manager = managers[index]
        try:
            value = manager.__enter__()
        except BaseException as exc:  # reported after the others are entered
            errors.append(exc)
            return
        entered[index] = value
        stack.push(manager)

    with ThreadPoolExecutor(max_workers=len(managers)) as pool:
        list(pool.map(enter, range(len(managers))))
    if errors:
        raise errors[0]
    return [value for value in entered if value is not None]


@dataclass
class Providers:
    testing: OidcProvider
    shop: OidcProvider
    discovery: OidcProvider
    rogue: OidcProvider  # issuer name TESTING, keys of its own

    def for_issuer(self, issuer: str) -> OidcProvider | None:
        by_issuer = {TESTING: self.testing, SHOP: self.shop, self.discovery.issuer: self.discovery}
        return by_issuer.get(issuer)

    def values(self) -> dict[str, str]:
        return {
            JWKS_URI_TESTING: self.testing.jwks_uri,
            JWKS_URI_SHOP: self.shop.jwks_uri,
            JWKS_INLINE_SHOP: json.dumps(self.shop.jwks()),
            ISSUER_DISCOVERY: self.discovery.issuer,
        }


@dataclass
class App:
    port: int
    service: str
    policy_file: Path


@dataclass
class World:
    providers: Providers
    apps: dict[str, App]
    mesh: TokenIssuer


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """The providers, then one app per policy (with the providers' real key locations)."""
    work = tmp_path_factory.mktemp("end-user-app")
    with ExitStack() as stack:
        testing, shop, discovery, rogue = _enter_all(
            stack,
            [
                oidc_provider(work / "idp-testing", algs=("RS256",), issuer=TESTING),
                oidc_provider(work / "idp-shop", algs=("ES256",), issuer=SHOP),
                oidc_provider(work / "idp-discovery", algs=("RS256",)),
                oidc_provider(work / "idp-rogue", algs=("RS256",), issuer=TESTING),
            ],
        )
        providers = Providers(testing=testing, shop=shop, discovery=discovery, rogue=rogue)
        values = providers.values()
        mesh = TokenIssuer()
        mesh_jwks = work / "mesh-jwks.json"
        mesh_jwks.write_text(json.dumps(mesh.jwks()))

        apps: dict[str, App] = {}
        managers: list[AbstractContextManager[Any]] = []
        for name, text in POLICIES.items():
            policy_file = work / f"{name}.yaml"
            policy_file.write_text(render(text, values))
            service = re.search(r"^service: (\S+)$", text, re.MULTILINE)
            assert service is not None
            port = free_port()
            apps[name] = App(port=port, service=service[1], policy_file=policy_file)
            managers.append(
                running(
                    uvicorn_argv("tests.support.asgi_app:app", port),
                    port=port,
                    env={"MESH_POLICY": str(policy_file), "MESH_JWKS": str(mesh_jwks)},
                    log_path=work / f"{name}.log",
                    timeout=45.0,
                )
            )
        _enter_all(stack, managers)
        yield World(providers=providers, apps=apps, mesh=mesh)


def _user_token(case: Case, providers: Providers) -> str | None:
    """The end-user token a case sends (None: none)."""
    if case.user is None:
        return None
    if case.token == GARBAGE:
        return INVALID_TOKEN
    user = case.user.replace(ISSUER_DISCOVERY, providers.discovery.issuer)
    # As explain reads --user: after a known issuer, so that a subject may hold "/".
    issuer, subject = split_principal(user, [TESTING, SHOP, providers.discovery.issuer])
    claims = dict(case.claims)
    audience = claims.pop("aud", None)
    provider = providers.for_issuer(issuer)
    if case.token == BAD_SIGNATURE:
        provider = providers.rogue
    elif provider is None:
        # An issuer no provider runs as (another spelling of one): a provider signs, with the
        # iss claim overridden.
        provider = providers.testing
        claims["iss"] = issuer
    if case.token == NOT_YET_VALID:
        claims["nbf"] = int(time.time()) + 600
    lifetime = -600 if case.token == EXPIRED else 300
    if case.token != TAMPERED:
        return provider.token(subject, claims=claims or None, audience=audience, lifetime=lifetime)
    # Signed for someone else, then the payload edited to name this subject.
    signed = provider.token("mallory", claims=claims or None, audience=audience)
    header, payload, signature = signed.split(".")
    decoded = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    decoded["sub"] = subject
    edited = base64.urlsafe_b64encode(json.dumps(decoded).encode()).rstrip(b"=").decode()
    return f"{header}.{edited}.{signature}"


def _headers(case: Case, token: str | None, world: World, app: App) -> dict[str, str]:
    headers: dict[str, str] = {}
    if case.caller != "anonymous":
        headers["x-mesh-identity"] = world.mesh.mint(case.caller, app.service)
    if token is None:
        return headers
    kind, _, where = case.send.partition(":")
    if kind == "bearer":
        headers["authorization"] = f"Bearer {token}"
    elif kind == "header":
        name, _, prefix = where.partition(":")
        headers[name] = f"{prefix}{token}"
    elif kind == "cookie":
        headers["cookie"] = f"{where}={token}"
    elif kind == "cookies":
        headers["cookie"] = f"theme=dark; {where}={token}; lang=en"
    else:
        raise AssertionError(f"{case.id}: unknown send {case.send!r}")
    return headers


def _describe(response: httpx.Response) -> str:
    return f"{response.status_code} {response.text[:500]}"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_app(case: Case, world: World) -> None:
    """The running app answers the case's status (and names the deciding rule on a 403)."""
    app = world.apps[case.policy]
    token = _user_token(case, world.providers)
    response = httpx.request(
        case.method,
        f"http://127.0.0.1:{app.port}{case.path}",
        headers=_headers(case, token, world, app),
        timeout=15,
    )
    assert response.status_code == case.status, _describe(response)
    if case.status == 403:
        body = response.json()
        assert body.get("rule") == case.rule, _describe(response)
        if case.rule is not None:
            assert f"{app.policy_file}:{rule_line(case.policy, case.rule)}" in body["reason"]
    elif case.status == 200 and case.path != "/healthz":
        assert response.json()["path"] == case.path, _describe(response)
