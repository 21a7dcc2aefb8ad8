"""orders: a Flask app with the mesh inside it, served by gunicorn.

Run it the way ``mesh demo`` does::

    MESH_POLICY=sample_apps/orders/policy.yaml MESH_JWKS=jwks.json \\
        python -m gunicorn -w 2 -b 127.0.0.1:8002 sample_apps.orders.app:app

Each gunicorn worker imports this module, so each builds its own Mesh (one per process).
Authentication is permissive and authorization runs in audit mode: anonymous orders go
through, and the mesh logs ``request_would_be_denied`` for each of them.
"""

from __future__ import annotations

import itertools
import os

from flask import Flask, request

from mesh_middleware import Mesh, MeshWSGIMiddleware, get_caller

mesh = Mesh.from_env()  # MESH_POLICY, MESH_JWKS

app = Flask(__name__)
app.wsgi_app = MeshWSGIMiddleware(app.wsgi_app, mesh=mesh)  # type: ignore[method-assign]

_order_numbers = itertools.count(1)


def _caller() -> str:
    caller = get_caller(request)
    return caller.service if caller is not None else "anonymous"


@app.get("/healthz")
def healthz() -> dict[str, object]:
    return {"status": "ok", "service": mesh.service, "pid": os.getpid()}


@app.post("/orders")
def place_order() -> tuple[dict[str, object], int]:
    number = f"{os.getpid()}-{next(_order_numbers)}"
    return {"order": number, "placed_by": _caller(), "worker": os.getpid()}, 201


@app.get("/orders/<order_id>")
def get_order(order_id: str) -> dict[str, object]:
    return {"order": order_id, "status": "placed", "asked_by": _caller(), "worker": os.getpid()}
