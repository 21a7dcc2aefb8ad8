"""What the middlewares do with the TLS peer `mesh run` reports: `mtls: strict` refuses requests
that did not come over mesh mutual TLS (public paths aside), and a token must name the service
of the connection's certificate in every mode."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Any

import pytest

from mesh_middleware import Mesh, MeshMiddleware, MeshWSGIMiddleware, TokenIssuer
from mesh_middleware.adapters.asgi import PEER_SCOPE_KEY
from mesh_middleware.adapters.wsgi import PEER_ENVIRON_KEY
from tests.adapters.test_asgi_inprocess import _App, _run, _scope
from tests.conftest import PolicyWriter

ORDERS = "spiffe://mesh.local/svc/orders"
GATEWAY = "spiffe://mesh.local/svc/gateway"


def policy(mode: str) -> str:
    return f"""\
service: inventory
inbound:
  authentication: strict
  mtls: {mode}
  public: [/healthz]
"""


def asgi(
    middleware: MeshMiddleware, path: str, token: str | None, peer: str | None
) -> tuple[int, dict[str, Any]]:
    scope = _scope(path, token)
    if peer is not None:
        scope[PEER_SCOPE_KEY] = peer
    status, body = _run(middleware, scope)
    return status, json.loads(body) if status != 200 else {}


def wsgi(
    middleware: MeshWSGIMiddleware, path: str, token: str | None, peer: str | None
) -> tuple[int, dict[str, Any]]:
    environ: dict[str, Any] = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": path,
        "RAW_URI": path,
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8000",
        "wsgi.input": io.BytesIO(b""),
        "wsgi.url_scheme": "https" if peer else "http",
    }
    if token is not None:
        environ["HTTP_X_MESH_IDENTITY"] = token
    if peer is not None:
        environ[PEER_ENVIRON_KEY] = peer
    statuses: list[str] = []
    body = b"".join(middleware(environ, lambda status, headers, *_: statuses.append(status)))
    status = int(statuses[0].split()[0])
    return status, json.loads(body) if status != 200 else {}


def wsgi_ok(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    start_response("200 OK", [("content-type", "text/plain")])
    return [b"ok"]


@pytest.fixture(params=["asgi", "wsgi"])
def call(
    request: pytest.FixtureRequest,
    write_policy: PolicyWriter,
    make_mesh: Callable[..., Mesh],
) -> Callable[[str, str, str | None, str | None], tuple[int, dict[str, Any]]]:
    kind = request.param

    def send(
        mode: str, path: str, token: str | None, peer: str | None
    ) -> tuple[int, dict[str, Any]]:
        mesh = make_mesh(write_policy(policy(mode)), watch=False)
        if kind == "asgi":
            return asgi(MeshMiddleware(_App(), mesh=mesh), path, token, peer)
        return wsgi(MeshWSGIMiddleware(wsgi_ok, mesh=mesh), path, token, peer)

    return send


def test_strict_refuses_plaintext_but_for_public_paths(call: Any, issuer: TokenIssuer) -> None:
    token = issuer.mint("orders", "inventory")
    status, body = call("strict", "/items/1", token, None)
    assert status == 403
    assert body["error"] == "forbidden" and "mtls is strict" in body["reason"]
    assert call("strict", "/healthz", None, None)[0] == 200
    assert call("strict", "/items/1", token, ORDERS)[0] == 200


@pytest.mark.parametrize("mode", ["permissive", "off"])
def test_other_modes_take_plaintext(call: Any, issuer: TokenIssuer, mode: str) -> None:
    assert call(mode, "/items/1", issuer.mint("orders", "inventory"), None)[0] == 200


@pytest.mark.parametrize("mode", ["strict", "permissive", "off"])
def test_the_token_must_name_the_certificates_service(
    call: Any, issuer: TokenIssuer, mode: str
) -> None:
    status, body = call(mode, "/items/1", issuer.mint("orders", "inventory"), GATEWAY)
    assert status == 401
    assert body["reason"] == (
        f"the identity token names {ORDERS} but the connection's certificate names {GATEWAY}"
    )


def test_mtls_off_is_read_from_a_bare_yaml_off(write_policy: PolicyWriter) -> None:
    from mesh_middleware.policy.compiled import compile_policy_file

    assert compile_policy_file(write_policy(policy("off"))).mtls == "off"
    assert compile_policy_file(write_policy("service: a\n")).mtls == "permissive"
