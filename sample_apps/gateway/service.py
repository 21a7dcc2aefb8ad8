"""gateway: the shop's public entry, a FastAPI app behind the mesh that calls the others.

Anyone may call ``/shop/*`` (``authentication: permissive``). Every call to another service
goes through one ``mesh.async_client()`` with ``http://<service>/...`` URLs: the mesh picks
the instance (90/10 between inventory's v1 and v2), retries, ejects failing instances,
mirrors reads to v2 and sends this service's identity token.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from mesh_middleware import Mesh, MeshMiddleware
from sample_apps.fastapi_errors import install_json_errors
from sample_apps.mesh_errors import mesh_refusal

__all__ = ["OrderRequest", "create_app", "mesh_failure"]

CLIENT_TIMEOUT = 10.0
"""A backstop per phase of each call; the policy's outbound ``timeout`` is the real bound."""


class OrderRequest(BaseModel):
    """What ``POST /shop/orders`` and ``POST /shop/reserve-direct`` take."""

    item: int
    quantity: int = Field(ge=1, le=100)


class _Upstreams:
    """The process's one mesh client, open between the lifespan's startup and shutdown."""

    def __init__(self) -> None:
        self._client: httpx.AsyncClient | None = None

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            raise RuntimeError("the gateway's mesh client is opened by the app's lifespan")
        return self._client

    @asynccontextmanager
    async def open(self, mesh: Mesh) -> AsyncIterator[None]:
        async with mesh.async_client(timeout=CLIENT_TIMEOUT) as client:
            self._client = client
            try:
                yield
            finally:
                self._client = None


def create_app(mesh: Mesh, *, forward_chaos: bool = False) -> FastAPI:
    """The gateway app, served behind ``mesh``; its lifespan opens the outbound client and
    closes it and the Mesh at shutdown.

    ``forward_chaos`` passes the caller's ``x-chaos`` header on to orders (and so to payments'
    fault). Only for demos: it lets anyone on the internet switch a fault on.
    """
    upstreams = _Upstreams()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async with upstreams.open(mesh):
            yield
        mesh.close()

    app = FastAPI(title="gateway", lifespan=lifespan)
    app.add_middleware(MeshMiddleware, mesh=mesh)
    install_json_errors(app)

    @app.get("/healthz")
    async def healthz() -> dict[str, object]:
        """Liveness, public: who this instance is."""
        return {
            "status": "ok",
            "service": mesh.service,
            "version": mesh.policy.loaded.policy.version or "",
            "instance": mesh.instance_id or str(os.getpid()),
            "pid": os.getpid(),
        }

    @app.get("/shop/items/{item_id}")
    async def shop_item(item_id: int) -> JSONResponse:
        """An item from inventory, with the version and instance that served it."""
        try:
            answer = await upstreams.client.get(f"http://inventory/items/{item_id}")
        except httpx.HTTPError as exc:
            return mesh_failure("inventory", exc)
        body = _json(answer)
        if answer.status_code >= 400 or body is None:
            return _passed_on("inventory", answer, body)
        inventory = {"version": body.get("version"), "instance": body.get("instance")}
        return JSONResponse({"item": body.get("item"), "inventory": inventory})

    @app.post("/shop/orders")
    async def shop_order(order: OrderRequest, request: Request) -> JSONResponse:
        """Place an order with orders; ``x-chaos`` is forwarded when allowed and sent."""
        chaos = request.headers.get("x-chaos") if forward_chaos else None
        headers = {"x-chaos": chaos} if chaos is not None else {}
        try:
            answer = await upstreams.client.post(
                "http://orders/orders", json=order.model_dump(), headers=headers
            )
        except httpx.HTTPError as exc:
            return mesh_failure("orders", exc)
        body = _json(answer)
        if body is None:
            return _passed_on("orders", answer, body)
        return JSONResponse(body, status_code=answer.status_code)

    @app.post("/shop/reserve-direct")
    async def reserve_direct(order: OrderRequest) -> JSONResponse:
        """Try to reserve stock without going through orders: inventory's policy refuses."""
        try:
            answer = await upstreams.client.post(
                "http://inventory/reserve", json=order.model_dump()
            )
        except httpx.HTTPError as exc:
            return mesh_failure("inventory", exc)
        body = _json(answer)
        if answer.status_code == 403 and body is not None:
            refused = {
                "error": "forbidden",
                "by": "inventory",
                "rule": body.get("rule"),
                "reason": body.get("reason"),
            }
            return JSONResponse(refused, status_code=403)
        return _passed_on("inventory", answer, body)

    return app


def mesh_failure(service: str, exc: httpx.HTTPError) -> JSONResponse:
    """The JSON answer for a call to ``service`` that got no answer of its own.

    The mesh's refusals are 503 (nothing healthy, circuit open, retry budget spent) or 504
    (deadline); a transport failure the mesh passed on is 502, a timeout 504.
    """
    status, name = mesh_refusal(exc)
    body = {"error": name, "service": service, "reason": str(exc) or type(exc).__name__}
    return JSONResponse(body, status_code=status)


def _json(answer: httpx.Response) -> dict[str, object] | None:
    """The answer's JSON object, or ``None`` when it is not one."""
    try:
        body = answer.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _passed_on(
    service: str, answer: httpx.Response, body: dict[str, object] | None
) -> JSONResponse:
    """An upstream's answer passed on with its status; a body that is not JSON is a 502."""
    if body is None:
        reason = f"{service} answered {answer.status_code} without a JSON object"
        return JSONResponse(
            {"error": "bad_upstream_answer", "service": service, "reason": reason},
            status_code=502,
        )
    return JSONResponse(body, status_code=answer.status_code)
