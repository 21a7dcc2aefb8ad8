"""The registry's web dashboard at ``/ui`` (docs/dashboard.md): pages, sign-in, live snapshot.

Read-only, and behind the admin or the viewer token: ``/ui/login`` takes either (a form, or
``?token=`` from the link ``mesh demo`` prints) and keeps it in an HttpOnly cookie scoped to
``/ui``. The page's data is one snapshot (:meth:`Dashboard.snapshot`): topology and golden
metrics over the last minute, instances with their leases, per-edge series over the
retention, faults, retries and recent denials. It reaches the browser as server-sent events
(``/ui/api/events``): a snapshot when it changed, checked every ``PUSH_SECONDS``; a comment
now and then to keep the stream open; the stream ends after about ``STREAM_SECONDS`` and the
browser reconnects by itself. An idle page so costs one request every few minutes.

The assets are files of the package, read once; the Content-Security-Policy the pages are
served with lets them load nothing from any other origin.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import time
from collections.abc import AsyncIterator, Callable
from importlib import resources
from typing import Any
from urllib.parse import parse_qs

import structlog
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from mesh_middleware.registry.api import (
    ApiError,
    RegistryState,
    bearer_token,
    can_read,
    guarded,
)
from mesh_middleware.registry.telemetry import RETENTION_SECONDS

__all__ = ["COOKIE", "CSP", "Dashboard"]

log = structlog.get_logger("mesh.registry")

COOKIE = "mesh_ui"
COOKIE_SECONDS = 12 * 3600
WINDOW_SECONDS = 60.0
PUSH_SECONDS = 2.0
KEEPALIVE_SECONDS = 20.0
STREAM_SECONDS = 300.0
RECONNECT_MS = 5000
MAX_STREAMS = 32
MAX_LOGIN_BYTES = 4096
MAX_DENIALS = 50
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
_ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "login.html": "text/html; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
_REFUSED = b'<p class="login-refused">That is neither the admin nor the viewer token.</p>'
_PAGE_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",  # the login link carries a token
    "cache-control": "no-store",
}


class Dashboard:
    """The ``/ui`` routes of one registry."""

    def __init__(
        self,
        state: RegistryState,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        push_seconds: float = PUSH_SECONDS,
        stream_seconds: float = STREAM_SECONDS,
    ) -> None:
        self._state = state
        self._clock = clock
        self._wall_clock = wall_clock
        self.push_seconds = push_seconds
        self.stream_seconds = stream_seconds
        self.streams = 0
        self.closing = False  # the server is shutting down: streams end at their next push
        self._assets: dict[str, bytes] = {}
        # (when built, digest of the content without its timestamp, the encoded snapshot)
        self._built: tuple[float, str, bytes] | None = None

    def routes(self) -> list[BaseRoute]:
        """The dashboard's routes, all under ``/ui``."""
        return [
            Route(path, guarded(name, handler), methods=methods)
            for path, handler, methods, name in (
                ("/ui", self._to_index, ["GET"], "ui"),
                ("/ui/", self._index, ["GET"], "ui"),
                ("/ui/login", self._login, ["GET", "POST"], "ui_login"),
                ("/ui/logout", self._logout, ["POST"], "ui_logout"),
                ("/ui/dashboard.js", self._asset, ["GET"], "ui_asset"),
                ("/ui/dashboard.css", self._asset, ["GET"], "ui_asset"),
                ("/ui/api/state", self._api_state, ["GET"], "ui_state"),
                ("/ui/api/events", self._api_events, ["GET"], "ui_events"),
            )
        ]

    # -- what the page shows ---------------------------------------------------------------

    def snapshot(self, max_age: float = 1.0) -> tuple[str, bytes]:
        """The digest of the current picture (without its timestamp) and its JSON. Streams
        take one up to ``max_age`` seconds old: it is built at most once a second, however
        many pages watch."""
        now = self._clock()
        built = self._built
        if built is not None and now - built[0] < max_age:
            return built[1], built[2]
        content = json.dumps(self._picture(), separators=(",", ":")).encode()
        digest = hashlib.blake2b(content, digest_size=16).hexdigest()
        stamp = json.dumps(round(self._wall_clock(), 3)).encode()
        encoded = b'{"generated_at":' + stamp + b"," + content[1:]
        self._built = (now, digest, encoded)
        return digest, encoded

    def _picture(self) -> dict[str, Any]:
        state = self._state
        catalog = state.catalog
        telemetry = state.telemetry
        covered, nodes, edges = telemetry.topology(WINDOW_SECONDS, catalog.services())
        series = telemetry.series(self._wall_clock())
        for node in nodes:
            node["members"] = [_member(i) for i in catalog.instances(node["service"])]
        # Every edge with traffic in the last minute has buckets in the 5 minutes kept.
        for edge in edges:
            edge["series"] = series[(edge["source"], edge["destination"])]
        return {
            "window_seconds": WINDOW_SECONDS,
            "covered_seconds": covered,
            "bucket_seconds": telemetry.bucket_seconds,
            "services": nodes,
            "edges": edges,
            "denials": telemetry.denials(RETENTION_SECONDS, limit=MAX_DENIALS),
        }

    # -- pages -------------------------------------------------------------------------------

    def _file(self, name: str) -> bytes:
        found = self._assets.get(name)
        if found is None:
            try:
                found = (resources.files(__package__) / "ui" / name).read_bytes()
            except OSError:
                raise ApiError(503, "unavailable", f"the dashboard's {name} is missing") from None
            self._assets[name] = found
        return found

    def _page(
        self, name: str, status: int = 200, headers: dict[str, str] | None = None
    ) -> Response:
        return Response(
            self._file(name),
            status_code=status,
            media_type=_ASSETS[name],
            headers={**_PAGE_HEADERS, **(headers or {})},
        )

    def _signed_in(self, request: Request) -> bool:
        token = request.cookies.get(COOKIE)
        if token is None:
            try:
                token = bearer_token(request)
            except ApiError:  # a malformed header signs nobody in, like none
                return False
        return can_read(self._state, token)

    async def _to_index(self, _: Request) -> Response:
        return RedirectResponse("/ui/", status_code=307)

    async def _index(self, request: Request) -> Response:
        if not self._signed_in(request):
            return RedirectResponse("/ui/login", status_code=303)
        return self._page("index.html")

    async def _asset(self, request: Request) -> Response:
        name = request.url.path.rsplit("/", 1)[-1]
        return self._page(name, headers={"cache-control": "no-cache"})

    async def _login(self, request: Request) -> Response:
        token: str | None = request.query_params.get("token")
        if request.method == "POST":
            token = await _form_token(request)
        if token is None:
            return self._page("login.html")
        if not can_read(self._state, token):
            log.warning("dashboard_login_refused", client=_client(request))
            page = self._file("login.html").replace(b"<!--refused-->", _REFUSED, 1)
            return Response(page, 401, headers=_PAGE_HEADERS, media_type=_ASSETS["login.html"])
        response = RedirectResponse("/ui/", status_code=303, headers=_PAGE_HEADERS)
        response.set_cookie(
            COOKIE,
            token,
            max_age=COOKIE_SECONDS,
            path="/ui",
            httponly=True,
            samesite="lax",
            secure=request.url.scheme == "https",
        )
        return response

    async def _logout(self, _: Request) -> Response:
        response = RedirectResponse("/ui/login", status_code=303, headers=_PAGE_HEADERS)
        response.delete_cookie(COOKIE, path="/ui")
        return response

    # -- data --------------------------------------------------------------------------------

    async def _api_state(self, request: Request) -> Response:
        if not self._signed_in(request):
            return _refused()
        _, body = self.snapshot(max_age=0.0)
        return Response(body, media_type="application/json", headers={"cache-control": "no-store"})

    async def _api_events(self, request: Request) -> Response:
        if not self._signed_in(request):
            return _refused()
        if self.streams >= MAX_STREAMS:
            return JSONResponse(
                {"error": "unavailable", "reason": f"at most {MAX_STREAMS} dashboards at once"},
                503,
                headers={"retry-after": "30"},
            )
        return StreamingResponse(
            self._events(),
            media_type="text/event-stream",
            headers={"cache-control": "no-store", "x-accel-buffering": "no"},
        )

    async def _events(self) -> AsyncIterator[bytes]:
        self.streams += 1
        try:
            yield f"retry: {RECONNECT_MS}\n\n".encode()
            # Jittered, so pages opened together do not all reconnect together.
            ends = self._clock() + self.stream_seconds * random.uniform(0.9, 1.1)
            sent: str | None = None
            wrote = self._clock()
            while True:
                now = self._clock()
                digest, body = self.snapshot()
                if digest != sent:
                    yield b"event: state\ndata: " + body + b"\n\n"
                    sent, wrote = digest, now
                elif now - wrote >= KEEPALIVE_SECONDS:
                    yield b": keep-alive\n\n"
                    wrote = now
                if now >= ends or self.closing:
                    return
                await asyncio.sleep(self.push_seconds)
        finally:
            self.streams -= 1


def _member(instance: dict[str, Any]) -> dict[str, Any]:
    ttl, expires_in = float(instance["ttl"]), float(instance["expires_in"])
    return {
        "id": instance["id"],
        "address": instance["address"],
        "port": instance["port"],
        "version": instance["version"],
        "zone": instance["zone"],
        "healthy": instance["healthy"],
        "lease_age": round(max(0.0, ttl - expires_in), 1),
        "expires_in": round(expires_in, 1),
        "ttl": ttl,
    }


async def _form_token(request: Request) -> str | None:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_LOGIN_BYTES:
            return ""
    try:
        values = parse_qs(body.decode("utf-8", "replace"), max_num_fields=4).get("token")
    except ValueError:  # too many fields
        return ""
    return values[0].strip() if values else ""


def _refused() -> Response:
    return JSONResponse(
        {"error": "unauthenticated", "reason": "sign in at /ui/login (admin or viewer token)"},
        401,
    )


def _client(request: Request) -> str:
    return request.client.host if request.client is not None else "-"
