"""mesh-middleware: a service mesh delivered as a Python library.

>>> from mesh_middleware import Mesh, MeshMiddleware, MeshWSGIMiddleware
"""

from __future__ import annotations

# First: whether the compiled request path or its source is imported (see _compiled).
from mesh_middleware import _compiled  # noqa: F401
from mesh_middleware._version import __version__
from mesh_middleware.adapters.asgi import MeshMiddleware
from mesh_middleware.adapters.httpx import AsyncMeshTransport, MeshTransport
from mesh_middleware.adapters.httpx_errors import (
    CircuitOpen,
    DeadlineExceeded,
    NoHealthyInstances,
    RetryBudgetExhausted,
)
from mesh_middleware.adapters.wsgi import MeshWSGIMiddleware
from mesh_middleware.errors import (
    IdentityError,
    MeshError,
    PathError,
    PolicyError,
    PolicyIssue,
    UnknownSigningKey,
)
from mesh_middleware.identity.end_user import EndUser
from mesh_middleware.identity.issuer import TokenIssuer
from mesh_middleware.identity.verifier import CallerIdentity
from mesh_middleware.policy.authorization import AuthorizationDecision
from mesh_middleware.runtime.context import Deadline, current_deadline
from mesh_middleware.runtime.mesh import Mesh

__all__ = [
    "AsyncMeshTransport",
    "AuthorizationDecision",
    "CallerIdentity",
    "CircuitOpen",
    "Deadline",
    "DeadlineExceeded",
    "EndUser",
    "IdentityError",
    "Mesh",
    "MeshError",
    "MeshMiddleware",
    "MeshTransport",
    "MeshWSGIMiddleware",
    "NoHealthyInstances",
    "PathError",
    "PolicyError",
    "PolicyIssue",
    "RetryBudgetExhausted",
    "TokenIssuer",
    "UnknownSigningKey",
    "__version__",
    "get_caller",
    "get_deadline",
    "get_user",
]


def get_caller(scope_or_environ: object) -> CallerIdentity | None:
    """The verified caller of a request: pass an ASGI scope, a WSGI environ, or a request
    object with ``.scope`` (Starlette) or ``.environ`` (Flask/Werkzeug).

    >>> get_caller(request)  # doctest: +SKIP
    CallerIdentity(service='orders', ...)
    """
    caller = _request_value(scope_or_environ, "mesh.caller")
    return caller if isinstance(caller, CallerIdentity) else None


def get_user(scope_or_environ: object) -> EndUser | None:
    """The verified end user of a request (``None``: anonymous, or no ``end_users`` policy).

    Pass an ASGI scope, a WSGI environ, or a request object with ``.scope`` or ``.environ``.

    >>> get_user(request).claims["email"]  # doctest: +SKIP
    'alice@example.com'
    """
    user = _request_value(scope_or_environ, "mesh.user")
    return user if isinstance(user, EndUser) else None


def get_deadline(scope_or_environ: object = None) -> Deadline | None:
    """The deadline the caller of the request being served sent (``x-mesh-deadline-ms``).

    Pass an ASGI scope, a WSGI environ or a request object, or nothing to read it from the
    current context (it follows the request into sync handlers' threads).
    ``get_deadline(request).remaining()`` is the seconds left; ``None`` means no deadline.
    Outbound mesh calls made while serving the request never wait past it.
    """
    if scope_or_environ is None:
        return current_deadline.get()
    deadline = _request_value(scope_or_environ, "mesh.deadline")
    return deadline if isinstance(deadline, Deadline) else None


def _request_value(scope_or_environ: object, key: str) -> object:
    """What the middleware put under ``key`` in the request's ASGI scope or WSGI environ."""
    holder = getattr(scope_or_environ, "scope", None) or getattr(scope_or_environ, "environ", None)
    mapping = holder if holder is not None else scope_or_environ
    return mapping.get(key) if isinstance(mapping, dict) else None
