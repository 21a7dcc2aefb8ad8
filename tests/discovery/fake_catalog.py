"""A tiny stand-in for the registry's catalog read: answers every GET at once, as told.

It never blocks a watch, which is exactly the registry misbehaviour a client must survive
without busy-looping. Every request is recorded with its time and query.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass
class Request:
    """One GET the fake answered."""

    at: float
    path: str
    query: dict[str, str]


@dataclass
class FakeCatalog:
    """Answers ``GET /v1/catalog/services/{service}`` with ``index`` and ``instances``.

    ``raw`` (bytes) replaces the JSON answer when set; ``delay`` holds every answer back.
    """

    index: int = 1
    instances: list[dict[str, Any]] = field(default_factory=list)
    raw: bytes | None = None
    status: int = 200
    delay: float = 0.0
    requests: list[Request] = field(default_factory=list)
    port: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set(self, index: int, instances: list[dict[str, Any]]) -> None:
        """Answer with this state from now on."""
        with self._lock:
            self.index, self.instances, self.raw = index, instances, None

    def seen(self) -> list[Request]:
        with self._lock:
            return list(self.requests)

    def _answer(self, path: str) -> tuple[int, bytes]:
        parts = urlsplit(path)
        with self._lock:
            query = {k: v[0] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
            self.requests.append(Request(time.monotonic(), parts.path, query))
            if self.raw is not None:
                return self.status, self.raw
            service = parts.path.rsplit("/", 1)[-1]
            body = {"service": service, "index": self.index, "instances": self.instances}
            return self.status, json.dumps(body).encode()


@contextmanager
def serving(fake: FakeCatalog) -> Iterator[FakeCatalog]:
    """Serve ``fake`` on 127.0.0.1 (its ``port``, or a free one) until the block ends."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status, data = fake._answer(self.path)
            if fake.delay:
                time.sleep(fake.delay)
            try:
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except OSError:
                pass  # the client gave up (a timeout under test)

        def log_message(self, *args: Any) -> None:
            pass

    ThreadingHTTPServer.allow_reuse_address = True
    server = ThreadingHTTPServer(("127.0.0.1", fake.port), Handler)
    server.daemon_threads = True
    fake.port = int(server.server_address[1])
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def instance(instance_id: str, port: int = 8001, **fields: Any) -> dict[str, Any]:
    """An instance as the registry lists it."""
    return {
        "service": "inventory",
        "id": instance_id,
        "address": "127.0.0.1",
        "port": port,
        "version": fields.pop("version", None),
        "zone": fields.pop("zone", None),
        "metadata": {},
        "healthy": True,
        **fields,
    }


def wait_until(predicate: Any, timeout: float, interval: float = 0.02) -> None:
    """Poll ``predicate`` until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)
