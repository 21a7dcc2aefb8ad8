"""Small real apps the tests serve with uvicorn and gunicorn (configured by MESH_* variables)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request, WebSocket
from flask import Flask, jsonify
from flask import request as flask_request

from mesh_middleware import Mesh, MeshMiddleware, MeshWSGIMiddleware, get_caller


def _caller_name(holder: Any) -> str | None:
    caller = get_caller(holder)
    return caller.service if caller else None


def make_fastapi_app() -> FastAPI:
    mesh = Mesh.from_env()
    state: dict[str, bool] = {"started": False}

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state["started"] = True
        yield
        mesh.close()

    app = FastAPI(lifespan=lifespan)
    app.add_middleware(MeshMiddleware, mesh=mesh)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"ok": True, "lifespan_started": state["started"]}

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE"])
    async def echo(path: str, request: Request) -> dict[str, Any]:
        return {"path": request.url.path, "caller": _caller_name(request), "method": request.method}

    @app.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_json({"caller": _caller_name(websocket)})
        await websocket.close()

    return app


def make_flask_app() -> Flask:
    mesh = Mesh.from_env()
    app = Flask(__name__)

    @app.get("/healthz")
    def healthz() -> Any:
        return jsonify(ok=True)

    @app.route("/<path:path>", methods=["GET", "POST", "PUT", "DELETE"])
    def echo(path: str) -> Any:
        return jsonify(
            path=flask_request.path,
            caller=_caller_name(flask_request),
            method=flask_request.method,
        )

    app.wsgi_app = MeshWSGIMiddleware(app.wsgi_app, mesh=mesh)  # type: ignore[method-assign]
    return app
