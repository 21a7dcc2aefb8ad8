"""The gateway process for uvicorn: its Mesh from the environment, and the app around it.

Run it the way the shop contract (and ``mesh demo``) does::

    MESH_POLICY=sample_apps/gateway/policy.yaml MESH_REGISTRY_URL=http://127.0.0.1:7400 \\
    MESH_REPORT_INTERVAL=1s \\
        python -m uvicorn sample_apps.gateway.app:app --host 127.0.0.1 --port 8000 --no-access-log

The app itself is :func:`sample_apps.gateway.service.create_app`; tests build it around their
own Mesh.
"""

from __future__ import annotations

import os

from mesh_middleware import Mesh
from sample_apps.gateway.service import create_app

__all__ = ["app", "mesh"]

mesh = Mesh.from_env()  # MESH_POLICY, MESH_REGISTRY_URL, MESH_REPORT_INTERVAL
# The demo's chaos switch travels with requests only where SHOP_FORWARD_CHAOS=1 (mesh demo).
app = create_app(mesh, forward_chaos=os.environ.get("SHOP_FORWARD_CHAOS") == "1")
