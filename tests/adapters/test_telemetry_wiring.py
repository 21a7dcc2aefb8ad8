"""What the middlewares and clients record per request: metrics with route templates, the
metrics page, flags, spans continuing the caller's trace, access log lines, log correlation."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import pytest
from flask import Flask
from prometheus_client import REGISTRY
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from mesh_middleware import Mesh, MeshMiddleware, MeshWSGIMiddleware
from mesh_middleware.policy.compiled import compile_policy_text
from mesh_middleware.runtime.context import current_span
from mesh_middleware.telemetry import log_context
from mesh_middleware.telemetry.reports import EdgeReporter

TRACE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


class InProcessClient:
    """Calls an ASGI app in-process, one event loop per call (Starlette's needs httpx2)."""

    def __init__(self, app: Any, base_url: str) -> None:
        self._app = app
        self._base_url = base_url

    def get(self, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
        return self.request("GET", path, headers)

    def post(self, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
        return self.request("POST", path, headers)

    def request(
        self, method: str, path: str, headers: dict[str, str] | None = None
    ) -> httpx.Response:
        async def call() -> httpx.Response:
            transport = httpx.ASGITransport(app=self._app)
            async with httpx.AsyncClient(transport=transport, base_url=self._base_url) as client:
                return await client.request(method, path, headers=headers)

        return anyio.run(call)

    def __enter__(self) -> InProcessClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None


def policy(service: str, extra: str = "", rules: str = "") -> str:
    inbound = f"inbound:\n  authentication: permissive\n{rules}"
    return f"service: {service}\n{inbound}{extra}"


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def starlette_app(seen: list[Any]) -> Starlette:
    async def item(request: Request) -> JSONResponse:
        span = current_span()
        seen.append((span, log_context.current_log_context()))
        (value,) = request.path_params.values()
        logging.getLogger("app").warning("serving %s", value)
        return JSONResponse({"item": value})

    inner = Starlette(routes=[Route("/orders/{n}", item)])
    return Starlette(routes=[Route("/items/{item}", item), Mount("/v2", app=inner)])


@pytest.fixture
def asgi() -> Iterator[tuple[InProcessClient, list[Any], Mesh]]:
    seen: list[Any] = []
    mesh = Mesh(
        compile_policy_text(
            policy(
                "wired",
                rules="  authorization:\n    rules:\n"
                "      - {name: no-admin, action: deny, paths: [/admin*]}\n",
            )
        ),
        watch=False,
    )
    app = MeshMiddleware(starlette_app(seen), mesh=mesh)
    with InProcessClient(app, base_url="http://wired") as client:
        yield client, seen, mesh
    mesh.close()


def test_inbound_requests_are_counted_by_route_template(
    asgi: tuple[InProcessClient, list[Any], Mesh],
) -> None:
    client, _, _ = asgi
    labels = {
        "reporter": "destination",
        "source_service": "anonymous",
        "destination_service": "wired",
        "destination_version": "unknown",
        "method": "GET",
        "response_flags": "-",
    }
    before = sample("mesh_requests_total", route="/items/{item}", response_code="200", **labels)
    mounted = sample("mesh_requests_total", route="/v2/orders/{n}", response_code="200", **labels)
    for n in range(3):
        assert client.get(f"/items/{n}").status_code == 200
    assert client.get("/v2/orders/7").status_code == 200
    after = sample("mesh_requests_total", route="/items/{item}", response_code="200", **labels)
    assert after - before == 3
    assert (
        sample("mesh_requests_total", route="/v2/orders/{n}", response_code="200", **labels)
        - (mounted)
        == 1
    )
    page = client.get("/metrics")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/plain")
    assert 'route="/items/{item}"' in page.text and 'route="/items/1"' not in page.text


def test_refusals_carry_flags(asgi: tuple[InProcessClient, list[Any], Mesh]) -> None:
    client, _, _ = asgi
    labels = {
        "reporter": "destination",
        "source_service": "anonymous",
        "destination_service": "wired",
        "destination_version": "unknown",
        "method": "GET",
        "route": "unmatched",
    }
    denied = sample("mesh_requests_total", response_code="403", response_flags="DENIED", **labels)
    late = sample("mesh_requests_total", response_code="504", response_flags="DEADLINE", **labels)
    assert client.get("/admin/x").status_code == 403
    assert client.get("/items/1", headers={"x-mesh-deadline-ms": "0"}).status_code == 504
    assert (
        sample("mesh_requests_total", response_code="403", response_flags="DENIED", **labels)
        == denied + 1
    )
    assert (
        sample("mesh_requests_total", response_code="504", response_flags="DEADLINE", **labels)
        == late + 1
    )


def test_authorization_decisions_are_counted_by_rule_action_and_mode(
    asgi: tuple[InProcessClient, list[Any], Mesh],
) -> None:
    client, _, _ = asgi

    def decisions(service: str, rule: str, action: str, mode: str = "enforce") -> float:
        return sample(
            "mesh_authorization_decisions_total",
            service=service,
            rule=rule,
            action=action,
            mode=mode,
        )

    allowed, denied = decisions("wired", "", "allow"), decisions("wired", "no-admin", "deny")
    for _ in range(2):
        assert client.get("/items/1").status_code == 200
    assert client.get("/admin/x").status_code == 403
    assert decisions("wired", "", "allow") == allowed + 2  # no allow rules: the default
    assert decisions("wired", "no-admin", "deny") == denied + 1

    audit = Mesh(
        compile_policy_text(
            policy(
                "audited",
                rules="  authorization:\n    mode: audit\n    rules:\n"
                "      - {name: reads, action: allow, methods: [GET]}\n",
            )
        ),
        watch=False,
    )
    with InProcessClient(MeshMiddleware(starlette_app([]), mesh=audit), "http://a") as audited:
        assert audited.get("/items/1").status_code == 200
        assert audited.post("/items/1").status_code == 405  # let through to the app
    assert decisions("audited", "reads", "allow") == 1
    assert decisions("audited", "", "deny", mode="audit") == 1
    audit.close()


def test_the_callers_trace_is_continued_and_app_logs_carry_it(
    asgi: tuple[InProcessClient, list[Any], Mesh], caplog: pytest.LogCaptureFixture
) -> None:
    client, seen, _ = asgi
    handler_filter = log_context.TraceContextFilter()
    caplog.handler.addFilter(handler_filter)
    client.get("/items/1", headers={"traceparent": TRACE, "tracestate": "vendor=a"})
    span, ids = seen[-1]
    assert span.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert span.span_id != "00f067aa0ba902b7" and span.tracestate == "vendor=a"
    assert ids == (span.trace_id, span.span_id)
    record = next(r for r in caplog.records if r.getMessage() == "serving 1")
    assert record.trace_id == span.trace_id and record.span_id == span.span_id  # type: ignore[attr-defined]
    client.get("/items/2", headers={"traceparent": "00-zz-bad-01"})
    fresh, _ = seen[-1]
    assert fresh.trace_id != "4bf92f3577b34da6a3ce929d0e0e4736"  # invalid: a new trace
    assert current_span() is None  # nothing leaks out of the request


def test_access_log_lines_when_the_policy_asks(capsys: pytest.CaptureFixture[str]) -> None:
    seen: list[Any] = []
    mesh = Mesh(
        compile_policy_text(policy("logged", "telemetry: {access_log: {enabled: true}}\n")),
        watch=False,
    )
    app = MeshMiddleware(starlette_app(seen), mesh=mesh)
    with InProcessClient(app, base_url="http://logged") as client:
        client.get("/items/5?secret=1", headers={"traceparent": TRACE, "x-request-id": "r-1"})
    mesh.close()  # writes the buffered lines
    lines = [
        json.loads(line) for line in capsys.readouterr().err.splitlines() if '"direction"' in line
    ]
    (line,) = lines
    assert line["direction"] == "inbound" and line["status"] == 200
    assert line["path"] == "/items/5" and line["route"] == "/items/{item}"
    assert line["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert line["request_id"] == "r-1" and line["caller"] == "anonymous"
    assert line["response_bytes"] == len(b'{"item":"5"}')


def test_flask_routes_and_metrics_page() -> None:
    flask_app = Flask("wired_flask")

    @flask_app.get("/things/<thing>")
    def thing(thing: str) -> dict[str, str]:
        return {"thing": thing}

    mesh = Mesh(compile_policy_text(policy("flasky")), watch=False)
    flask_app.wsgi_app = MeshWSGIMiddleware(flask_app.wsgi_app, mesh=mesh)  # type: ignore[method-assign]
    labels = {
        "reporter": "destination",
        "source_service": "anonymous",
        "destination_service": "flasky",
        "destination_version": "unknown",
        "method": "GET",
        "response_flags": "-",
        "response_code": "200",
        "route": "/things/<thing>",
    }
    before = sample("mesh_requests_total", **labels)
    client = flask_app.test_client()
    for n in range(2):
        answer = client.get(f"/things/{n}")
        assert answer.status_code == 200
        answer.close()
    assert sample("mesh_requests_total", **labels) == before + 2
    page = client.get("/metrics")
    assert page.status_code == 200 and b"mesh_requests_total" in page.data
    mesh.close()


def test_outbound_calls_are_counted_by_the_source_with_their_retries() -> None:
    attempts: list[str] = []

    def upstream(request: httpx.Request) -> httpx.Response:
        attempts.append(request.headers["traceparent"])
        if len(attempts) == 1:
            return httpx.Response(503)
        return httpx.Response(200, content=b"fine")

    mesh = Mesh(
        compile_policy_text(
            "service: caller\noutbound:\n  services:\n    callee:\n"
            "      retries: {on: [503]}\n"
            "      endpoints: [{url: 'http://127.0.0.1:9'}]\n"
        ),
        watch=False,
    )
    from mesh_middleware import MeshTransport

    labels = {
        "reporter": "source",
        "source_service": "caller",
        "destination_service": "callee",
        "destination_version": "unknown",
        "route": "default",
        "method": "GET",
        "response_code": "200",
        "response_flags": "RETRIED",
    }
    before = sample("mesh_requests_total", **labels)
    retries = sample(
        "mesh_outbound_retries_total",
        source_service="caller",
        destination_service="callee",
        reason="503",
    )
    reporter = mesh.reporter = EdgeReporter(lambda body: None, service="caller")
    transport = MeshTransport(mesh, transport=httpx.MockTransport(upstream))
    with httpx.Client(transport=transport) as client:
        assert client.get("http://callee/x").content == b"fine"
    assert sample("mesh_requests_total", **labels) == before + 1
    report = reporter.flush()
    assert report is not None
    [edge] = report["edges"]
    assert (edge["source"], edge["destination"], edge["retries"]) == ("caller", "callee", 1)
    assert (
        sample(
            "mesh_outbound_retries_total",
            source_service="caller",
            destination_service="callee",
            reason="503",
        )
        == retries + 1
    )
    first, second = attempts
    assert first.split("-")[1] == second.split("-")[1]  # one trace
    assert first.split("-")[2] != second.split("-")[2]  # a span per try
    mesh.close()


# -- what the registry's dashboard is told: denials with their rule, faults ---------------------

JUDGED_RULES = (
    "  authorization:\n    rules:\n"
    "      - {name: no-admin, action: deny, paths: [/admin*]}\n"
    "      - {name: anyone, action: allow}\n"
    "  faults:\n"
    "    - {name: slow, match: {paths: [/slow*]}, delay: {duration: 1ms, percent: 100}}\n"
    "    - {name: broken, match: {paths: [/broken*]}, abort: {status: 503, percent: 100}}\n"
)


def _judged(report: dict[str, Any] | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    assert report is not None
    [edge] = report["edges"]
    return report["denials"], edge


def test_denials_and_faults_are_reported_by_the_asgi_middleware() -> None:
    mesh = Mesh(compile_policy_text(policy("judged", rules=JUDGED_RULES)), watch=False)
    reporter = mesh.reporter = EdgeReporter(lambda body: None, service="judged")
    app = MeshMiddleware(starlette_app([]), mesh=mesh)
    with InProcessClient(app, base_url="http://judged") as client:
        assert client.get("/admin/x").status_code == 403
        assert client.get("/items/1").status_code == 200  # not reported beyond its edge
        assert client.get("/broken/1").status_code == 503
        assert client.get("/slow/1").status_code == 404
    denials, edge = _judged(reporter.flush())
    assert [(d["source"], d["method"], d["path"], d["status"], d["rule"]) for d in denials] == [
        ("anonymous", "GET", "/admin/x", 403, "no-admin")
    ]
    assert denials[0]["line"] is not None and "no-admin" in denials[0]["reason"]
    assert edge["faults"] == {"abort": 1, "delay": 1}
    mesh.close()


def test_denials_and_faults_are_reported_by_the_wsgi_middleware() -> None:
    flask_app = Flask("judged_flask")

    @flask_app.get("/items/<item>")
    def item(item: str) -> dict[str, str]:
        return {"item": item}

    mesh = Mesh(
        compile_policy_text(policy("judged", rules=JUDGED_RULES).replace("permissive", "strict")),
        watch=False,
    )
    reporter = mesh.reporter = EdgeReporter(lambda body: None, service="judged")
    flask_app.wsgi_app = MeshWSGIMiddleware(flask_app.wsgi_app, mesh=mesh)  # type: ignore[method-assign]
    client = flask_app.test_client()
    for path, status in (("/items/1", 401), ("/broken/1", 401)):
        answer = client.get(path)
        assert answer.status_code == status
        answer.close()
    denials, edge = _judged(reporter.flush())
    assert [(d["path"], d["status"], d["rule"]) for d in denials] == [
        ("/items/1", 401, None),
        ("/broken/1", 401, None),
    ]
    assert "identity" in denials[0]["reason"]
    assert "faults" not in edge  # refused before any fault was rolled
    mesh.close()
