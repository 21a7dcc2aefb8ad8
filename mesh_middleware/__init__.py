"""mesh-middleware: a service mesh delivered as a Python library.

>>> from mesh_middleware import Mesh, MeshMiddleware, MeshWSGIMiddleware
"""

from __future__ import annotations

from mesh_middleware._version import __version__
from mesh_middleware.adapters.asgi import MeshMiddleware
from mesh_middleware.adapters.wsgi import MeshWSGIMiddleware
from mesh_middleware.errors import (
    IdentityError,
    MeshError,
    PathError,
    PolicyError,
    PolicyIssue,
    UnknownSigningKey,
)
from mesh_middleware.identity.issuer import TokenIssuer
from mesh_middleware.identity.verifier import CallerIdentity
from mesh_middleware.policy.authorization import AuthorizationDecision
from mesh_middleware.runtime.mesh import Mesh

__all__ = [
    "AuthorizationDecision",
    "CallerIdentity",
    "IdentityError",
    "Mesh",
    "MeshError",
    "MeshMiddleware",
    "MeshWSGIMiddleware",
    "PathError",
    "PolicyError",
    "PolicyIssue",
    "TokenIssuer",
    "UnknownSigningKey",
    "__version__",
    "get_caller",
]


def get_caller(scope_or_environ: object) -> CallerIdentity | None:
    """The verified caller of a request: pass an ASGI scope, a WSGI environ, or a request
    object with ``.scope`` (Starlette) or ``.environ`` (Flask/Werkzeug).

    >>> get_caller(request)  # doctest: +SKIP
    CallerIdentity(service='orders', ...)
    """
    holder = getattr(scope_or_environ, "scope", None) or getattr(scope_or_environ, "environ", None)
    mapping = holder if holder is not None else scope_or_environ
    if isinstance(mapping, dict):
        caller = mapping.get("mesh.caller")
        return caller if isinstance(caller, CallerIdentity) else None
    return None
