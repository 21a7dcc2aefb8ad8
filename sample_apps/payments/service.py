"""payments: a FastAPI app behind the mesh, run as two instances (payments-a, payments-b).

Only ``orders`` may charge (``policy.yaml``). A request carrying ``x-chaos: on`` is answered
503 by the mesh a quarter of the time, before it gets here: orders' retries hide that.
"""

from __future__ import annotations

import itertools
import os
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Header
from pydantic import BaseModel, Field

from mesh_middleware import Mesh, MeshMiddleware
from sample_apps.fastapi_errors import install_json_errors

__all__ = ["Charge", "create_app"]

_REMEMBERED_KEYS = 10_000
"""Idempotency keys kept per process; the oldest are forgotten first."""


class Charge(BaseModel):
    """What ``POST /charge`` asks for."""

    order: str = Field(min_length=1, max_length=100)
    amount: float = Field(ge=0)


def create_app(mesh: Mesh) -> FastAPI:
    """The payments app, served behind ``mesh``, which it closes at shutdown."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        mesh.close()

    app = FastAPI(title="payments", lifespan=lifespan)
    app.add_middleware(MeshMiddleware, mesh=mesh)
    install_json_errors(app)
    charge_numbers = itertools.count(1)
    # A retried charge (same Idempotency-Key) that reaches this instance again is answered
    # with the first charge, not charged twice.
    charged: OrderedDict[str, int] = OrderedDict()

    @app.get("/healthz")
    async def healthz() -> dict[str, object]:
        """Liveness, public: who this instance is."""
        return {
            "status": "ok",
            "service": mesh.service,
            "version": mesh.policy.loaded.policy.version or "",
            "instance": _instance(mesh),
            "pid": os.getpid(),
        }

    @app.post("/charge")
    async def charge(
        charge: Charge, idempotency_key: str | None = Header(default=None, max_length=200)
    ) -> dict[str, object]:
        """Charge an order; the same ``Idempotency-Key`` is charged once per instance."""
        replayed = idempotency_key is not None and idempotency_key in charged
        if idempotency_key is None:
            number = next(charge_numbers)
        elif replayed:
            number = charged[idempotency_key]
        else:
            number = charged[idempotency_key] = next(charge_numbers)
            if len(charged) > _REMEMBERED_KEYS:
                charged.popitem(last=False)
        return {
            "status": "charged",
            "charge": number,
            "order": charge.order,
            "amount": charge.amount,
            "replayed": replayed,
            "instance": _instance(mesh),
        }

    return app


def _instance(mesh: Mesh) -> str:
    """The catalog's instance id once registered, else the pid (standalone or still joining)."""
    return mesh.instance_id or str(os.getpid())
