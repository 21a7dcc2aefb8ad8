"""inventory: a FastAPI app with the mesh inside it.

Run it the way ``mesh demo`` does::

    MESH_POLICY=sample_apps/inventory/policy.yaml MESH_JWKS=jwks.json \\
        python -m uvicorn sample_apps.inventory.app:app --port 8001

The mesh verifies every caller's identity token, authorizes it against ``policy.yaml`` and
injects the faults listed there, before a request reaches these handlers.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field

from mesh_middleware import Mesh, MeshMiddleware, get_caller

mesh = Mesh.from_env()  # MESH_POLICY, MESH_JWKS


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    yield
    mesh.close()


app = FastAPI(title="inventory", lifespan=lifespan)
app.add_middleware(MeshMiddleware, mesh=mesh)

ITEMS = {
    1: {"name": "espresso beans", "stock": 120},
    2: {"name": "milk frother", "stock": 14},
    3: {"name": "burr grinder", "stock": 9},
    4: {"name": "tamper", "stock": 40},
    5: {"name": "paper filters", "stock": 500},
}
_reservations = itertools.count(1)


class Reservation(BaseModel):
    item: int
    quantity: int = Field(default=1, ge=1, le=100)


def _caller(request: Request) -> str:
    caller = get_caller(request)
    return caller.service if caller is not None else "anonymous"


@app.get("/healthz")
def healthz() -> dict[str, object]:
    return {"status": "ok", "service": mesh.service, "pid": os.getpid()}


@app.get("/metrics")
def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


@app.get("/items/{item_id}")
def get_item(item_id: int, request: Request) -> dict[str, object]:
    item = ITEMS.get(item_id)
    if item is None:
        raise HTTPException(status_code=404, detail="no such item")
    return {"id": item_id, **item, "served_to": _caller(request)}


@app.post("/reserve")
def reserve(reservation: Reservation, request: Request) -> dict[str, object]:
    if reservation.item not in ITEMS:
        raise HTTPException(status_code=404, detail="no such item")
    return {
        "reservation": next(_reservations),
        "item": reservation.item,
        "quantity": reservation.quantity,
        "reserved_by": _caller(request),
    }


@app.get("/admin/stats")
def admin_stats() -> dict[str, object]:
    # Never reached through the mesh: the policy's `no-admin` rule denies /admin/* to everyone.
    return {"items": len(ITEMS)}
