"""gunicorn pieces for ``mesh run --server gunicorn``: a sync worker that does the mesh's
mutual TLS on the TLS port and tells the app who the peer is.

gunicorn would wrap every listener with one TLS configuration; the mesh needs TLS on one port
and plaintext on the other (``mtls: permissive``), a context that follows renewals, and the
client certificate in the WSGI environ. So the worker does the TLS itself: the master (the
``mesh run`` process) renews the files, and each worker reloads them, looking at most once a
second when a connection arrives.
"""

from __future__ import annotations

import os
import ssl
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gunicorn.app.base import BaseApplication
from gunicorn.util import import_app
from gunicorn.workers.sync import SyncWorker

from mesh_middleware.defaults import PEER_KEY as PEER_ENVIRON_KEY
from mesh_middleware.identity.x509 import peer_spiffe_id
from mesh_middleware.runtime.certificates import TLSContexts, TLSFiles

if TYPE_CHECKING:
    from mesh_middleware.runtime.certificates import CertificateManager
    from mesh_middleware.serving.run import RunOptions

__all__ = ["MeshSyncWorker", "serve_gunicorn"]

_RELOAD_CHECK_SECONDS = 1.0
_HANDSHAKE_SECONDS = 5.0


class MeshSyncWorker(SyncWorker):  # type: ignore[misc]
    """gunicorn's sync worker, with mutual TLS on ``MESH_TLS_PORT``."""

    wsgi: Any

    def init_process(self) -> None:
        directory = os.environ.get("MESH_TLS_DIR")
        port = os.environ.get("MESH_TLS_PORT")
        self._mesh_tls_port = int(port) if port and port.isdigit() else None
        self._mesh_contexts: TLSContexts | None = None
        self._mesh_checked = 0.0
        self._mesh_peer: str | None = None
        self._mesh_secure = False
        if directory is not None:
            self._mesh_contexts = TLSContexts(TLSFiles(Path(directory)))
            self._mesh_contexts.reload_if_changed()
        super().init_process()

    def load_wsgi(self) -> None:
        super().load_wsgi()
        app: Any = self.wsgi

        def with_peer(
            environ: dict[str, Any], start_response: Callable[..., Any]
        ) -> Iterable[bytes]:
            if self._mesh_secure:
                environ[PEER_ENVIRON_KEY] = self._mesh_peer
                environ["wsgi.url_scheme"] = "https"
            return app(environ, start_response)  # type: ignore[no-any-return]

        self.wsgi = with_peer

    def handle(self, listener: Any, client: Any, addr: Any) -> None:
        self._mesh_secure = False
        self._mesh_peer = None
        contexts = self._mesh_contexts
        if contexts is not None and listener.getsockname()[1] == self._mesh_tls_port:
            now = time.monotonic()
            if now - self._mesh_checked >= _RELOAD_CHECK_SECONDS:
                self._mesh_checked = now
                contexts.reload_if_changed()
            try:
                # Not the worker's whole timeout: an idle connection must not stall it that long.
                client.settimeout(_HANDSHAKE_SECONDS)
                client = contexts.server.wrap_socket(client, server_side=True)
                client.settimeout(None)
            except (OSError, ssl.SSLError) as exc:
                self.log.info("mesh mTLS handshake refused from %s: %s", addr, exc)
                client.close()
                return
            self._mesh_peer = peer_spiffe_id(client.getpeercert())
            self._mesh_secure = True
        super().handle(listener, client, addr)


class _Application(BaseApplication):  # type: ignore[misc]
    def __init__(self, app: str, settings: dict[str, Any]) -> None:
        self._app = app
        self._settings = settings
        super().__init__()

    def load_config(self) -> None:
        for key, value in self._settings.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        return import_app(self._app)


def serve_gunicorn(options: RunOptions, manager: CertificateManager | None) -> int:
    """Run gunicorn (the master is this process; it keeps renewing the certificate)."""
    binds = [f"{options.host}:{options.port}"]
    if manager is not None:
        os.environ["MESH_TLS_PORT"] = str(options.port)
        if options.plain_port is not None:
            binds.append(f"{options.host}:{options.plain_port}")
    settings: dict[str, Any] = {
        "bind": binds,
        "workers": options.workers,
        "worker_class": f"{MeshSyncWorker.__module__}.{MeshSyncWorker.__name__}",
        "graceful_timeout": 5,
        "loglevel": "warning",
    }
    _Application(options.app, settings).run()
    return 0
