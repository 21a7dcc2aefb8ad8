"""Apps that show who their end user is, and call other mesh services on that user's behalf.

``uvicorn tests.support.end_user_app:asgi_app`` and
``gunicorn tests.support.end_user_app:wsgi_app``, configured by MESH_* variables.
``GET /call/SERVICE/PATH`` calls ``http://SERVICE/PATH`` through the mesh (httpx for the
FastAPI app, requests for the Flask app) and answers with the downstream's status and body;
every other path answers who the caller and end user are.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from flask import Flask, jsonify

from mesh_middleware import Mesh, MeshMiddleware, MeshWSGIMiddleware, get_caller, get_user


def _who(holder: Any) -> dict[str, Any]:
    caller, user = get_caller(holder), get_user(holder)
    return {
        "caller": caller.service if caller else None,
        "user": user.principal if user else None,
        "forwarded_by": user.forwarded_by if user else None,
        "claims": dict(user.claims) if user else None,
        "pid": os.getpid(),  # which worker answered
    }


def make_asgi_app() -> FastAPI:
    mesh = Mesh.from_env()

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async with mesh.async_client() as client:
            app.state.client = client
            yield
        mesh.close()

    app = FastAPI(lifespan=lifespan)
    app.add_middleware(MeshMiddleware, mesh=mesh)

    @app.get("/healthz")
    async def healthz() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/call/{service}/{path:path}")
    async def call(service: str, path: str, request: Request) -> dict[str, Any]:
        response = await request.app.state.client.get(f"http://{service}/{path}", timeout=5)
        return {"status": response.status_code, "body": response.json(), **_who(request)}

    @app.api_route("/{path:path}", methods=["GET", "POST"])
    async def echo(path: str, request: Request) -> dict[str, Any]:
        return {"path": request.url.path, **_who(request)}

    return app


def make_wsgi_app() -> Any:
    mesh = Mesh.from_env()
    app = Flask(__name__)
    session = mesh.requests_session()

    @app.get("/healthz")
    def healthz() -> Any:
        return jsonify(ok=True)

    @app.get("/call/<service>/<path:path>")
    def call(service: str, path: str) -> Any:
        from flask import request

        response = session.get(f"http://{service}/{path}", timeout=5)
        return jsonify(status=response.status_code, body=response.json(), **_who(request))

    @app.route("/<path:path>", methods=["GET", "POST"])
    def echo(path: str) -> Any:
        from flask import request

        return jsonify(path=f"/{path}", **_who(request))

    return MeshWSGIMiddleware(app, mesh=mesh)


def __getattr__(name: str) -> Any:
    # Built on first use, so importing one app never configures the other's Mesh.
    if name == "asgi_app":
        return make_asgi_app()
    if name == "wsgi_app":
        return make_wsgi_app()
    raise AttributeError(name)
