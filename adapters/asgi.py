"""``MeshMiddleware``: the inbound mesh for ASGI apps (FastAPI, Starlette), as pure ASGI."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import anyio
import anyio.to_thread
from starlette.types import ASGIApp, Receive, Scope, Send

from mesh_middleware import defaults
from mesh_middleware.inbound.engine import Admission
from mesh_middleware.runtime.mesh import Mesh

__all__ = ["CALLER_SCOPE_KEY", "MeshMiddleware"]

CALLER_SCOPE_KEY = "mesh.caller"
"""Where the verified caller (:class:`~mesh_middleware.CallerIdentity` or ``None``) is put."""

_IDENTITY_HEADER = defaults.IDENTITY_HEADER.encode("latin-1")
_JSON_HEADERS = [(b"content-type", b"application/json")]
_SAFE_PATH_CHARS = "/:@!$&'()*+,;=-._~"
_UNKNOWN_KID_WAIT = defaults.JWKS_FETCH_TIMEOUT_SECONDS + 0.5


class _ScopeHeaders(Mapping[str, str]):
    """Request headers by lower-case name, read from the ASGI header list on demand.

    ASGI servers lower-case header names, so a look-up is a scan of bytes for bytes; nothing
    is decoded unless a rule asks for that header. Repeated headers join with ``,``.
    """

    __slots__ = ("_raw",)

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        self._raw = raw

    def get(self, name: str, default: Any = None) -> Any:
        key = name.encode("latin-1")
        found: str | None = None
        for header, value in self._raw:
            if header == key:
                text = value.decode("latin-1")
                found = text if found is None else f"{found},{text}"
        return default if found is None else found

    def __getitem__(self, name: str) -> str:
        value: str | None = self.get(name)
        if value is None:
            raise KeyError(name)
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys(k.decode("latin-1") for k, _ in self._raw))

    def __len__(self) -> int:
        return len({k for k, _ in self._raw})


class MeshMiddleware:
    """Verifies callers, authorizes them against the policy and injects faults.

    >>> app.add_middleware(MeshMiddleware, mesh=mesh)  # doctest: +SKIP
    >>> app.add_middleware(MeshMiddleware, policy="policy.yaml", jwks="jwks.json")  # doctest: +SKIP

    The verified caller is at ``request.scope["mesh.caller"]`` (``None`` when anonymous).
    Lifespan and other non-HTTP scopes pass straight through; websocket handshakes are
    authorized like requests, and a refused one never reaches the app.
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
        if mesh is None:
            if policy is None:
                raise TypeError("MeshMiddleware needs mesh=Mesh(...) or policy='policy.yaml'")
            mesh = Mesh(policy, jwks=jwks, issuer=issuer, trust_domain=trust_domain, watch=watch)
        elif policy is not None or jwks is not None or issuer is not None:
            raise TypeError("give either mesh= or policy= and its options, not both")
        self.app = app
        self.mesh = mesh
        self._engine = mesh.inbound

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http" and kind != "websocket":
            await self.app(scope, receive, send)
            return
        token: str | None = None
        duplicate = False
        raw_headers = scope["headers"]
        for key, value in raw_headers:
            if key == _IDENTITY_HEADER:
                duplicate = token is not None
                token = value.decode("latin-1")
        raw_path = scope.get("raw_path")
        path = raw_path.decode("latin-1") if raw_path else quote(scope["path"], _SAFE_PATH_CHARS)
        method = scope.get("method", "GET")
        headers = _ScopeHeaders(raw_headers)
        engine = self._engine
        admission = engine.admit(method, path, token, headers, duplicate_token=duplicate)
        if admission.unknown_kid is not None:
            admission = await self._admit_after_refetch(admission, method, path, token, headers)
        if admission.delay:
            await anyio.sleep(admission.delay)
        if admission.status is not None:
            await self._refuse(scope, receive, send, admission)
            return
        if admission.path is not None:
            scope = dict(scope)
            scope["path"] = unquote(admission.path)
            scope["raw_path"] = admission.path.encode("latin-1")
        scope[CALLER_SCOPE_KEY] = admission.caller
        await self.app(scope, receive, send)

    async def _admit_after_refetch(
        self,
        admission: Admission,
        method: str,
        path: str,
        token: str | None,
        headers: Mapping[str, str],
    ) -> Admission:
        kid = admission.unknown_kid
        assert kid is not None
        keys = self.mesh.keys
        with anyio.move_on_after(_UNKNOWN_KID_WAIT):
            # Rate-limited and shared by concurrent callers; the event loop stays free.
            known = await anyio.to_thread.run_sync(keys.refresh_for_unknown_kid, kid)
            if known:
                return self._engine.admit(method, path, token, headers)
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
