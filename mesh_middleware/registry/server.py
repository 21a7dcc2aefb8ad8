"""``mesh registry``: run the registry under uvicorn."""

from __future__ import annotations

import contextlib
import sys
from types import FrameType

import uvicorn

from mesh_middleware.registry.app import create_registry_app
from mesh_middleware.registry.dashboard import Dashboard
from mesh_middleware.registry.settings import RegistrySettings

__all__ = ["serve"]

_STARTUP_FAILURE = 3

_DEV_BANNER = """\
************************************************************************
*  mesh registry is in DEV MODE: any caller may register any service   *
*  and obtain identity tokens for it. Never use --dev outside a demo.  *
************************************************************************"""


def serve(config: RegistrySettings) -> int:
    """Serve until interrupted; return the exit status."""
    app = create_registry_app(config)
    state = app.state.registry
    out = sys.stderr
    if state.admin.created:
        print(
            f"mesh registry: created the admin token (shown once, kept in {state.admin.path}):\n"
            f"  {state.admin.token_shown_once}\n"
            "  management calls (mesh token create) need it: MESH_ADMIN_TOKEN or --admin-token",
            file=out,
        )
    if state.viewer.created:
        print(
            f"mesh registry: created the read-only viewer token (kept in {state.viewer.path}):\n"
            f"  {state.viewer.token_shown_once}\n"
            "  it (or the admin token) opens the dashboard",
            file=out,
        )
    if config.dev:
        print(_DEV_BANNER, file=out)
    scheme = "https" if config.tls_certificate is not None else "http"
    print(
        f"mesh registry: {scheme}://{config.host}:{config.port}  store {state.store_url}"
        f"  trust domain {config.trust_domain}\n"
        f"mesh registry: dashboard {scheme}://{config.host}:{config.port}/ui/"
        f"  (sign in with viewer.token or admin.token from {config.data_dir})",
        file=out,
        flush=True,
    )
    server = _Server(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=5,
            ssl_certfile=config.tls_certificate,
            ssl_keyfile=config.tls_key,
        )
    )
    server.dashboard = app.state.dashboard
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    return 0 if server.started else _STARTUP_FAILURE  # as uvicorn.run: a port in use, say


class _Server(uvicorn.Server):
    """uvicorn's server, which also tells open dashboards to end their event streams when it
    is asked to stop: uvicorn waits for open responses, and a stream never ends by itself."""

    dashboard: Dashboard

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.dashboard.closing = True
        super().handle_exit(sig, frame)
