"""The trivial Starlette JSON app the inbound benchmark serves, bare or behind the mesh.

Run by ``bench/inbound.py`` as ``uvicorn apps:app --app-dir bench``; configured through the
environment so both variants are the very same code:

- ``BENCH_MESH``: ``1`` wraps the app in :class:`~mesh_middleware.MeshMiddleware`, ``0`` (the
  default) serves it bare;
- ``BENCH_POLICY``: the policy file (required with ``BENCH_MESH=1``);
- ``BENCH_JWKS``: the JWKS file holding the key the benchmark's tokens are signed with.
"""

from __future__ import annotations

import os

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

__all__ = ["PACKAGE_LINE", "app", "create_app"]

PACKAGE_LINE = "bench app: mesh_middleware from "


async def get_item(request: Request) -> JSONResponse:
    item_id = request.path_params["item_id"]
    return JSONResponse({"id": item_id, "name": f"item-{item_id}", "price": 9.99, "stock": 7})


def create_app(meshed: bool | None = None) -> Starlette:
    """The benchmark app; ``meshed`` defaults to ``BENCH_MESH`` from the environment."""
    if meshed is None:
        meshed = os.environ.get("BENCH_MESH", "0") == "1"
    application = Starlette(routes=[Route("/items/{item_id:int}", get_item, methods=["GET"])])
    if meshed:
        import mesh_middleware
        from mesh_middleware import Mesh, MeshMiddleware

        # inbound.py --against reads this to check which checkout's package a server runs.
        print(f"{PACKAGE_LINE}{os.path.dirname(mesh_middleware.__file__)}", flush=True)

        policy = os.environ.get("BENCH_POLICY")
        if not policy:
            raise RuntimeError("BENCH_MESH=1 needs BENCH_POLICY (a policy file)")
        mesh = Mesh(policy, jwks=os.environ.get("BENCH_JWKS") or None)
        application.add_middleware(MeshMiddleware, mesh=mesh)
    return application


app = create_app()
