"""MeshMiddleware called directly as ASGI: pass-through, key refetch, audit, fault statistics."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from mesh_middleware import Mesh, MeshMiddleware, TokenIssuer
from mesh_middleware.telemetry import metrics
from tests.conftest import PolicyWriter

Message = dict[str, Any]


class _App:
    """Records what reached it and answers 200."""

    def __init__(self) -> None:
        self.scopes: list[dict[str, Any]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.scopes.append(scope)
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})


def _scope(
    path: str, token: str | None = None, method: str = "GET", **headers: str
) -> dict[str, Any]:
    raw = [(k.encode(), v.encode()) for k, v in headers.items()]
    if token is not None:
        raw.append((b"x-mesh-identity", token.encode()))
    return {
        "type": "http",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": raw,
    }


async def _call(middleware: MeshMiddleware, scope: dict[str, Any]) -> tuple[int, bytes]:
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await middleware(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, body


def _run(middleware: MeshMiddleware, scope: dict[str, Any]) -> tuple[int, bytes]:
    return anyio.run(_call, middleware, scope)


PERMISSIVE = """\
service: inventory
inbound:
  authentication: permissive
"""


def test_lifespan_and_unknown_scopes_pass_through(
    write_policy: PolicyWriter, make_mesh: Callable[..., Mesh]
) -> None:
    """Lifespan messages go straight to the app, untouched."""
    app = _App()
    middleware = MeshMiddleware(app, mesh=make_mesh(write_policy(PERMISSIVE)))
    scope = {"type": "lifespan", "asgi": {"version": "3.0"}}

    async def main() -> None:
        await middleware(scope, None, None)

    anyio.run(main)
    assert app.scopes == [scope]


def test_permissive_lets_anonymous_callers_on(
    write_policy: PolicyWriter, make_mesh: Callable[..., Mesh]
) -> None:
    """Permissive authentication: no token is fine, the app sees caller None."""
    app = _App()
    middleware = MeshMiddleware(app, mesh=make_mesh(write_policy(PERMISSIVE)))
    assert _run(middleware, _scope("/x")) == (200, b"ok")
    assert app.scopes[0]["mesh.caller"] is None


def test_permissive_still_refuses_an_invalid_token(
    write_policy: PolicyWriter, make_mesh: Callable[..., Mesh]
) -> None:
    """An identity that is present but invalid is 401 in every mode."""
    middleware = MeshMiddleware(_App(), mesh=make_mesh(write_policy(PERMISSIVE)))
    status, body = _run(middleware, _scope("/x", "not-a-token"))
    assert status == 401 and json.loads(body)["error"] == "unauthenticated"


def test_unknown_kid_refetches_the_jwks_once(
    write_policy: PolicyWriter, make_mesh: Callable[..., Mesh], jwks_file: Path, issuer: TokenIssuer
) -> None:
    """A rotated key published in the JWKS is found by the refetch an unknown kid triggers."""
    mesh = make_mesh(write_policy(PERMISSIVE), watch=False)
    middleware = MeshMiddleware(_App(), mesh=mesh)
    rotated = TokenIssuer()
    jwks_file.write_text(json.dumps({"keys": issuer.jwks()["keys"] + rotated.jwks()["keys"]}))
    assert _run(middleware, _scope("/x", rotated.mint("orders", "inventory")))[0] == 200
    stranger = TokenIssuer().mint("orders", "inventory")
    status, body = _run(middleware, _scope("/x", stranger))
    assert status == 401 and "unknown signing key" in json.loads(body)["reason"]


def test_without_a_jwks_every_token_is_refused(
    write_policy: PolicyWriter, issuer: TokenIssuer
) -> None:
    """Fail closed: no keys configured means no identity can be verified."""
    with Mesh(write_policy(PERMISSIVE), watch=False) as mesh:
        middleware = MeshMiddleware(_App(), mesh=mesh)
        assert _run(middleware, _scope("/x", issuer.mint("orders", "inventory")))[0] == 401


def test_audit_mode_lets_through_and_counts(
    write_policy: PolicyWriter, make_mesh: Callable[..., Mesh], issuer: TokenIssuer
) -> None:
    """Audit mode never denies, and counts each would-be denial by rule."""
    policy = write_policy(
        """\
        service: audited
        inbound:
          authorization:
            mode: audit
            rules:
              - {name: no-deletes, action: deny, methods: [DELETE]}
        """
    )
    middleware = MeshMiddleware(_App(), mesh=make_mesh(policy))
    counter = metrics.AUTHORIZATION_DENIALS.labels("audited", "no-deletes", "audit")
    before = counter._value.get()
    token = issuer.mint("orders", "audited")
    assert _run(middleware, _scope("/x", token, method="DELETE"))[0] == 200
    assert counter._value.get() == before + 1


def test_policy_shorthand_builds_its_own_mesh(write_policy: PolicyWriter, jwks_file: Path) -> None:
    """MeshMiddleware(policy=...) is the shorthand of DESIGN §5b."""
    middleware = MeshMiddleware(
        _App(), policy=str(write_policy(PERMISSIVE)), jwks=jwks_file, watch=False
    )
    assert middleware.mesh.service == "inventory"
    with pytest.raises(TypeError):
        MeshMiddleware(_App())


def test_abort_percentage_follows_the_binomial_distribution(
    write_policy: PolicyWriter, make_mesh: Callable[..., Mesh]
) -> None:
    """Over 10,000 requests a 5% abort lands within 4.5 standard deviations of 500."""
    policy = write_policy(
        """\
        service: payments
        inbound:
          authentication: permissive
          faults:
            - name: flaky
              abort: {status: 503, percent: 5}
            - name: never
              delay: {duration: 1s}
        """
    )
    middleware = MeshMiddleware(_App(), mesh=make_mesh(policy))
    n, p = 10_000, 0.05

    async def main() -> int:
        aborted = 0
        for _ in range(n):
            status, _ = await _call(middleware, _scope("/pay"))
            aborted += status == 503
        return aborted

    aborted = anyio.run(main)
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(aborted - n * p) <= 4.5 * sigma, aborted


def test_a_fault_with_no_percent_never_fires(
    write_policy: PolicyWriter, make_mesh: Callable[..., Mesh]
) -> None:
    """A missing percent means 0: the fault is never injected."""
    policy = write_policy(
        """\
        service: payments
        inbound:
          authentication: permissive
          faults:
            - name: never
              abort: {status: 500}
        """
    )
    middleware = MeshMiddleware(_App(), mesh=make_mesh(policy))
    assert {_run(middleware, _scope("/pay"))[0] for _ in range(200)} == {200}


def test_a_failure_inside_the_mesh_fails_closed(
    write_policy: PolicyWriter, make_mesh: Callable[..., Mesh], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Should the engine itself break, the request is refused with a JSON 503, never a 500."""
    mesh = make_mesh(write_policy(PERMISSIVE))
    app = _App()
    middleware = MeshMiddleware(app, mesh=mesh)

    class Broken:
        def decide(self, *args: object) -> object:
            raise RuntimeError("bug")

    # The policy the engine reads, with an authorizer that breaks. (Compiled, the engine
    # refuses it for not being an Authorizer, before calling it: an exception all the same.)
    policy, audience = mesh._state
    monkeypatch.setattr(
        mesh, "_state", (dataclasses.replace(policy, authorizer=Broken()), audience)
    )
    status, body = _run(middleware, _scope("/x"))
    assert status == 503
    assert json.loads(body)["error"] == "mesh_unavailable"
    assert app.scopes == []


HEADER_POLICY = """\
service: inventory
inbound:
  authentication: permissive
  authorization:
    rules:
      - name: no-debug
        action: deny
        headers: {x-debug: {values: ["on"]}}
      - name: no-deletes
        action: deny
        methods: [DELETE]
"""


def test_a_repeated_header_that_a_rule_reads_is_refused(
    write_policy: PolicyWriter, make_mesh: Callable[..., Mesh]
) -> None:
    """Sending a checked header twice cannot make the policy and the app read different values."""
    middleware = MeshMiddleware(_App(), mesh=make_mesh(write_policy(HEADER_POLICY)))
    scope = _scope("/x")
    scope["headers"] += [(b"x-debug", b"on"), (b"x-debug", b"on")]
    status, body = _run(middleware, scope)
    assert status == 400
    assert json.loads(body)["reason"] == "header 'x-debug' appears more than once"
    single = _scope("/x", **{"x-debug": "on"})
    assert _run(middleware, single)[0] == 403
    repeated_unchecked = _scope("/x")
    repeated_unchecked["headers"] += [(b"accept", b"a"), (b"accept", b"b")]
    assert _run(middleware, repeated_unchecked)[0] == 200


def test_methods_are_matched_upper_case(
    write_policy: PolicyWriter, make_mesh: Callable[..., Mesh]
) -> None:
    """A lower-case method (which werkzeug routes as upper-case) meets the same rules."""
    middleware = MeshMiddleware(_App(), mesh=make_mesh(write_policy(HEADER_POLICY)))
    assert _run(middleware, _scope("/x", method="delete"))[0] == 403


def test_a_zero_percent_fault_still_comes_first(
    write_policy: PolicyWriter, make_mesh: Callable[..., Mesh]
) -> None:
    """Only the first fault whose match holds is rolled, even when its percentages are 0."""
    policy = write_policy(
        """\
        service: inventory
        inbound:
          authentication: permissive
          faults:
            - name: disabled
              match: {paths: [/items/*]}
              abort: {status: 500, percent: 0}
            - name: everything
              abort: {status: 503, percent: 100}
        """
    )
    middleware = MeshMiddleware(_App(), mesh=make_mesh(policy))
    assert _run(middleware, _scope("/items/1"))[0] == 200
    assert _run(middleware, _scope("/other"))[0] == 503


MOUNT_POLICY = """\
service: inventory
inbound:
  authentication: permissive
  authorization:
    rules:
      - {name: no-admin, action: deny, paths: [/admin, /admin/*]}
"""


def test_mounted_apps_are_authorized_on_the_path_they_route(
    write_policy: PolicyWriter, make_mesh: Callable[..., Mesh]
) -> None:
    """Under a Starlette Mount, the policy sees the path after the mount point, as the app does."""
    import httpx
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Mount, Route

    async def page(request: Any) -> PlainTextResponse:
        return PlainTextResponse(request.url.path)

    inner = Starlette(routes=[Route("/{rest:path}", page)])
    mesh = make_mesh(write_policy(MOUNT_POLICY))
    outer = Starlette(routes=[Mount("/inv", app=MeshMiddleware(inner, mesh=mesh))])

    async def main() -> list[tuple[int, str]]:
        transport = httpx.ASGITransport(app=outer)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            answers = []
            for path in ["/inv/admin", "/inv//admin", "/inv/items/../admin/x", "/inv/items/1"]:
                response = await client.get(path)
                answers.append((response.status_code, response.text))
            return answers

    answers = anyio.run(main)
    assert [status for status, _ in answers] == [403, 403, 403, 200]
    assert answers[3][1] == "/inv/items/1"
