"""How the mesh's own HTTPS calls to a registry (and JWKS URLs) check the server."""

from __future__ import annotations

import os
import ssl

__all__ = ["registry_verify"]


def registry_verify() -> ssl.SSLContext | bool:
    """The system's trust store, plus ``MESH_REGISTRY_CA`` (a PEM file of the CA that signed
    an ``https://`` registry's certificate) when it is set."""
    path = os.environ.get("MESH_REGISTRY_CA")
    if not path:
        return True
    context = ssl.create_default_context()
    try:
        context.load_verify_locations(cafile=path)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(
            f"MESH_REGISTRY_CA={path}: not a readable PEM file of CAs ({exc})"
        ) from None
    return context
