"""MeshWSGIMiddleware in a Flask app under real gunicorn workers: same engine, same answers."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from mesh_middleware import TokenIssuer
from tests.support.policies import BROKEN_POLICY, LOCKED_DOWN_POLICY, SERVER_POLICY
from tests.support.raw_http import raw_request
from tests.support.servers import free_port, gunicorn_argv, running


@pytest.fixture(scope="module", params=["import-per-worker", "preload"])
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[int, TokenIssuer, Path]]:
    """Gunicorn with two workers; with --preload the Mesh is built before the fork."""
    work = tmp_path_factory.mktemp("wsgi")
    issuer = TokenIssuer()
    (work / "jwks.json").write_text(json.dumps(issuer.jwks()))
    policy = work / "policy.yaml"
    policy.write_text(SERVER_POLICY)
    port = free_port()
    env = {"MESH_POLICY": str(policy), "MESH_JWKS": str(work / "jwks.json")}
    argv = gunicorn_argv("tests.support.wsgi_app:app", port)
    if request.param == "preload":
        argv.append("--preload")
    with running(
        argv,
        port=port,
        env=env,
        log_path=work / "server.log",
    ):
        yield port, issuer, policy


def _get(port: int, path: str, token: str | None = None, **headers: str) -> httpx.Response:
    if token is not None:
        headers["x-mesh-identity"] = token
    return httpx.get(f"http://127.0.0.1:{port}{path}", headers=headers, timeout=10)


def test_public_and_verified_requests(server: tuple[int, TokenIssuer, Path]) -> None:
    """Public paths pass anonymously; a verified caller is in request.environ."""
    port, issuer, _ = server
    assert _get(port, "/healthz").status_code == 200
    response = _get(port, "/items/1", issuer.mint("gateway", "inventory"))
    assert response.status_code == 200
    assert response.json()["caller"] == "gateway"


def test_refusals_are_json(server: tuple[int, TokenIssuer, Path]) -> None:
    """401 without identity, 401 for a forged one, 403 naming the rule, the abort status."""
    port, issuer, _ = server
    missing = _get(port, "/items/1")
    assert missing.status_code == 401 and missing.json()["error"] == "unauthenticated"
    forged = _get(port, "/items/1", TokenIssuer().mint("orders", "inventory"))
    assert forged.status_code == 401 and "unknown signing key" in forged.json()["reason"]
    denied = _get(port, "/admin/x", issuer.mint("orders", "inventory"))
    assert denied.status_code == 403 and denied.json()["rule"] == "no-admin"
    aborted = _get(port, "/items/1", issuer.mint("orders", "inventory"), **{"x-chaos": "on"})
    assert aborted.status_code == 503 and aborted.json()["fault"] == "chaos"


def test_two_identity_headers_are_refused(server: tuple[int, TokenIssuer, Path]) -> None:
    """A request carrying two identity headers is ambiguous and refused."""
    port, issuer, _ = server
    token = issuer.mint("orders", "inventory")
    response = httpx.get(
        f"http://127.0.0.1:{port}/items/1",
        headers=[("x-mesh-identity", token), ("x-mesh-identity", token)],
    )
    assert response.status_code == 401


@pytest.mark.parametrize(
    ("target", "status"), [("/a%2Fb", 400), ("/a%5C", 400), ("/items/..%2F..%2Fadmin", 400)]
)
def test_unsafe_paths(server: tuple[int, TokenIssuer, Path], target: str, status: int) -> None:
    """The raw request target is checked, not gunicorn's decoded PATH_INFO."""
    port, issuer, _ = server
    code, body = raw_request(
        port, target, headers={"x-mesh-identity": issuer.mint("orders", "inventory")}
    )
    assert code == status and body["error"] == "bad_request"


def test_the_app_sees_the_normalized_path(server: tuple[int, TokenIssuer, Path]) -> None:
    """Flask routes the same path the policy authorized."""
    port, issuer, _ = server
    code, body = raw_request(
        port, "/items//x/../y", headers={"x-mesh-identity": issuer.mint("orders", "inventory")}
    )
    assert code == 200 and body["path"] == "/items/y"
    code, body = raw_request(
        port, "/items/../admin/x", headers={"x-mesh-identity": issuer.mint("orders", "inventory")}
    )
    assert code == 403 and body["rule"] == "no-admin"


def test_hot_reload_reaches_every_worker(server: tuple[int, TokenIssuer, Path]) -> None:
    """Forked workers restart the policy watch: a change applies everywhere within 2 s."""
    port, issuer, policy = server
    token = issuer.mint("orders", "inventory")
    try:
        policy.write_text(LOCKED_DOWN_POLICY)
        time.sleep(2.0)
        statuses = {_get(port, "/items/1", token).status_code for _ in range(30)}
        assert statuses == {403}
        policy.write_text(BROKEN_POLICY)
        time.sleep(1.5)
        statuses = {_get(port, "/items/1", token).status_code for _ in range(30)}
        assert statuses == {403}
    finally:
        policy.write_text(SERVER_POLICY)
    time.sleep(2.0)
    assert {_get(port, "/items/1", token).status_code for _ in range(30)} == {200}
