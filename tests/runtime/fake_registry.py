"""A small stand-in for the registry (docs/registry-api.md): the calls the Mesh runtime makes.

A real HTTP server in a thread on 127.0.0.1, stoppable and restartable on the same port, so
tests can take the registry away and bring it back. Every call is recorded.
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from mesh_middleware import TokenIssuer
from tests.support.servers import free_port

_INSTANCE = re.compile(r"^/v1/catalog/services/([^/]+)/instances/([^/]+)$")
_SERVICE = re.compile(r"^/v1/catalog/services/([^/?]+)$")


@dataclass
class Call:
    """One request the fake registry answered."""

    at: float
    method: str
    path: str
    body: Any
    authorization: str | None
    status: int


@dataclass
class FakeRegistry:
    """The registry's catalog and identity endpoints, just enough for the runtime."""

    issuer: TokenIssuer
    join_tokens: dict[str, str] = field(default_factory=dict)  # token -> service
    token_lifetime: int = 600
    token_delay: float = 0.0  # seconds the token endpoint takes to answer
    trust_domain: str = "mesh.local"
    port: int = field(default_factory=free_port)
    instances: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> FakeRegistry:
        registry = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                path = self.path.split("?", 1)[0]
                status, answer = registry.handle(
                    self.command, path, body, self.headers.get("authorization")
                )
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = _answer

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        """Take the registry away: new connections are refused from now on."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    def forget(self) -> None:
        """Lose every registration (a registry that came back with an empty store)."""
        with self._lock:
            self.instances.clear()

    # -- what tests look at ----------------------------------------------------------------

    def calls_to(self, method: str, prefix: str = "") -> list[Call]:
        with self._lock:
            return [c for c in self.calls if c.method == method and c.path.startswith(prefix)]

    def wait_for(self, condition: Any, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return True
            time.sleep(0.02)
        return bool(condition())

    # -- the API -----------------------------------------------------------------------------

    def _acting(self, authorization: str | None, dev_service: str | None) -> str | None:
        if authorization is None:
            return dev_service if not self.join_tokens else None
        token = authorization.removeprefix("Bearer ")
        return self.join_tokens.get(token)

    def handle(
        self, method: str, path: str, body: Any, authorization: str | None
    ) -> tuple[int, Any]:
        status, answer = self._route(method, path, body, authorization)
        with self._lock:
            self.calls.append(Call(time.monotonic(), method, path, body, authorization, status))
        return status, answer

    def _route(
        self, method: str, path: str, body: Any, authorization: str | None
    ) -> tuple[int, Any]:
        if method == "GET" and path == "/v1/identity/trust":
            return 200, {
                "trust_domain": self.trust_domain,
                "issuer": self.issuer.issuer,
                "jwks_uri": "/v1/identity/jwks",
                "token_lifetime": self.token_lifetime,
            }
        if method == "GET" and path == "/v1/identity/jwks":
            return 200, self.issuer.jwks()
        if method == "POST" and path == "/v1/identity/token":
            time.sleep(self.token_delay)
            service = self._acting(authorization, (body or {}).get("service"))
            if service is None:
                return 401, {"error": "unauthenticated", "reason": "a join token is required"}
            audience = body["audience"]
            token = self.issuer.mint(service, audience, lifetime=self.token_lifetime)
            expires_at = int(time.time()) + self.token_lifetime
            return 200, {
                "token": token,
                "expires_at": expires_at,
                "service": service,
                "audience": audience,
            }
        match = _INSTANCE.match(path)
        if match:
            service, instance = match.groups()
            acting = self._acting(authorization, service)
            if acting is None:
                return 401, {"error": "unauthenticated", "reason": "a join token is required"}
            if acting != service:
                return 403, {"error": "forbidden", "reason": f"join token is for {acting}"}
            with self._lock:
                if method == "PUT":
                    self.instances[(service, instance)] = {"id": instance, **body}
                    return 200, {"instance": self.instances[(service, instance)], "index": 1}
                if method == "DELETE":
                    if self.instances.pop((service, instance), None) is None:
                        return 404, {"error": "not_found", "reason": "no such instance"}
                    return 200, {"index": 1}
        match = _SERVICE.match(path)
        if match and method == "GET":
            with self._lock:
                found = [v for (s, _), v in self.instances.items() if s == match.group(1)]
            return 200, {"service": match.group(1), "index": 1, "instances": found}
        return 404, {"error": "not_found", "reason": path}
