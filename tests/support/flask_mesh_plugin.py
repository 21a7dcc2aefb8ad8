"""Pytest plugin: runs a Flask app's own, unchanged test suite with the mesh in every app.

Load it with ``-p tests.support.flask_mesh_plugin`` (the repository root on ``PYTHONPATH``).
It wraps ``flask.Flask.__init__`` so every app the suite creates gets
``app.wsgi_app = MeshWSGIMiddleware(app.wsgi_app, mesh=mesh)``, all sharing one
:class:`~mesh_middleware.Mesh` built from a policy file written to a temporary directory::

    service: flaskr
    inbound:
      authentication: permissive   # or strict, with --mesh-authentication=strict

At the end it prints one line (``flask-mesh-plugin: ...``) counting the apps wrapped and the
requests that went through the mesh, and fails the session if no request did, so a passing
suite cannot mean the mesh was never in the path.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import flask
import pytest

from mesh_middleware import Mesh, MeshWSGIMiddleware
from mesh_middleware.adapters.wsgi import CALLER_ENVIRON_KEY

__all__ = ["REPORT_PATTERN", "MeshStats"]

WSGIEnviron = dict[str, Any]
StartResponse = Callable[..., Any]
WSGIApp = Callable[[WSGIEnviron, StartResponse], Iterable[bytes]]

SERVICE = "flaskr"
REPORT_PATTERN = re.compile(
    r"^flask-mesh-plugin: authentication=(?P<authentication>\w+) apps=(?P<apps>\d+) "
    r"requests=(?P<requests>\d+) admitted=(?P<admitted>\d+) refused=(?P<refused>\d+)$",
    re.MULTILINE,
)
"""Matches the plugin's summary line; the outer test parses the counts with it."""

_POLICY = """\
service: {service}
inbound:
  authentication: {authentication}
"""


@dataclass
class MeshStats:
    """What went through the mesh during one session."""

    authentication: str
    apps: int = 0
    requests: int = 0
    admitted: int = 0

    @property
    def refused(self) -> int:
        """Requests the mesh answered itself (401, 403, ...) instead of passing them on."""
        return self.requests - self.admitted

    def line(self) -> str:
        return (
            f"flask-mesh-plugin: authentication={self.authentication} apps={self.apps} "
            f"requests={self.requests} admitted={self.admitted} refused={self.refused}"
        )


class _CountingMeshMiddleware(MeshWSGIMiddleware):
    """``MeshWSGIMiddleware`` that counts every request it is called with."""

    stats: MeshStats

    def __call__(self, environ: WSGIEnviron, start_response: StartResponse) -> Iterable[bytes]:
        self.stats.requests += 1
        return super().__call__(environ, start_response)


def _admitted_counter(app: WSGIApp, stats: MeshStats) -> WSGIApp:
    """Wraps the app behind the mesh: counts the requests the mesh let through."""

    def counted(environ: WSGIEnviron, start_response: StartResponse) -> Iterable[bytes]:
        # The middleware sets the caller key on every request it admits; its absence would
        # mean this request reached the app without passing through the mesh.
        if CALLER_ENVIRON_KEY not in environ:
            raise AssertionError("request reached the Flask app without passing the mesh")
        stats.admitted += 1
        return app(environ, start_response)

    return counted


@dataclass
class _Session:
    stats: MeshStats
    mesh: Mesh
    policy_dir: tempfile.TemporaryDirectory[str]
    patch: pytest.MonkeyPatch


_session_key = pytest.StashKey[_Session]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--mesh-authentication",
        choices=("permissive", "strict"),
        default="permissive",
        help="inbound authentication mode of the mesh installed in every Flask app",
    )


def pytest_configure(config: pytest.Config) -> None:
    authentication: str = config.getoption("--mesh-authentication")
    policy_dir = tempfile.TemporaryDirectory(prefix="flask-mesh-plugin-")
    policy_file = Path(policy_dir.name) / "policy.yaml"
    policy_file.write_text(_POLICY.format(service=SERVICE, authentication=authentication))
    mesh = Mesh(policy_file, watch=False)
    stats = MeshStats(authentication=authentication)
    original_init = flask.Flask.__init__

    def init_with_mesh(self: flask.Flask, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        middleware = _CountingMeshMiddleware(_admitted_counter(self.wsgi_app, stats), mesh=mesh)
        middleware.stats = stats
        self.wsgi_app = middleware  # type: ignore[method-assign]
        stats.apps += 1

    patch = pytest.MonkeyPatch()
    patch.setattr(flask.Flask, "__init__", init_with_mesh)
    config.stash[_session_key] = _Session(stats, mesh, policy_dir, patch)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    state = session.config.stash.get(_session_key, None)
    if state is not None and state.stats.requests == 0 and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    state = config.stash.get(_session_key, None)
    if state is None:
        return
    terminalreporter.write_line(state.stats.line())
    if state.stats.requests == 0:
        terminalreporter.write_line(
            "flask-mesh-plugin: FAILED: no request went through the mesh", red=True
        )


def pytest_unconfigure(config: pytest.Config) -> None:
    state = config.stash.get(_session_key, None)
    if state is None:
        return
    state.patch.undo()
    state.mesh.close()
    state.policy_dir.cleanup()
    del config.stash[_session_key]
