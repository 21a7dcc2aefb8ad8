"""orders: a Flask app behind the mesh, served by gunicorn with two workers.

An order reserves stock at inventory, then charges payments with the order id as its
``Idempotency-Key``: that key is what lets the mesh retry the charge (a POST) when payments
answers 503, so the chaos injected there never reaches the customer.
"""

from __future__ import annotations

import atexit
import os
import threading
import uuid
from collections import OrderedDict
from typing import Any

import httpx
from flask import Flask, request
from werkzeug.exceptions import HTTPException

from mesh_middleware import (
    Mesh,
    MeshWSGIMiddleware,
)
from sample_apps.mesh_errors import mesh_refusal

__all__ = ["WorkerClient", "create_app", "step_failure"]

CLIENT_TIMEOUT = 10.0
"""A backstop per phase of each call; the policy's outbound ``timeout`` is the real bound."""
_REMEMBERED_ORDERS = 10_000
"""Orders kept in each worker's memory; the oldest are forgotten first."""

Answer = tuple[dict[str, Any], int]


class WorkerClient:
    """One ``mesh.client()`` per process, made on first use.

    gunicorn may fork after this module is imported, and a connection pool must not be shared
    across a fork: each worker makes its own the first time it calls out, and closes it when
    it exits.
    """

    def __init__(self, mesh: Mesh) -> None:
        self._mesh = mesh
        self._lock = threading.Lock()
        self._owner: int | None = None
        self._client: httpx.Client | None = None

    def get(self) -> httpx.Client:
        """This process's client, made now if it has none yet."""
        pid = os.getpid()
        with self._lock:
            if self._client is None or self._owner != pid:
                # A client inherited from the parent is dropped, never closed: closing it
                # would close the parent's connections too.
                self._client = self._mesh.client(timeout=CLIENT_TIMEOUT)
                self._owner = pid
                atexit.register(self.close)
            return self._client

    def close(self) -> None:
        """Close this process's client, if it made one."""
        with self._lock:
            client, owner = self._client, self._owner
            self._client = None
        if client is not None and owner == os.getpid():
            client.close()


def create_app(mesh: Mesh, *, forward_chaos: bool = False) -> Flask:
    """The orders app, served behind ``mesh``; ``app.extensions["mesh_client"]`` is its
    :class:`WorkerClient`. ``forward_chaos`` passes ``x-chaos`` on to payments (demos only)."""
    app = Flask(__name__)
    app.wsgi_app = MeshWSGIMiddleware(app.wsgi_app, mesh=mesh)  # type: ignore[method-assign]
    upstreams = WorkerClient(mesh)
    app.extensions["mesh_client"] = upstreams
    orders: OrderedDict[str, dict[str, Any]] = OrderedDict()
    orders_lock = threading.Lock()

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Answer:
        return {"error": "http_error", "reason": exc.description or exc.name}, exc.code or 500

    @app.errorhandler(Exception)
    def crashed(exc: Exception) -> Answer:
        app.logger.exception("order failed")
        return {"error": "internal_error", "reason": type(exc).__name__}, 500

    @app.get("/healthz")
    def healthz() -> dict[str, object]:
        """Liveness, public: who this worker is."""
        return {
            "status": "ok",
            "service": mesh.service,
            "version": mesh.policy.loaded.policy.version or "",
            "instance": mesh.instance_id or str(os.getpid()),
            "pid": os.getpid(),
        }

    @app.post("/orders")
    def place_order() -> Answer:
        """Reserve the item at inventory, then charge payments; 201 with both answers."""
        wanted = _order_request(request.get_json(silent=True))
        if wanted is None:
            reason = 'expected {"item": int, "quantity": int from 1 to 100}'
            return {"error": "invalid_request", "reason": reason}, 422
        order_id = uuid.uuid4().hex
        client = upstreams.get()
        try:
            reserved = client.post("http://inventory/reserve", json=wanted)
        except httpx.HTTPError as exc:
            return step_failure("reserve", "inventory", exc)
        reservation = _json(reserved)
        if reserved.status_code != 200 or reservation is None:
            return _step_refused("reserve", "inventory", reserved, reservation)
        headers = {"Idempotency-Key": order_id}
        chaos = request.headers.get("x-chaos") if forward_chaos else None
        if chaos is not None:
            headers["x-chaos"] = chaos
        charge = {"order": order_id, "amount": reservation.get("amount", 0)}
        try:
            paid = client.post("http://payments/charge", json=charge, headers=headers)
        except httpx.HTTPError as exc:
            return step_failure("payment", "payments", exc)
        payment = _json(paid)
        if paid.status_code != 200 or payment is None:
            return _step_refused("payment", "payments", paid, payment)
        placed = {
            "order": order_id,
            "item": wanted["item"],
            "quantity": wanted["quantity"],
            "reserved": {
                "reservation": reservation.get("reservation"),
                "version": reservation.get("version"),
                "instance": reservation.get("instance"),
            },
            "payment": {"status": payment.get("status"), "instance": payment.get("instance")},
        }
        with orders_lock:
            orders[order_id] = placed
            if len(orders) > _REMEMBERED_ORDERS:
                orders.popitem(last=False)
        return placed, 201

    @app.get("/orders/<order_id>")
    def get_order(order_id: str) -> Answer:
        """An order this worker placed; another worker's order is ``"status": "unknown"``.

        Orders live in each worker's memory (a sample app has no database), and a request
        reaches whichever worker accepts it: the answer says which worker looked.
        """
        with orders_lock:
            placed = orders.get(order_id)
        if placed is None:
            return {"order": order_id, "status": "unknown", "worker": os.getpid()}, 200
        return {**placed, "status": "placed", "worker": os.getpid()}, 200

    return app


def step_failure(step: str, service: str, exc: httpx.HTTPError) -> Answer:
    """The JSON answer when a step's call to ``service`` got no answer of its own.

    The mesh's refusals are 503 (nothing healthy, circuit open, retry budget spent) or 504
    (deadline); a transport failure the mesh passed on is 502, a timeout 504.
    """
    status, error = mesh_refusal(exc)
    reason = str(exc) or type(exc).__name__
    return {"error": error, "step": step, "service": service, "reason": reason}, status


def _step_refused(
    step: str, service: str, answer: httpx.Response, body: dict[str, Any] | None
) -> Answer:
    """A step's upstream answered, but not with success: 502 naming the step, or the
    caller's own mistake (an unknown item, an invalid request) passed on as it is."""
    status = answer.status_code if answer.status_code in (404, 422) else 502
    failure = {
        "error": f"{step}_failed",
        "step": step,
        "service": service,
        "status": answer.status_code,
        "upstream": body,
    }
    return failure, status


def _order_request(body: object) -> dict[str, int] | None:
    """``{"item": int, "quantity": int}`` from a request body, or ``None`` when invalid."""
    if not isinstance(body, dict):
        return None
    item, quantity = body.get("item"), body.get("quantity")
    # `type(...) is int`, not isinstance: JSON's true is no quantity.
    if type(item) is not int or type(quantity) is not int or not 1 <= quantity <= 100:
        return None
    return {"item": item, "quantity": quantity}


def _json(answer: httpx.Response) -> dict[str, Any] | None:
    """The answer's JSON object, or ``None`` when it is not one."""
    try:
        body = answer.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None
