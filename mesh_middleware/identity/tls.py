"""TLS contexts for mutual TLS inside the mesh, with SPIFFE ID checks in the handshake.

A client checks that the server's certificate carries the SPIFFE ID of the service it meant to
call (the service name travels as the TLS server name); a server checks that the client's
certificate carries a SPIFFE ID of its trust domain. Both checks run inside ``do_handshake``,
so a wrong peer fails the handshake before a byte of the request is sent or read.

Certificates renew while connections are open. Servers and client pools are given one
:class:`SwappableContext` for their whole life; each handshake is done by the context current
at that moment, and a renewal only swaps which one that is. Connections already open keep the
certificate they were made with (as Envoy does on an SDS update).
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mesh_middleware.identity.spiffe import parse_service_id, service_id
from mesh_middleware.identity.x509 import peer_spiffe_id

__all__ = ["SwappableContext", "client_context", "server_context"]


def _check(connection: ssl.SSLObject | ssl.SSLSocket) -> None:
    context = connection.context
    trust_domain: str | None = getattr(context, "mesh_trust_domain", None)
    if trust_domain is None:
        return
    peer = peer_spiffe_id(connection.getpeercert())
    if connection.server_side:
        parsed = parse_service_id(peer) if peer is not None else None
        if parsed is None or parsed[0] != trust_domain:
            raise ssl.SSLCertVerificationError(
                f"the client certificate names no service of {trust_domain} (it names {peer})"
            )
        return
    expected = service_id(connection.server_hostname or "", trust_domain)
    if peer != expected:
        raise ssl.SSLCertVerificationError(
            f"the server certificate names {peer}, not {expected}: refusing the connection"
        )


class _CheckedObject(ssl.SSLObject):
    def do_handshake(self) -> None:
        super().do_handshake()
        _check(self)


class _CheckedSocket(ssl.SSLSocket):
    def do_handshake(self, block: bool = False) -> None:
        super().do_handshake(block)
        _check(self)


class _MeshContext(ssl.SSLContext):
    """A context that checks SPIFFE IDs during the handshake."""

    sslobject_class = _CheckedObject
    sslsocket_class = _CheckedSocket
    mesh_trust_domain: str


def _context(
    protocol: int,
    trust_domain: str,
    certificate: Path,
    key: Path,
    bundle: Sequence[str],
) -> _MeshContext:
    context = _MeshContext(protocol)
    context.mesh_trust_domain = trust_domain
    # TLS 1.3 only, as Linkerd: every peer is this library on OpenSSL 1.1.1 or later, and 1.3
    # has no renegotiation (the SPIFFE check and the peer an app is told cover the only
    # handshake a connection has).
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False  # the SPIFFE ID is checked instead (no DNS names here)
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata="".join(bundle))
    context.load_cert_chain(certificate, key)
    context.set_alpn_protocols(["http/1.1"])
    return context


def client_context(
    trust_domain: str, certificate: Path, key: Path, bundle: Sequence[str]
) -> ssl.SSLContext:
    """A client context presenting ``certificate`` and trusting only the mesh roots."""
    return _context(ssl.PROTOCOL_TLS_CLIENT, trust_domain, certificate, key, bundle)


def server_context(
    trust_domain: str, certificate: Path, key: Path, bundle: Sequence[str]
) -> ssl.SSLContext:
    """A server context presenting ``certificate`` and requiring a mesh client certificate."""
    return _context(ssl.PROTOCOL_TLS_SERVER, trust_domain, certificate, key, bundle)


class SwappableContext(ssl.SSLContext):
    """An ``SSLContext`` whose handshakes are done by whichever context was set last.

    Everything a server or client library does with it (``wrap_socket``, ``wrap_bio``) goes
    to the current context; settings they change on it (ALPN, CA files) do not, so the mesh's
    own settings always hold.
    """

    _current: ssl.SSLContext | None

    def __new__(cls, protocol: int, current: ssl.SSLContext | None = None) -> SwappableContext:
        self = super().__new__(cls, protocol)
        self._current = current
        return self

    def __init__(self, protocol: int, current: ssl.SSLContext | None = None) -> None:
        super().__init__()

    @property
    def ready(self) -> bool:
        """Whether a context is set (a handshake before that fails with ``ssl.SSLError``)."""
        return self._current is not None

    @property
    def current(self) -> ssl.SSLContext | None:
        """The context new handshakes use."""
        return self._current

    def swap(self, context: ssl.SSLContext) -> None:
        """Use ``context`` from the next handshake on (open connections are untouched)."""
        self._current = context

    def _now(self) -> ssl.SSLContext:
        current = self._current
        if current is None:
            raise ssl.SSLError("this instance has no mesh certificate yet")
        return current

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        return self._now().wrap_socket(*args, **kwargs)

    def wrap_bio(self, *args: Any, **kwargs: Any) -> ssl.SSLObject:
        return self._now().wrap_bio(*args, **kwargs)
