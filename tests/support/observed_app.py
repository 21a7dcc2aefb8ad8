"""``uvicorn tests.support.observed_app:app``: one meshed FastAPI app, two roles by its policy.

Configured by ``MESH_*`` variables like ``asgi_app`` (the policy's ``service:`` names it).

- ``GET /orders/{n}`` calls ``http://inventory/items/{n}`` through ``mesh.async_client()`` and
  answers ``{"service": "orders", "n": n, "inventory": <inventory's answer>}`` with
  inventory's status (a call that got no answer is a 502 naming the error).
- ``GET /items/{n}`` answers ``{"service": ..., "n": n, "caller": <verified caller or null>,
  "traceparent": <the traceparent header it received>}``.

``MESH_REPORT_INTERVAL`` (read by ``Mesh.from_env``) shortens the edge-report interval.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from mesh_middleware import Mesh, MeshMiddleware, get_caller

mesh = Mesh.from_env()
client = mesh.async_client(timeout=5)


@contextlib.asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    yield
    await client.aclose()
    mesh.close()


app = FastAPI(lifespan=lifespan)
app.add_middleware(MeshMiddleware, mesh=mesh)


@app.get("/healthz")
async def healthz() -> dict[str, Any]:
    return {"ok": True, "service": mesh.service}


@app.get("/orders/{n}")
async def order(n: int) -> JSONResponse:
    try:
        answer = await client.get(f"http://inventory/items/{n}")
    except httpx.HTTPError as exc:
        return JSONResponse({"service": mesh.service, "n": n, "error": repr(exc)}, 502)
    try:
        body: Any = answer.json()
    except ValueError:
        body = answer.text
    return JSONResponse({"service": mesh.service, "n": n, "inventory": body}, answer.status_code)


@app.get("/items/{n}")
async def item(n: int, request: Request) -> dict[str, Any]:
    caller = get_caller(request)
    return {
        "service": mesh.service,
        "n": n,
        "caller": caller.service if caller is not None else None,
        "traceparent": request.headers.get("traceparent"),
    }
