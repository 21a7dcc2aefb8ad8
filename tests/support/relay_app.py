"""``uvicorn tests.support.relay_app:app``: a FastAPI app that calls ``inventory`` per request.

Its policy comes from ``MESH_POLICY``. ``GET /relay`` calls ``http://inventory/x`` through the
mesh and reports what it saw: the deadline left on arrival, the upstream's answer or the
error, and how long the call took.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
from fastapi import FastAPI, Request

from mesh_middleware import Mesh, MeshMiddleware, get_deadline

mesh = Mesh.from_env()
app = FastAPI()
app.add_middleware(MeshMiddleware, mesh=mesh)
client = mesh.async_client()


@app.get("/healthz")
async def healthz() -> dict[str, bool]:
    return {"ok": True}


@app.get("/relay")
async def relay(request: Request) -> dict[str, Any]:
    deadline = get_deadline(request)
    left = deadline.remaining() if deadline is not None else None
    started = time.monotonic()
    try:
        answer = await client.get("http://inventory/x")
        outcome: Any = answer.json()
    except httpx.HTTPError as exc:
        outcome = type(exc).__name__
    return {"left": left, "outcome": outcome, "took": time.monotonic() - started}
