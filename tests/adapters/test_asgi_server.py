"""MeshMiddleware under real uvicorn: identity, authorization, faults, websockets, reload."""

from __future__ import annotations

import concurrent.futures
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from mesh_middleware import TokenIssuer
from tests.support.policies import BROKEN_POLICY, LOCKED_DOWN_POLICY, SERVER_POLICY
from tests.support.raw_http import raw_request
from tests.support.servers import free_port, running, uvicorn_argv


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, TokenIssuer, Path]]:
    """One uvicorn process serving the test FastAPI app behind MeshMiddleware."""
    work = tmp_path_factory.mktemp("asgi")
    issuer = TokenIssuer()
    (work / "jwks.json").write_text(json.dumps(issuer.jwks()))
    policy = work / "policy.yaml"
    policy.write_text(SERVER_POLICY)
    port = free_port()
    env = {"MESH_POLICY": str(policy), "MESH_JWKS": str(work / "jwks.json")}
    with running(
        uvicorn_argv("tests.support.asgi_app:app", port),
        port=port,
        env=env,
        log_path=work / "server.log",
    ):
        yield port, issuer, policy


def _get(port: int, path: str, token: str | None = None, **headers: str) -> httpx.Response:
    if token is not None:
        headers["x-mesh-identity"] = token
    return httpx.get(f"http://127.0.0.1:{port}{path}", headers=headers, timeout=10)


def test_public_path_needs_no_identity_and_lifespan_ran(
    server: tuple[int, TokenIssuer, Path],
) -> None:
    """/healthz is public; the app's lifespan startup ran through the middleware."""
    port, _, _ = server
    response = _get(port, "/healthz")
    assert response.status_code == 200
    assert response.json() == {"ok": True, "lifespan_started": True}


def test_verified_caller_reaches_the_app(server: tuple[int, TokenIssuer, Path]) -> None:
    """A valid token is allowed by a rule and the app sees who called."""
    port, issuer, _ = server
    response = _get(port, "/items/1", issuer.mint("gateway", "inventory"))
    assert response.status_code == 200
    assert response.json()["caller"] == "gateway"


def test_missing_identity_is_401_json(server: tuple[int, TokenIssuer, Path]) -> None:
    """Strict authentication without a token is a 401 with a JSON reason."""
    response = _get(server[0], "/items/1")
    assert response.status_code == 401
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"error": "unauthenticated", "reason": "a mesh identity is required"}


@pytest.mark.parametrize(
    ("make_token", "reason"),
    [
        (lambda i: i.mint("orders", "inventory", now=time.time() - 3600), "identity token expired"),
        (lambda i: i.mint("orders", "payments"), "identity token is for another audience"),
        (lambda i: TokenIssuer().mint("orders", "inventory"), "unknown signing key"),
        (lambda i: "garbage", "identity token is not a compact JWS"),
    ],
)
def test_bad_identity_is_401_json(
    server: tuple[int, TokenIssuer, Path], make_token: object, reason: str
) -> None:
    """Expired, misdirected, unknown-key and garbage tokens are refused with their reason."""
    port, issuer, _ = server
    response = _get(port, "/items/1", make_token(issuer))  # type: ignore[operator]
    assert response.status_code == 401
    assert reason in response.json()["reason"]


def test_denial_names_its_rule(server: tuple[int, TokenIssuer, Path]) -> None:
    """A deny rule answers 403 with the rule and its line."""
    port, issuer, policy = server
    response = _get(port, "/admin/users", issuer.mint("orders", "inventory"))
    assert response.status_code == 403
    body = response.json()
    assert body["error"] == "forbidden" and body["rule"] == "no-admin"
    assert f"{policy}:7" in body["reason"]


def test_default_deny_when_no_allow_rule_matches(server: tuple[int, TokenIssuer, Path]) -> None:
    """A POST that no allow rule covers is denied by default (rule null)."""
    port, issuer, _ = server
    token = issuer.mint("gateway", "inventory")
    response = httpx.post(f"http://127.0.0.1:{port}/reserve", headers={"x-mesh-identity": token})
    assert response.status_code == 403
    assert response.json()["rule"] is None


@pytest.mark.parametrize(
    ("target", "status"),
    [
        ("/a%2Fb", 400),
        ("/a%5Cb", 400),
        ("/a%00", 400),
        ("/a%zz", 400),
        ("/items/%2e%2e/admin/x", 403),
    ],
)
def test_unsafe_paths(server: tuple[int, TokenIssuer, Path], target: str, status: int) -> None:
    """Encoded slash, backslash, NUL and bad escapes are 400; dot-segments are resolved first."""
    port, issuer, _ = server
    code, body = raw_request(
        port, target, headers={"x-mesh-identity": issuer.mint("orders", "inventory")}
    )
    assert code == status
    assert body["error"] in {"bad_request", "forbidden"}


def test_the_app_sees_the_normalized_path(server: tuple[int, TokenIssuer, Path]) -> None:
    """Authorization and the app agree on the path: the app gets the normalized one."""
    port, issuer, _ = server
    code, body = raw_request(
        port, "/items//a/./b/../c", headers={"x-mesh-identity": issuer.mint("orders", "inventory")}
    )
    assert code == 200
    assert body["path"] == "/items/a/c"


def test_abort_fault(server: tuple[int, TokenIssuer, Path]) -> None:
    """A header-matched abort answers its status with a JSON reason naming the fault."""
    port, issuer, _ = server
    response = _get(port, "/items/1", issuer.mint("orders", "inventory"), **{"x-chaos": "on"})
    assert response.status_code == 503
    assert response.json()["fault"] == "chaos"


def test_delay_does_not_block_other_requests(server: tuple[int, TokenIssuer, Path]) -> None:
    """A delayed request sleeps without blocking the event loop for others."""
    port, issuer, _ = server
    token = issuer.mint("orders", "inventory")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        started = time.monotonic()
        slow = pool.submit(_get, port, "/slow", token)
        time.sleep(0.1)
        fast = _get(port, "/items/2", token)
        fast_done = time.monotonic() - started
        assert fast.status_code == 200
        assert slow.result().status_code == 200
        slow_done = time.monotonic() - started
    assert fast_done < 0.8
    assert slow_done >= 1.0


def test_websocket_handshake_is_authorized(server: tuple[int, TokenIssuer, Path]) -> None:
    """An authorized websocket is accepted and sees its caller; an anonymous one is refused."""
    port, issuer, _ = server
    url = f"ws://127.0.0.1:{port}/ws"
    with connect(
        url, additional_headers={"x-mesh-identity": issuer.mint("orders", "inventory")}
    ) as ws:
        assert json.loads(ws.recv(timeout=5)) == {"caller": "orders"}
    with pytest.raises(InvalidStatus) as refused:
        connect(url, open_timeout=5)
    assert refused.value.response.status_code == 401
    assert json.loads(refused.value.response.body or b"{}")["error"] == "unauthenticated"


def test_hot_reload_and_broken_edits(server: tuple[int, TokenIssuer, Path]) -> None:
    """A changed policy applies within 2 s; a broken edit keeps the last good one."""
    port, issuer, policy = server
    token = issuer.mint("orders", "inventory")
    try:
        policy.write_text(LOCKED_DOWN_POLICY)
        assert _eventually_status(port, token, 403, within=2.0)
        policy.write_text(BROKEN_POLICY)
        time.sleep(1.5)
        response = _get(port, "/items/1", token)
        assert response.status_code == 403
        assert response.json()["rule"] == "lockdown"
    finally:
        policy.write_text(SERVER_POLICY)
    assert _eventually_status(port, token, 200, within=2.0)


def _eventually_status(port: int, token: str, status: int, *, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if _get(port, "/items/1", token).status_code == status:
            return True
        time.sleep(0.05)
    return False


def test_root_path_is_stripped_before_authorization(tmp_path: Path) -> None:
    """Behind `uvicorn --root-path /api` the policy sees what the app routes on."""
    issuer = TokenIssuer()
    (tmp_path / "jwks.json").write_text(json.dumps(issuer.jwks()))
    policy = tmp_path / "policy.yaml"
    policy.write_text(SERVER_POLICY)
    port = free_port()
    env = {"MESH_POLICY": str(policy), "MESH_JWKS": str(tmp_path / "jwks.json")}
    argv = [*uvicorn_argv("tests.support.asgi_app:app", port), "--root-path", "/api"]
    token = issuer.mint("orders", "inventory")
    with running(argv, port=port, env=env, log_path=tmp_path / "server.log"):
        # uvicorn puts the root path in front of the request path; the app routes on the rest.
        for target in ["/admin/x", "//admin/x", "/items/../admin/x", "/api/admin/x"]:
            status, body = raw_request(port, target, headers={"x-mesh-identity": token})
            if status == 200:
                routed = body["path"].removeprefix("/api")
                assert not routed.startswith("/admin"), (target, body)
            else:
                assert (status, body["rule"]) == (403, "no-admin"), target
        status, body = raw_request(port, "/admin/x", headers={"x-mesh-identity": token})
        assert status == 403
        status, body = raw_request(port, "/items/1", headers={"x-mesh-identity": token})
        assert (status, body["path"]) == (200, "/api/items/1")
