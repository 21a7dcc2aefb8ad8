"""A tiny app that records mesh request metrics and serves them (real-server telemetry tests).

``uvicorn tests.support.metrics_app:app`` (ASGI) or ``gunicorn tests.support.metrics_app:wsgi_app``
(WSGI, several workers with ``PROMETHEUS_MULTIPROC_DIR``). ``GET /metrics`` answers
:func:`render_metrics` for the request's ``Accept`` header; ``/healthz`` answers ok without
recording; ``/populate`` gives every data-plane metric a sample; any other path is recorded as
one inbound request (``x-caller`` names the source service) and answers its pid, so tests can
tell which worker served it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from mesh_middleware.telemetry import metrics
from mesh_middleware.telemetry.exposition import render_metrics

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]

_inbound = metrics.RequestMetrics("destination")
_outbound = metrics.RequestMetrics("source")


def populate() -> None:
    """One sample in every data-plane metric (what promtool checks must see)."""
    _inbound.record("orders", "shop", "v1", "/items/{id}", "GET", 200, "-", 0.012, 0, 321)
    _inbound.record("anonymous", "shop", "v1", "/admin", "POST", 403, "DENIED", 0.001, 10, 64)
    _outbound.record("shop", "inventory", "v2", "default", "GET", 503, "RETRIED,BUDGET", 0.4, 0, 20)
    metrics.count_decision("shop", "orders-read", allowed=True, audit=False)
    metrics.count_decision("shop", None, allowed=False, audit=True)
    metrics.count_denial("shop", "admin-deny", audit=False)
    metrics.count_fault("shop", "slow-items", True, 503)
    metrics.count_reload("shop", ok=True)
    metrics.set_registry_state("shop", True, 0.0)
    metrics.count_registry_call("shop", "register", "ok")
    metrics.count_retry("shop", "inventory", "503")
    metrics.count_budget_exhausted("shop", "inventory")
    metrics.count_ejection("inventory")
    metrics.set_ejected_endpoints("inventory", 1)
    metrics.count_circuit_open("inventory")
    metrics.count_mirror_dropped()


def _route(path: str, method: str, caller: str | None, started: float) -> tuple[int, bytes]:
    if path == "/healthz":
        return 200, b"ok"
    if path == "/populate":
        populate()
        return 200, b"populated"
    body = str(os.getpid()).encode()
    _inbound.record(
        caller or "unknown",
        "metrics-app",
        "v1",
        path,
        method,
        200,
        metrics.NO_FLAGS,
        time.perf_counter() - started,
        0,
        len(body),
    )
    return 200, body


async def app(
    scope: Scope,
    receive: Callable[[], Awaitable[Message]],
    send: Callable[[Message], Awaitable[None]],
) -> None:
    if scope["type"] != "http":
        return
    started = time.perf_counter()
    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
    if scope["path"] == "/metrics":
        body, content_type = render_metrics(headers.get("accept"))
        status = 200
    else:
        status, body = _route(scope["path"], scope["method"], headers.get("x-caller"), started)
        content_type = "text/plain; charset=utf-8"
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", content_type.encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def wsgi_app(
    environ: dict[str, Any], start_response: Callable[[str, list[tuple[str, str]]], Any]
) -> Iterable[bytes]:
    started = time.perf_counter()
    path = environ.get("PATH_INFO", "/")
    if path == "/metrics":
        body, content_type = render_metrics(environ.get("HTTP_ACCEPT"))
    else:
        _, body = _route(path, environ["REQUEST_METHOD"], environ.get("HTTP_X_CALLER"), started)
        content_type = "text/plain; charset=utf-8"
    start_response("200 OK", [("Content-Type", content_type)])
    return [body]
