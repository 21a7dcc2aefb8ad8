"""inventory: a FastAPI app behind the mesh, run as three instances of two versions.

Before a request reaches these handlers the mesh has verified the caller's identity
(``authentication: strict``) and authorized it against ``policy.yaml``: only ``orders`` may
reserve, ``gateway`` and ``orders`` may read items, nobody reaches ``/admin/*``.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from mesh_middleware import Mesh, MeshMiddleware, get_caller
from sample_apps.fastapi_errors import error, install_json_errors

__all__ = ["ITEMS", "Item", "create_app"]


class Item(BaseModel):
    """An article the shop sells."""

    id: int
    name: str
    price: float
    stock: int


ITEMS: dict[int, Item] = {
    item.id: item
    for item in (
        Item(id=1, name="espresso beans", price=14.5, stock=120),
        Item(id=2, name="milk frother", price=39.0, stock=14),
        Item(id=3, name="burr grinder", price=129.0, stock=9),
        Item(id=4, name="tamper", price=19.9, stock=40),
        Item(id=5, name="paper filters", price=4.2, stock=500),
    )
}


class Reservation(BaseModel):
    """What ``POST /reserve`` asks for."""

    item: int
    quantity: int = Field(default=1, ge=1, le=100)


def create_app(mesh: Mesh) -> FastAPI:
    """The inventory app, served behind ``mesh``, which it closes at shutdown."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        mesh.close()

    app = FastAPI(title="inventory", lifespan=lifespan)
    app.add_middleware(MeshMiddleware, mesh=mesh)
    install_json_errors(app)
    reservations = itertools.count(1)

    def who() -> dict[str, str]:
        # The version comes from the policy, which MESH_VERSION overrides for the canary.
        return {"version": mesh.policy.loaded.policy.version or "", "instance": _instance(mesh)}

    @app.get("/healthz")
    async def healthz() -> dict[str, object]:
        """Liveness, public: who this instance is."""
        return {"status": "ok", "service": mesh.service, **who(), "pid": os.getpid()}

    @app.get("/items/{item_id}")
    async def get_item(item_id: int, request: Request) -> JSONResponse:
        """One item, and which version and instance served it."""
        item = ITEMS.get(item_id)
        if item is None:
            return error(404, "not_found", f"no item {item_id}")
        return JSONResponse({"item": item.model_dump(), **who(), "caller": _caller(request)})

    @app.post("/reserve")
    async def reserve(reservation: Reservation, request: Request) -> JSONResponse:
        """Reserve some of an item (the policy lets only ``orders`` get here)."""
        item = ITEMS.get(reservation.item)
        if item is None:
            return error(404, "not_found", f"no item {reservation.item}")
        return JSONResponse(
            {
                "reservation": next(reservations),
                "item": item.id,
                "quantity": reservation.quantity,
                "amount": round(item.price * reservation.quantity, 2),
                **who(),
                "caller": _caller(request),
            }
        )

    @app.get("/admin/stats")
    async def admin_stats() -> dict[str, int]:
        """Never reached through the mesh: the policy's ``no-admin`` rule denies ``/admin/*``."""
        return {"items": len(ITEMS)}

    return app


def _instance(mesh: Mesh) -> str:
    """The catalog's instance id once registered, else the pid (standalone or still joining)."""
    return mesh.instance_id or str(os.getpid())


def _caller(request: Request) -> str:
    caller = get_caller(request)
    return caller.service if caller is not None else "anonymous"
