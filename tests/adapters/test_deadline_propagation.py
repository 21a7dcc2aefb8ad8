"""Deadlines and trace context from an inbound request to the outbound calls it makes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from mesh_middleware import Mesh, MeshMiddleware, MeshWSGIMiddleware, get_deadline
from mesh_middleware.policy.compiled import compile_policy_text
from mesh_middleware.runtime.context import current_deadline, current_span
from tests.support.servers import free_port, running, uvicorn_argv

PERMISSIVE = "service: inventory\ninbound: {authentication: permissive}\n"
TRACE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


class _App:
    """Records the deadline and trace it could read, and answers 200."""

    def __init__(self) -> None:
        self.seen: list[tuple[Any, Any, Any]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.seen.append((get_deadline(scope), get_deadline(), current_span()))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def _asgi(middleware: MeshMiddleware, headers: dict[str, str]) -> tuple[int, bytes]:
    sent: list[dict[str, Any]] = []
    scope = {
        "type": "http",
        "method": "GET",
        "path": "/x",
        "raw_path": b"/x",
        "query_string": b"",
        "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
    }

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    anyio.run(middleware, scope, receive, send)
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


def test_asgi_an_expired_deadline_is_504_before_the_app() -> None:
    app = _App()
    middleware = MeshMiddleware(app, mesh=Mesh(compile_policy_text(PERMISSIVE), watch=False))
    status, body = _asgi(middleware, {"x-mesh-deadline-ms": "0"})
    assert status == 504 and json.loads(body)["error"] == "deadline_exceeded"
    assert app.seen == []


def test_asgi_the_app_reads_the_deadline_and_the_trace() -> None:
    app = _App()
    middleware = MeshMiddleware(app, mesh=Mesh(compile_policy_text(PERMISSIVE), watch=False))
    status, _ = _asgi(middleware, {"x-mesh-deadline-ms": "1500", "traceparent": TRACE})
    assert status == 200
    from_scope, from_context, trace = app.seen[0]
    assert from_scope is from_context and 1.3 < from_scope.remaining() <= 1.5
    assert trace is not None and trace.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert trace.span_id != "00f067aa0ba902b7"  # this request's own span, a child of the caller's
    assert current_deadline.get() is None and current_span() is None  # reset
    _asgi(middleware, {})
    no_deadline, none_either, new_trace = app.seen[1]
    assert no_deadline is None and none_either is None
    assert new_trace is not None and new_trace.trace_id != "4bf92f3577b34da6a3ce929d0e0e4736"


def _wsgi_app(seen: list[Any]) -> Any:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        seen.append((get_deadline(environ), get_deadline(), current_span()))
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    return app


def test_wsgi_deadlines_and_traces() -> None:
    seen: list[Any] = []
    mesh = Mesh(compile_policy_text(PERMISSIVE), watch=False)
    middleware = MeshWSGIMiddleware(_wsgi_app(seen), mesh=mesh)
    statuses: list[str] = []

    def start_response(status: str, headers: Any) -> None:
        statuses.append(status)

    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/x", "HTTP_X_MESH_DEADLINE_MS": "0"}
    body = b"".join(middleware(environ, start_response))
    assert statuses[-1].startswith("504") and json.loads(body)["error"] == "deadline_exceeded"
    assert seen == []
    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/x",
        "HTTP_X_MESH_DEADLINE_MS": "2000",
        "HTTP_TRACEPARENT": TRACE,
    }
    b"".join(middleware(environ, start_response))
    from_environ, from_context, trace = seen[0]
    assert from_environ is from_context and 1.8 < from_environ.remaining() <= 2.0
    assert trace is not None and current_deadline.get() is None


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, int]]:
    """A slow upstream (400 ms) and a FastAPI app that calls it through the mesh."""
    slow, port = free_port(), free_port()
    policy = Path(tmp_path_factory.mktemp("relay")) / "policy.yaml"
    policy.write_text(
        "service: relay\ninbound: {authentication: permissive}\noutbound:\n  services:\n"
        f"    inventory:\n      endpoints: [{{url: 'http://127.0.0.1:{slow}'}}]\n"
    )
    upstream = uvicorn_argv("tests.support.upstream:app", slow)
    with (
        running(upstream, port=slow, env={"UPSTREAM_DELAY_MS": "400"}),
        running(
            uvicorn_argv("tests.support.relay_app:app", port),
            port=port,
            env={"MESH_POLICY": str(policy)},
        ),
    ):
        yield port, slow


@pytest.mark.slow
def test_a_callers_deadline_bounds_the_calls_made_for_it(relay: tuple[int, int]) -> None:
    port, _ = relay
    url = f"http://127.0.0.1:{port}/relay"
    with httpx.Client(timeout=10) as client:
        hurried = client.get(url, headers={"x-mesh-deadline-ms": "150"}).json()
        patient = client.get(url, headers={"x-mesh-deadline-ms": "3000"}).json()
        unbounded = client.get(url).json()
    assert 0 < hurried["left"] <= 0.15
    assert hurried["outcome"] == "DeadlineExceeded" and hurried["took"] < 0.35
    assert patient["outcome"]["name"] == "upstream" and 2.5 < patient["left"] <= 3.0
    # the upstream saw what was left of the caller's deadline, not the 5 s default
    assert int(patient["outcome"]["headers"]["x-mesh-deadline-ms"]) <= 3000
    assert unbounded["left"] is None and unbounded["outcome"]["name"] == "upstream"
    assert int(unbounded["outcome"]["headers"]["x-mesh-deadline-ms"]) > 4000
