"""``uvicorn tests.support.tracecontext_app:app``: the service the W3C trace-context suite drives.

A Starlette app behind ``MeshMiddleware`` (policy from ``MESH_POLICY``). ``POST /test`` takes
the suite's JSON list of ``{"url": ..., "arguments": ...}`` and, for each, POSTs ``arguments``
as JSON to ``url`` through the mesh's async client, so the suite sees which ``traceparent`` and
``tracestate`` the mesh sends onwards for the request it made.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mesh_middleware import Mesh, MeshMiddleware

mesh = Mesh.from_env()
client = mesh.async_client(timeout=5)


async def healthz(request: Request) -> Response:
    return JSONResponse({"ok": True})


async def test(request: Request) -> Response:
    actions = await request.json()
    for action in actions if isinstance(actions, list) else [actions]:
        await client.post(action["url"], json=action.get("arguments") or [])
    return JSONResponse(None)


@contextlib.asynccontextmanager
async def lifespan(_: Starlette) -> AsyncIterator[None]:
    yield
    await client.aclose()
    mesh.close()


app = Starlette(
    routes=[Route("/healthz", healthz), Route("/test", test, methods=["POST"])],
    middleware=[Middleware(MeshMiddleware, mesh=mesh)],
    lifespan=lifespan,
)
