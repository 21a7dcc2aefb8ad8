"""``uvicorn tests.support.upstream:app``: an upstream instance for outbound tests.

Configured by the environment: ``UPSTREAM_NAME`` (reported by every answer),
``UPSTREAM_DELAY_MS`` (added to every answer but ``/healthz``), ``UPSTREAM_FAIL_PERCENT``
(that share of answers are 503s, drawn at random) and ``UPSTREAM_RETRY_AFTER`` (sent with
those 503s). ``GET /stats`` counts what arrived, by method and shadow or not; ``/reset``
clears the counts.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections import Counter
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

NAME = os.environ.get("UPSTREAM_NAME", "upstream")
DELAY = float(os.environ.get("UPSTREAM_DELAY_MS", "0")) / 1000
FAIL_PERCENT = float(os.environ.get("UPSTREAM_FAIL_PERCENT", "0"))
RETRY_AFTER = os.environ.get("UPSTREAM_RETRY_AFTER")

counts: Counter[str] = Counter()
seen_headers: dict[str, str | None] = {}

_REPORTED = ("host", "x-mesh-identity", "traceparent", "x-mesh-deadline-ms", "x-mesh-shadow")


async def healthz(request: Request) -> Response:
    return JSONResponse({"ok": True, "name": NAME})


async def stats(request: Request) -> Response:
    return JSONResponse({"name": NAME, "counts": dict(counts), "last_headers": seen_headers})


async def reset(request: Request) -> Response:
    counts.clear()
    return JSONResponse({"ok": True})


async def anything(request: Request) -> Response:
    shadow = request.headers.get("x-mesh-shadow") is not None
    counts[f"{request.method} shadow" if shadow else request.method] += 1
    if not shadow:
        seen_headers.update({name: request.headers.get(name) for name in _REPORTED})
    await request.body()
    if DELAY:
        await asyncio.sleep(DELAY)
    if FAIL_PERCENT and random.random() * 100 < FAIL_PERCENT:
        headers = {"retry-after": RETRY_AFTER} if RETRY_AFTER else None
        return JSONResponse({"name": NAME, "error": "injected"}, status_code=503, headers=headers)
    return JSONResponse(
        {
            "name": NAME,
            "path": request.url.path,
            "method": request.method,
            "headers": {name: request.headers.get(name) for name in _REPORTED},
        }
    )


async def redirect(request: Request) -> Response:
    """``/redirect?to=URL``: a 302 to anywhere (a relative URL too)."""
    return Response(status_code=302, headers={"location": request.query_params["to"]})


async def drip(request: Request) -> Response:
    """``/drip?chunks=N&every=S``: a body trickled one chunk every S seconds."""
    chunks = int(request.query_params.get("chunks", "10"))
    every = float(request.query_params.get("every", "0.2"))

    async def body() -> AsyncIterator[bytes]:
        for _ in range(chunks):
            await asyncio.sleep(every)
            yield b"x"

    return StreamingResponse(body(), media_type="text/plain")


app = Starlette(
    routes=[
        Route("/healthz", healthz),
        Route("/stats", stats),
        Route("/reset", reset, methods=["POST"]),
        Route("/redirect", redirect),
        Route("/drip", drip),
        Route("/{path:path}", anything, methods=["GET", "POST", "PUT", "DELETE", "PATCH"]),
    ]
)
