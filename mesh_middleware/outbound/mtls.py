"""How a call reaches an instance that serves mutual TLS: the rules both client adapters share.

Over TLS when this instance holds a mesh certificate; else on the instance's plaintext port if
it has one (``mtls: permissive``) and this service's own policy is not ``mtls: strict`` (which
never downgrades); else not at all, a failure on this side that is not held against the
instance.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING

from mesh_middleware.discovery.endpoints import Endpoint, EndpointSet
from mesh_middleware.identity.tls import SwappableContext

if TYPE_CHECKING:
    from mesh_middleware.runtime.mesh import Mesh

__all__ = ["NoCertificate", "certificate_due", "client_context", "over_tls"]


class NoCertificate(Exception):
    """A mutual-TLS-only instance, and no certificate here to present; says why."""


def over_tls(mesh: Mesh, service: str, endpoint: Endpoint) -> bool:
    """For an ``endpoint`` serving mutual TLS: ``True`` to call it over TLS, ``False`` to call
    its plaintext port; ``NoCertificate`` when neither may be done. Never blocks."""
    if mesh.client_tls(wait=0) is not None:
        return True
    mode = mesh.policy.mtls
    if endpoint.plain_port is not None and mode != "strict":
        return False
    raise NoCertificate(
        f"{service} takes only mutual TLS and this instance holds no mesh certificate"
        + (" (its policy says mtls: off)" if mode == "off" else "")
    )


def certificate_due(mesh: Mesh, endpoints: EndpointSet | None) -> bool:
    """Whether to fetch this instance's certificate before a first try (waiting a little): some
    instance of the destination serves mutual TLS, and none is held yet."""
    tls = mesh.tls
    return endpoints is not None and endpoints.tls and tls is not None and not tls.ready


def client_context(mesh: Mesh) -> ssl.SSLContext:
    """The context mutual-TLS connections are made with, for the Mesh's whole life. Without
    mesh TLS at all, one that can make no handshake: never an unchecked one."""
    tls = mesh.tls
    return tls.client if tls is not None else SwappableContext(ssl.PROTOCOL_TLS_CLIENT)
