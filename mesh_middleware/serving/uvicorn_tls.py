"""uvicorn pieces for ``mesh run``: an HTTP protocol that tells the app who the TLS peer is,
and servers that share one process and stop together.

uvicorn does not give the app the client certificate (the ASGI TLS extension is not
implemented there), so the protocol used on the mutual-TLS listener reads it once per
connection and puts it in each request's scope: the SPIFFE ID at ``scope["mesh.peer"]`` (what
the middleware checks the identity token against) and the ASGI TLS extension at
``scope["extensions"]["tls"]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Generator
from typing import Any

import uvicorn
from uvicorn.config import Config

from mesh_middleware.defaults import PEER_KEY as PEER_SCOPE_KEY
from mesh_middleware.identity.x509 import peer_spiffe_id

__all__ = ["LinkedServer", "tell_peer"]


_TLS_VERSIONS = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}


def _tls_extension(ssl_object: ssl.SSLObject) -> dict[str, Any]:
    der = ssl_object.getpeercert(binary_form=True)
    return {
        "server_cert": None,
        "client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)] if der else [],
        "client_cert_name": None,
        "client_cert_error": None,
        "tls_version": _TLS_VERSIONS.get(ssl_object.version() or ""),
        "cipher_suite": None,
    }


def tell_peer(config: Config) -> None:
    """Load ``config`` and make its HTTP and websocket protocols tell apps the TLS peer."""
    if not config.loaded:
        config.load()
    config.http_protocol_class = _telling_peer(config.http_protocol_class)
    if config.ws_protocol_class is not None:
        # A websocket upgrade hands the connection to this class, with its own app reference.
        config.ws_protocol_class = _telling_peer(config.ws_protocol_class)


def _telling_peer(base: Any) -> type[asyncio.Protocol]:
    class MeshTLSProtocol(base):  # type: ignore[misc]
        app: Any

        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            ssl_object = transport.get_extra_info("ssl_object")
            if ssl_object is None:
                return
            peer = peer_spiffe_id(ssl_object.getpeercert())
            tls = _tls_extension(ssl_object)
            app = self.app

            async def with_peer(scope: Any, receive: Any, send: Any) -> None:
                scope[PEER_SCOPE_KEY] = peer
                extensions = scope.get("extensions")
                if extensions is None:
                    scope["extensions"] = {"tls": tls}
                else:
                    extensions["tls"] = tls
                await app(scope, receive, send)

            self.app = with_peer

    MeshTLSProtocol.__name__ = f"MeshTLS{base.__name__}"
    return MeshTLSProtocol


class LinkedServer(uvicorn.Server):
    """A uvicorn server that leaves signals to ``mesh run``, which stops all its servers."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield
