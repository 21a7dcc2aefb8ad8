"""The orders process for gunicorn: its Mesh from the environment, and the app around it.

Run it the way the shop contract (and ``mesh demo``) does::

    MESH_POLICY=sample_apps/orders/policy.yaml MESH_REGISTRY_URL=http://127.0.0.1:7400 \\
    MESH_REPORT_INTERVAL=1s PROMETHEUS_MULTIPROC_DIR=/tmp/orders-metrics \\
        python -m gunicorn --workers 2 --bind 127.0.0.1:8002 --graceful-timeout 5 \\
        sample_apps.orders.app:app

The app itself is :func:`sample_apps.orders.service.create_app`; tests build it around their
own Mesh.
"""

from __future__ import annotations

import os

from mesh_middleware import Mesh
from sample_apps.orders.service import create_app

__all__ = ["app", "mesh"]

mesh = Mesh.from_env()  # MESH_POLICY, MESH_REGISTRY_URL, MESH_REPORT_INTERVAL
# The demo's chaos switch travels with requests only where SHOP_FORWARD_CHAOS=1 (mesh demo).
app = create_app(mesh, forward_chaos=os.environ.get("SHOP_FORWARD_CHAOS") == "1")
