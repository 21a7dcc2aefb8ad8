"""Log correlation: structlog and stdlib logging lines carry the request's trace and span."""

from __future__ import annotations

import asyncio
import contextvars
import io
import logging
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import structlog
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from mesh_middleware.telemetry.log_context import (
    TraceContextFilter,
    add_trace_context,
    bind,
    current_log_context,
    unbind,
)

TRACE, SPAN = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


def test_bind_and_unbind_nest() -> None:
    assert current_log_context() is None
    outer = bind(TRACE, SPAN)
    inner = bind(TRACE, "b" * 16)
    assert current_log_context() == (TRACE, "b" * 16)
    unbind(inner)
    assert current_log_context() == (TRACE, SPAN)
    unbind(outer)
    assert current_log_context() is None


def test_the_structlog_processor_adds_the_ids_inside_a_request_only() -> None:
    assert add_trace_context(None, "info", {"event": "x"}) == {"event": "x"}
    token = bind(TRACE, SPAN)
    try:
        assert add_trace_context(None, "info", {"event": "x"}) == {
            "event": "x",
            "trace_id": TRACE,
            "span_id": SPAN,
        }
        given = {"event": "x", "trace_id": "mine"}
        assert add_trace_context(None, "info", given)["trace_id"] == "mine"
    finally:
        unbind(token)


@pytest.fixture
def stdlib_log() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(TraceContextFilter())
    handler.setFormatter(logging.Formatter("%(trace_id)s %(span_id)s %(message)s"))
    logger = logging.getLogger("test.log_context")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield logger, out
    logger.removeHandler(handler)


def test_the_stdlib_filter_sets_the_ids_and_blanks_outside_a_request(
    stdlib_log: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, out = stdlib_log
    logger.info("before")
    token = bind(TRACE, SPAN)
    try:
        logger.info("during")
        logger.info("own", extra={"trace_id": "given"})
    finally:
        unbind(token)
    assert out.getvalue().splitlines() == [
        "  before",
        f"{TRACE} {SPAN} during",
        f"given {SPAN} own",
    ]


def test_threads_that_copy_the_context_see_the_ids() -> None:
    """What anyio (Starlette's sync endpoints) does; a bare thread starts with no context."""
    seen: dict[str, Any] = {}
    token = bind(TRACE, SPAN)
    try:
        context = contextvars.copy_context()
        copied = threading.Thread(
            target=lambda: context.run(lambda: seen.update(copied=current_log_context()))
        )
        bare = threading.Thread(target=lambda: seen.update(bare=current_log_context()))
        copied.start()
        bare.start()
        copied.join()
        bare.join()
    finally:
        unbind(token)
    assert seen == {"copied": (TRACE, SPAN), "bare": None}


def test_concurrent_tasks_keep_their_own_ids() -> None:
    async def handle(trace: str) -> tuple[str, str] | None:
        token = bind(trace, SPAN)
        try:
            await asyncio.sleep(0.01)
            return current_log_context()
        finally:
            unbind(token)

    async def main() -> list[tuple[str, str] | None]:
        return await asyncio.gather(*(handle(f"{i:032x}") for i in range(1, 20)))

    assert asyncio.run(main()) == [(f"{i:032x}", SPAN) for i in range(1, 20)]


def _binding_asgi(app: Any) -> Any:
    """What the inbound middleware does: bind for the request's duration."""

    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        trace = dict(scope.get("headers", [])).get(b"x-trace", b"").decode()
        token = bind(trace, SPAN)
        try:
            await app(scope, receive, send)
        finally:
            unbind(token)

    return wrapped


def test_a_starlette_sync_endpoint_logs_with_the_requests_ids(
    stdlib_log: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, out = stdlib_log
    captured: list[dict[str, Any]] = []
    slog = structlog.wrap_logger(
        structlog.ReturnLogger(),
        processors=[add_trace_context, lambda _l, _m, ev: captured.append(dict(ev)) or ""],
    )

    def sync_endpoint(request: Request) -> PlainTextResponse:  # runs in anyio's thread pool
        assert threading.current_thread() is not threading.main_thread()
        logger.info("sync")
        slog.info("sync")
        return PlainTextResponse("ok")

    async def async_endpoint(request: Request) -> PlainTextResponse:
        logger.info("async")
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/sync", sync_endpoint), Route("/async", async_endpoint)])

    async def call() -> None:
        transport = httpx.ASGITransport(app=_binding_asgi(app))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            await client.get("/sync", headers={"x-trace": "a" * 32})
            await client.get("/async", headers={"x-trace": "b" * 32})

    asyncio.run(call())
    assert out.getvalue().splitlines() == [f"{'a' * 32} {SPAN} sync", f"{'b' * 32} {SPAN} async"]
    assert captured[0]["trace_id"] == "a" * 32


def test_a_wsgi_app_logs_with_the_requests_ids(
    stdlib_log: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, out = stdlib_log

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        logger.info("wsgi")
        start_response("200 OK", [])
        return [b"ok"]

    def binding(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        token = bind(environ["HTTP_X_TRACE"], SPAN)
        try:
            return app(environ, start_response)
        finally:
            unbind(token)

    binding({"HTTP_X_TRACE": "c" * 32}, lambda *a: None)
    assert out.getvalue() == f"{'c' * 32} {SPAN} wsgi\n"
