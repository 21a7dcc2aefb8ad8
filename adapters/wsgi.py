"""``MeshWSGIMiddleware``: the inbound mesh for WSGI apps (Flask), one engine with the ASGI side."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from mesh_middleware import defaults
from mesh_middleware.inbound.engine import Admission
from mesh_middleware.inbound.responses import error_body, status_line
from mesh_middleware.runtime.context import (
    current_deadline,
    current_traceparent,
    deadline_from_header,
    parse_traceparent,
)
from mesh_middleware.runtime.mesh import Mesh, resolve_mesh

__all__ = ["CALLER_ENVIRON_KEY", "DEADLINE_ENVIRON_KEY", "MeshWSGIMiddleware"]

WSGIEnviron = dict[str, Any]
StartResponse = Callable[..., Any]
WSGIApp = Callable[[WSGIEnviron, StartResponse], Iterable[bytes]]

CALLER_ENVIRON_KEY = "mesh.caller"
"""Where the verified caller (:class:`~mesh_middleware.CallerIdentity` or ``None``) is put."""

DEADLINE_ENVIRON_KEY = "mesh.deadline"
"""Where the caller's :class:`~mesh_middleware.Deadline` is put, when it sent one."""

_SAFE_PATH_CHARS = "/:@!$&'()*+,;=-._~"
_EXPIRED = error_body("deadline_exceeded", "the caller's deadline had passed on arrival")


class _EnvironHeaders(Mapping[str, str]):
    """Request headers by lower-case name, read from the CGI-style environ."""

    __slots__ = ("_environ",)

    def __init__(self, environ: WSGIEnviron) -> None:
        self._environ = environ

    @staticmethod
    def _key(name: str) -> str:
        upper = name.upper().replace("-", "_")
        if upper in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            return upper
        return "HTTP_" + upper

    def __getitem__(self, name: str) -> str:
        value = self._environ.get(self._key(name))
        if value is None:
            raise KeyError(name)
        return str(value)

    def __iter__(self) -> Iterator[str]:
        for key in self._environ:
            if key.startswith("HTTP_"):
                yield key[5:].lower().replace("_", "-")
            elif key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
                yield key.lower().replace("_", "-")

    def __len__(self) -> int:
        return sum(1 for _ in self)


def _raw_path(environ: WSGIEnviron) -> str:
    """The path as the client sent it, relative to the app's mount point (``SCRIPT_NAME``)."""
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    script = environ.get("SCRIPT_NAME", "")
    if raw:
        # An absolute-form target carries scheme and host; an origin-form one only the path.
        raw = (urlsplit(raw).path or "/") if not raw.startswith("/") else raw.split("?", 1)[0]
        if script and raw.startswith(script):
            raw = raw[len(script) :] or "/"
        return str(raw)
    # No raw target from this server: re-encode the decoded PATH_INFO (latin-1 per PEP 3333).
    path_info = environ.get("PATH_INFO", "") or "/"
    return quote(path_info.encode("latin-1"), _SAFE_PATH_CHARS)


def _framework(app: object) -> str:
    """The app's framework (``flask`` for ``flask_app.wsgi_app``), for registry metadata."""
    owner = getattr(app, "__self__", app)
    module = type(owner).__module__ if owner is not app else getattr(app, "__module__", None)
    return str(module or type(app).__module__).split(".")[0] or "wsgi"


class MeshWSGIMiddleware:
    """Verifies callers, authorizes them against the policy and injects faults (WSGI).

    >>> flask_app.wsgi_app = MeshWSGIMiddleware(flask_app.wsgi_app, mesh=mesh)  # doctest: +SKIP

    The verified caller is at ``request.environ["mesh.caller"]`` (``None`` when anonymous).
    With a registry, wrapping the app starts the Mesh's registry work (gunicorn workers each
    run their own: the background thread restarts after ``fork``), and the instance is
    deregistered when the process exits cleanly.
    """

    def __init__(
        self,
        app: WSGIApp,
        mesh: Mesh | None = None,
        policy: str | Path | None = None,
        *,
        jwks: str | Path | None = None,
        issuer: str | None = None,
        trust_domain: str = defaults.DEFAULT_TRUST_DOMAIN,
        watch: bool = True,
    ) -> None:
        self.app = app
        self.mesh = resolve_mesh(
            "MeshWSGIMiddleware",
            mesh,
            policy,
            jwks=jwks,
            issuer=issuer,
            trust_domain=trust_domain,
            watch=watch,
        )
        self._engine = self.mesh.inbound
        # WSGI has no startup hook. The registry work starts now — an app is wrapped when a
        # server loads it, and an instance must appear before its first request, since no
        # caller finds it until then — and again (idempotently) at the first request in each
        # process, which also reports the address the server answers on.
        self._first_request = self.mesh.registry_url is not None
        if self._first_request:
            self.mesh.start(_framework(app))

    def __call__(self, environ: WSGIEnviron, start_response: StartResponse) -> Iterable[bytes]:
        if self._first_request:
            self._first_request = False
            self.mesh.start(_framework(self.app))  # quick and idempotent; deregisters at exit
            self.mesh.note_server_address(environ.get("SERVER_NAME"), environ.get("SERVER_PORT"))
        deadline = deadline_from_header(environ.get("HTTP_X_MESH_DEADLINE_MS"))
        if deadline is not None and deadline.expired:
            start_response(
                status_line(504),
                [("Content-Type", "application/json"), ("Content-Length", str(len(_EXPIRED)))],
            )
            return [_EXPIRED]
        token = environ.get("HTTP_X_MESH_IDENTITY")
        raw_path = _raw_path(environ)
        method = environ.get("REQUEST_METHOD", "GET")
        headers = _EnvironHeaders(environ)
        # WSGI servers join repeated headers with ','; a JWS never contains one.
        duplicate = token is not None and "," in token
        admission = self._engine.admit(method, raw_path, token, headers, duplicate_token=duplicate)
        if admission.unknown_kid is not None:
            admission = self._admit_after_refetch(admission, method, raw_path, token, headers)
        if admission.delay:
            time.sleep(admission.delay)
        if admission.status is not None:
            body = admission.body
            start_response(
                status_line(admission.status),
                [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
            )
            return [body]
        if admission.path is not None:
            environ["PATH_INFO"] = unquote(admission.path, encoding="latin-1")
        environ[CALLER_ENVIRON_KEY] = admission.caller
        traceparent = environ.get("HTTP_TRACEPARENT")
        if deadline is None and traceparent is None:
            return self.app(environ, start_response)
        # Outbound calls made while serving this request inherit its deadline and trace (a
        # response body generated after the view returned runs without them).
        deadline_token = current_deadline.set(deadline)
        trace_token = current_traceparent.set(parse_traceparent(traceparent))
        if deadline is not None:
            environ[DEADLINE_ENVIRON_KEY] = deadline
        try:
            return self.app(environ, start_response)
        finally:
            current_traceparent.reset(trace_token)
            current_deadline.reset(deadline_token)

    def _admit_after_refetch(
        self,
        admission: Admission,
        method: str,
        raw_path: str,
        token: str | None,
        headers: Mapping[str, str],
    ) -> Admission:
        kid = admission.unknown_kid
        assert kid is not None
        if self.mesh.keys.refresh_for_unknown_kid(kid):
            return self._engine.admit(method, raw_path, token, headers)
        return admission
