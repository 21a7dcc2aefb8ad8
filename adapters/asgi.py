"""``MeshMiddleware``: the inbound mesh for ASGI apps (FastAPI, Starlette), as pure ASGI."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Awaitable, Iterator, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import anyio
import anyio.to_thread
from mypy_extensions import mypyc_attr
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mesh_middleware import defaults
from mesh_middleware.errors import RepeatedHeader
from mesh_middleware.identity.verifier import CallerIdentity
from mesh_middleware.inbound.engine import Admission
from mesh_middleware.inbound.responses import error_body
from mesh_middleware.inbound.telemetry import InboundTelemetry, admission_flags
from mesh_middleware.runtime.context import current_deadline, current_user, deadline_from_header
from mesh_middleware.runtime.mesh import Mesh, resolve_mesh
from mesh_middleware.telemetry import metrics
from mesh_middleware.telemetry.exposition import render_metrics

__all__ = [
    "CALLER_SCOPE_KEY",
    "DEADLINE_SCOPE_KEY",
    "PEER_SCOPE_KEY",
    "USER_SCOPE_KEY",
    "MeshMiddleware",
]

CALLER_SCOPE_KEY = "mesh.caller"
"""Where the verified caller (:class:`~mesh_middleware.CallerIdentity` or ``None``) is put."""

USER_SCOPE_KEY = "mesh.user"
"""Where the verified end user (:class:`~mesh_middleware.EndUser` or ``None``) is put."""

PEER_SCOPE_KEY = defaults.PEER_KEY
"""Where ``mesh run`` puts the SPIFFE ID of the client certificate of a mutual-TLS connection."""

DEADLINE_SCOPE_KEY = "mesh.deadline"
"""Where the caller's :class:`~mesh_middleware.Deadline` is put, when it sent one."""

_IDENTITY_HEADER = defaults.IDENTITY_HEADER.encode("latin-1")
_DEADLINE_HEADER = defaults.DEADLINE_HEADER.encode("latin-1")
_EXPIRED = Admission(
    status=504,
    body=error_body("deadline_exceeded", "the caller's deadline had passed on arrival"),
)
_JSON_HEADERS = [(b"content-type", b"application/json")]
_SAFE_PATH_CHARS = "/:@!$&'()*+,;=-._~"
_UNKNOWN_KID_WAIT = defaults.UNKNOWN_KID_WAIT_SECONDS


_IDENTITY, _TRACEPARENT, _TRACESTATE, _DEADLINE, _REQUEST_ID, _CONTENT_LENGTH = range(6)
_READ_HEADERS = {
    _IDENTITY_HEADER: _IDENTITY,
    b"traceparent": _TRACEPARENT,
    b"tracestate": _TRACESTATE,
    _DEADLINE_HEADER: _DEADLINE,
    b"x-request-id": _REQUEST_ID,
    b"content-length": _CONTENT_LENGTH,
}
"""The request headers the middleware itself reads."""

_ENCODED_NAMES: dict[str, bytes] = {}
_MAX_ENCODED_NAMES = 256


class _ScopeHeaders(Mapping[str, str]):
    """Request headers by lower-case name, read from the ASGI header list on demand.

    ASGI servers lower-case header names, so a look-up is a scan of bytes for bytes; nothing
    is decoded unless a rule asks for that header. A header a rule reads must appear once.
    """

    __slots__ = ("_raw",)

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        self._raw = raw

    def get(self, name: str, default: Any = None) -> Any:
        key = _ENCODED_NAMES.get(name)
        if key is None:
            key = name.encode("latin-1")
            if len(_ENCODED_NAMES) < _MAX_ENCODED_NAMES:  # the names rules read: a few
                _ENCODED_NAMES[name] = key
        found: bytes | None = None
        for header, value in self._raw:
            if header == key:
                if found is not None:
                    raise RepeatedHeader(name)
                found = value
        return default if found is None else found.decode("latin-1")

    def __getitem__(self, name: str) -> str:
        value: str | None = self.get(name)
        if value is None:
            raise KeyError(name)
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys(k.decode("latin-1") for k, _ in self._raw))

    def __len__(self) -> int:
        return len({k for k, _ in self._raw})


def _split_root(scope: Scope, root: str) -> tuple[str, str]:
    """Split the raw path into the mount point (``root_path``) and the path the app routes on.

    Servers started with ``--root-path`` and Starlette's ``Mount`` keep the mount point in
    ``path`` and ``raw_path``; the app routes on what follows it, so that is what is authorized.
    """
    raw_path = scope.get("raw_path")
    full = scope.get("path", "")
    raw = raw_path.decode("latin-1") if raw_path else quote(full, _SAFE_PATH_CHARS)
    raw_root = quote(root, _SAFE_PATH_CHARS)
    if raw.startswith(raw_root) and raw[len(raw_root) : len(raw_root) + 1] in ("", "/"):
        return raw_root, raw[len(raw_root) :] or "/"
    if full.startswith(root):
        # The mount point was spelled differently on the wire: use the decoded path.
        return raw_root, quote(full[len(root) :], _SAFE_PATH_CHARS) or "/"
    return "", raw  # a server whose path does not include root_path


async def _wait_for(future: Future[bool], seconds: float) -> None:
    """Wait for a refetch without holding a worker thread where the loop is asyncio."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # another event loop (trio): a thread that gives up at the timeout
        with anyio.move_on_after(seconds):
            await anyio.to_thread.run_sync(
                lambda: future.exception(seconds), abandon_on_cancel=True
            )
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), seconds)


class _Answer:
    """Passes the app's messages on, noting the status and the body's size."""

    __slots__ = ("_send", "bytes", "status")

    def __init__(self, send: Send) -> None:
        self._send = send
        self.status = 0
        self.bytes = 0

    def send(self, message: Message) -> Awaitable[None]:
        # Not a coroutine function: it hands back the server's own awaitable, which saves a
        # coroutine per message. ASGI asks only that `send(message)` can be awaited.
        kind = message["type"]
        if kind == "http.response.body":
            self.bytes += len(message.get("body", b""))
        elif kind == "http.response.start":
            self.status = message["status"]
        return self._send(message)


async def _serve_metrics(raw_headers: list[tuple[bytes, bytes]], send: Send) -> None:
    accept = next((v.decode("latin-1") for k, v in raw_headers if k == b"accept"), None)
    body, content_type = render_metrics(accept)
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", content_type.encode("latin-1")),
                (b"content-length", str(len(body)).encode("ascii")),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _framework(app: object) -> str:
    """The app's framework, as reported in the instance's registry metadata."""
    if "fastapi" in sys.modules:
        return "fastapi"
    module = getattr(app, "__module__", None) or type(app).__module__
    return str(module).split(".")[0] or "asgi"


@mypyc_attr(native_class=False)  # public: a native class would lose its docstring
class MeshMiddleware:
    """Verifies callers, authorizes them against the policy and injects faults.

    >>> app.add_middleware(MeshMiddleware, mesh=mesh)  # doctest: +SKIP
    >>> app.add_middleware(MeshMiddleware, policy="policy.yaml", jwks="jwks.json")  # doctest: +SKIP

    The verified caller is at ``request.scope["mesh.caller"]`` (``None`` when anonymous).
    Websocket handshakes are authorized like requests, and a refused one never reaches the app.

    With a registry, the lifespan starts and stops the Mesh's registry work: :meth:`Mesh.start`
    once the app reports its startup complete (an app that failed to start is never
    registered), :meth:`Mesh.stop` (deregistration) when the server announces shutdown, before
    the app tears down. The lifespan messages reach the app unchanged. A server without
    lifespan starts the Mesh at the first request instead.
    """

    def __init__(
        self,
        app: ASGIApp,
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
            "MeshMiddleware",
            mesh,
            policy,
            jwks=jwks,
            issuer=issuer,
            trust_domain=trust_domain,
            watch=watch,
        )
        self._engine = self.mesh.inbound
        self._telemetry: InboundTelemetry = self.mesh.inbound_telemetry
        self._with_registry = self.mesh.registry_url is not None
        self._first_request = self._with_registry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http" and kind != "websocket":
            if kind == "lifespan" and self._with_registry:
                await self._lifespan(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        if self._first_request:
            self._first_request = False
            self.mesh.start(_framework(self.app))  # quick: the work is in the background
            server = scope.get("server") or (None, None)
            self.mesh.note_server_address(server[0], server[1])
        token: str | None = None
        duplicate = False
        deadline_header: bytes | None = None
        traceparent: bytes | None = None
        tracestate: list[bytes] = []
        request_id: bytes | None = None
        request_bytes = 0
        raw_headers = scope["headers"]
        read = _READ_HEADERS.get
        for key, value in raw_headers:
            which = read(key)  # most headers are none of these: one look-up each
            if which is None:
                continue
            if which == _IDENTITY:
                duplicate = token is not None
                token = value.decode("latin-1")
            elif which == _TRACEPARENT:
                # Two traceparent fields are invalid (W3C): start a new trace.
                traceparent = value if traceparent is None else b""
            elif which == _TRACESTATE:
                tracestate.append(value)
            elif which == _DEADLINE:
                deadline_header = value
            elif which == _REQUEST_ID:
                request_id = value
            elif value.isdigit():  # content-length
                request_bytes = int(value)
        method = scope.get("method", "GET")
        telemetry = self._telemetry
        settings = telemetry.settings()
        if kind == "http" and scope.get("path") == settings.metrics_path:
            await _serve_metrics(raw_headers, send)  # public, as Prometheus has no identity
            return
        record = telemetry.begin(traceparent, tracestate, request_id, method)
        answer = _Answer(send)
        entry_root = root = scope.get("root_path", "")
        flags = metrics.NO_FLAGS
        caller: CallerIdentity | None = None
        path = scope.get("path", "/")
        try:
            deadline = deadline_from_header(deadline_header) if deadline_header else None
            if deadline is not None and deadline.expired:
                flags = metrics.DEADLINE
                await self._refuse(scope, receive, answer.send, _EXPIRED)  # the caller has gone
                return
            raw_path = scope.get("raw_path")
            if root:
                raw_root, path = _split_root(scope, root)
            else:
                raw_root = ""
                path = (
                    raw_path.decode("latin-1")
                    if raw_path
                    else quote(scope["path"], _SAFE_PATH_CHARS)
                )
            headers = _ScopeHeaders(raw_headers)
            engine = self._engine
            admission = engine.admit(
                method,
                path,
                token,
                headers,
                duplicate_token=duplicate,
                peer=scope.get(PEER_SCOPE_KEY),
            )
            if admission.unknown_kid is not None:
                admission = await self._admit_after_refetch(
                    admission, method, path, token, headers, scope.get(PEER_SCOPE_KEY)
                )
            caller = admission.caller
            if admission.path is not None:
                path = admission.path
            if admission.status is not None or admission.delay:
                flags = admission_flags(admission)
                telemetry.judged(admission, method, path)
            if admission.delay:
                await anyio.sleep(admission.delay)
            if admission.status is not None:
                await self._refuse(scope, receive, answer.send, admission)
                return
            if admission.path is not None:
                # The app routes on exactly the path that was authorized.
                scope = dict(scope)
                scope["path"] = (root if raw_root else "") + unquote(admission.path)
                scope["raw_path"] = (raw_root + admission.path).encode("latin-1")
            scope[CALLER_SCOPE_KEY] = caller
            user = admission.user
            scope[USER_SCOPE_KEY] = user
            forward = admission.forward
            if deadline is None and forward is None:
                await self.app(scope, receive, answer.send)
                return
            # Outbound calls made while serving this request never outlive its caller, and
            # may forward its end user.
            deadline_token = current_deadline.set(deadline) if deadline is not None else None
            user_token = current_user.set(forward) if forward is not None else None
            if deadline is not None:
                scope[DEADLINE_SCOPE_KEY] = deadline
            try:
                await self.app(scope, receive, answer.send)
            finally:
                if user_token is not None:
                    current_user.reset(user_token)
                if deadline_token is not None:
                    current_deadline.reset(deadline_token)
        finally:
            telemetry.leave(record)  # the request's trace is no longer current
            # The route the app matched, as its template (`/items/{item}`), never the raw
            # path. Under a `Mount` the router adds the mount point to root_path: it is part
            # of the route.
            route = getattr(scope.get("route"), "path", None)
            if not isinstance(route, str):
                route = "unmatched"
            elif entry_root != (root := scope.get("root_path", "")) and root.startswith(entry_root):
                route = root[len(entry_root) :] + route
            telemetry.end(
                record,
                settings,
                caller.service if caller is not None else None,
                method,
                path,
                route,
                answer.status if answer.status or kind == "http" else 101,
                flags,
                request_bytes,
                answer.bytes,
            )

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        mesh = self.mesh
        framework = _framework(self.app)

        async def receive_and_stop() -> Message:
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                # Deregister before the app tears down; the registry call blocks briefly.
                await anyio.to_thread.run_sync(mesh.stop)
            return message

        async def send_and_start(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                mesh.start(framework)
            await send(message)

        await self.app(scope, receive_and_stop, send_and_start)

    async def _admit_after_refetch(
        self,
        admission: Admission,
        method: str,
        path: str,
        token: str | None,
        headers: Mapping[str, str],
        peer: str | None,
    ) -> Admission:
        kid = admission.unknown_kid
        assert kid is not None
        keys = admission.keys if admission.keys is not None else self.mesh.keys
        future = keys.refetch_for(kid)  # rate-limited, shared, in its own thread
        if future is not None:
            await _wait_for(future, _UNKNOWN_KID_WAIT)
        if keys.get(kid) is not None or (admission.keys is not None and admission.keys.loaded):
            return self._engine.admit(method, path, token, headers, peer=peer)
        return admission

    async def _refuse(
        self, scope: Scope, receive: Receive, send: Send, admission: Admission
    ) -> None:
        body = admission.body
        headers = [*_JSON_HEADERS, (b"content-length", str(len(body)).encode("ascii"))]
        if scope["type"] == "http":
            await send(
                {"type": "http.response.start", "status": admission.status, "headers": headers}
            )
            await send({"type": "http.response.body", "body": body})
            return
        message = await receive()  # the handshake: websocket.connect
        if message["type"] != "websocket.connect":
            return
        if "websocket.http.response" in scope.get("extensions", {}):
            await send(
                {
                    "type": "websocket.http.response.start",
                    "status": admission.status,
                    "headers": headers,
                }
            )
            await send({"type": "websocket.http.response.body", "body": body})
        else:
            await send({"type": "websocket.close", "code": 1008})
