"""``MeshWSGIMiddleware``: the inbound mesh for WSGI apps (Flask), one engine with the ASGI side."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from mesh_middleware import defaults
from mesh_middleware.identity.verifier import CallerIdentity
from mesh_middleware.inbound.engine import Admission
from mesh_middleware.inbound.responses import error_body, status_line
from mesh_middleware.inbound.telemetry import InboundTelemetry, admission_flags
from mesh_middleware.runtime.context import current_deadline, current_user, deadline_from_header
from mesh_middleware.runtime.mesh import Mesh, resolve_mesh
from mesh_middleware.telemetry import metrics
from mesh_middleware.telemetry.exposition import render_metrics

__all__ = [
    "CALLER_ENVIRON_KEY",
    "DEADLINE_ENVIRON_KEY",
    "PEER_ENVIRON_KEY",
    "USER_ENVIRON_KEY",
    "MeshWSGIMiddleware",
]

WSGIEnviron = dict[str, Any]
StartResponse = Callable[..., Any]
WSGIApp = Callable[[WSGIEnviron, StartResponse], Iterable[bytes]]

CALLER_ENVIRON_KEY = "mesh.caller"

USER_ENVIRON_KEY = "mesh.user"
"""Where the verified end user (:class:`~mesh_middleware.EndUser` or ``None``) is put."""
"""Where the verified caller (:class:`~mesh_middleware.CallerIdentity` or ``None``) is put."""

PEER_ENVIRON_KEY = defaults.PEER_KEY
"""Where ``mesh run`` puts the SPIFFE ID of the client certificate of a mutual-TLS connection."""

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


class _Answer:
    """Passes ``start_response`` on, noting the status."""

    __slots__ = ("_start_response", "status")

    def __init__(self, start_response: StartResponse) -> None:
        self._start_response = start_response
        self.status = 0

    def start_response(self, status: str, headers: Any, exc_info: Any = None) -> Any:
        code = status[:3]
        self.status = int(code) if code.isdigit() else 0
        if exc_info is not None:
            return self._start_response(status, headers, exc_info)
        return self._start_response(status, headers)


class _Body:
    """The app's response body, counted as the server sends it; recorded once it is closed."""

    __slots__ = ("_finish", "_iterable", "_size")

    def __init__(self, iterable: Iterable[bytes], finish: Callable[[int], None]) -> None:
        self._iterable = iterable
        self._finish = finish
        self._size = 0

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._iterable:
            self._size += len(chunk)
            yield chunk

    def close(self) -> None:
        try:
            close = getattr(self._iterable, "close", None)
            if close is not None:
                close()
        finally:
            self._finish(self._size)


ROUTE_ENVIRON_KEY = "mesh.route"
"""Where a framework hook puts the matched route's template, for metrics and access logs."""


def _route_template(environ: WSGIEnviron) -> str:
    """The route the app matched, as its template (``/items/<item>``), never the raw path."""
    rule = environ.get(ROUTE_ENVIRON_KEY)
    return rule if isinstance(rule, str) else "unmatched"


def _note_flask_routes(app: object) -> None:
    """When ``app`` is a Flask app's ``wsgi_app``, have Flask note each matched rule."""
    owner = getattr(app, "__self__", None)
    before_request = getattr(owner, "before_request", None)
    if before_request is None or not hasattr(owner, "url_map"):
        return
    from flask import request

    def note_route() -> None:
        rule = request.url_rule
        if rule is not None:
            request.environ[ROUTE_ENVIRON_KEY] = rule.rule

    before_request(note_route)


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
        self._telemetry: InboundTelemetry = self.mesh.inbound_telemetry
        _note_flask_routes(app)
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
        method = environ.get("REQUEST_METHOD", "GET")
        telemetry = self._telemetry
        settings = telemetry.settings()
        if environ.get("PATH_INFO") == settings.metrics_path:
            body, content_type = render_metrics(environ.get("HTTP_ACCEPT"))
            start_response(
                "200 OK", [("Content-Type", content_type), ("Content-Length", str(len(body)))]
            )
            return [body]  # public, as Prometheus has no identity
        tracestate = environ.get("HTTP_TRACESTATE")
        record = telemetry.begin(
            environ.get("HTTP_TRACEPARENT"),
            (tracestate,) if tracestate is not None else (),
            environ.get("HTTP_X_REQUEST_ID"),
            method,
        )
        answer = _Answer(start_response)
        caller: CallerIdentity | None = None
        raw_path = environ.get("PATH_INFO", "/")
        flags = metrics.NO_FLAGS

        def finish(response_bytes: int) -> None:
            length = environ.get("CONTENT_LENGTH")
            telemetry.end(
                record,
                settings,
                caller.service if caller is not None else None,
                method,
                raw_path,
                _route_template(environ),
                answer.status,
                flags,
                int(length) if length and length.isdigit() else 0,
                response_bytes,
            )

        try:
            deadline = deadline_from_header(environ.get("HTTP_X_MESH_DEADLINE_MS"))
            if deadline is not None and deadline.expired:
                flags = metrics.DEADLINE
                answer.start_response(
                    status_line(504),
                    [("Content-Type", "application/json"), ("Content-Length", str(len(_EXPIRED)))],
                )
                return _Body([_EXPIRED], finish)
            token = environ.get("HTTP_X_MESH_IDENTITY")
            raw_path = _raw_path(environ)
            headers = _EnvironHeaders(environ)
            # WSGI servers join repeated headers with ','; a JWS never contains one.
            duplicate = token is not None and "," in token
            peer = environ.get(PEER_ENVIRON_KEY)
            admission = self._engine.admit(
                method, raw_path, token, headers, duplicate_token=duplicate, peer=peer
            )
            if admission.unknown_kid is not None:
                admission = self._admit_after_refetch(
                    admission, method, raw_path, token, headers, peer
                )
            caller = admission.caller
            flags = admission_flags(admission)
            if admission.status is not None or admission.delay:
                telemetry.judged(admission, method, raw_path)
            if admission.delay:
                time.sleep(admission.delay)
            if admission.status is not None:
                body = admission.body
                answer.start_response(
                    status_line(admission.status),
                    [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
                )
                return _Body([body], finish)
            if admission.path is not None:
                raw_path = admission.path
                environ["PATH_INFO"] = unquote(admission.path, encoding="latin-1")
            environ[CALLER_ENVIRON_KEY] = caller
            user = admission.user
            environ[USER_ENVIRON_KEY] = user
            forward = admission.forward
            if deadline is None and forward is None:
                return _Body(self.app(environ, answer.start_response), finish)
            # Outbound calls made while serving this request never outlive its caller (a
            # response body generated after the view returned runs without the deadline),
            # and may forward its end user.
            deadline_token = current_deadline.set(deadline) if deadline is not None else None
            user_token = current_user.set(forward) if forward is not None else None
            if deadline is not None:
                environ[DEADLINE_ENVIRON_KEY] = deadline
            try:
                return _Body(self.app(environ, answer.start_response), finish)
            finally:
                if user_token is not None:
                    current_user.reset(user_token)
                if deadline_token is not None:
                    current_deadline.reset(deadline_token)
        except BaseException:
            finish(0)
            raise
        finally:
            telemetry.leave(record)

    def _admit_after_refetch(
        self,
        admission: Admission,
        method: str,
        raw_path: str,
        token: str | None,
        headers: Mapping[str, str],
        peer: str | None,
    ) -> Admission:
        kid = admission.unknown_kid
        assert kid is not None
        keys = admission.keys if admission.keys is not None else self.mesh.keys
        known = keys.refresh_for_unknown_kid(kid)
        if known or (admission.keys is not None and admission.keys.loaded):
            return self._engine.admit(method, raw_path, token, headers, peer=peer)
        return admission
