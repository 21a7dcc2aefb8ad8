"""Key sets come from a JWKS file or URL; unknown kids refetch, rate-limited; failures keep keys."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from mesh_middleware import TokenIssuer
from mesh_middleware.identity.keys import KeyStore, parse_jwks


class _JwksServer:
    def __init__(self) -> None:
        self.document: Any = {"keys": []}
        self.hits = 0
        self.status = 200
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.hits += 1
                body = json.dumps(owner.document).encode()
                self.send_response(owner.status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/jwks"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def jwks_server() -> Iterator[_JwksServer]:
    """A real HTTP server on loopback serving a JWKS document."""
    server = _JwksServer()
    yield server
    server.close()


def test_parse_keeps_only_public_ed25519_keys(issuer: TokenIssuer) -> None:
    """RSA keys, keys without kid and private keys are ignored."""
    doc = issuer.jwks()
    doc["keys"] += [
        {"kty": "RSA", "kid": "r", "n": "AQAB", "e": "AQAB"},
        {"kty": "OKP", "crv": "Ed25519", "x": doc["keys"][0]["x"]},
        {**doc["keys"][0], "kid": "private", "d": "secret"},
    ]
    assert list(parse_jwks(doc)) == [issuer.kid]


@pytest.mark.parametrize("document", [[], {"keys": 3}, "x", None])
def test_parse_refuses_non_jwks(document: Any) -> None:
    """A document that is not a JWKS raises ValueError."""
    with pytest.raises(ValueError, match="JWKS"):
        parse_jwks(document)


def test_url_source_and_rate_limited_refetch(jwks_server: _JwksServer, issuer: TokenIssuer) -> None:
    """An unknown kid refetches once; a second unknown kid within the interval does not."""
    now = [0.0]
    store = KeyStore(jwks_server.url, min_refetch_seconds=10, clock=lambda: now[0])
    jwks_server.document = issuer.jwks()
    assert store.refresh() and store.kids() == [issuer.kid]
    rotated = TokenIssuer()
    jwks_server.document = {"keys": issuer.jwks()["keys"] + rotated.jwks()["keys"]}
    now[0] = 11.0
    assert store.refresh_for_unknown_kid(rotated.kid)
    assert jwks_server.hits == 2
    assert not store.refresh_for_unknown_kid("no-such-kid")
    assert not store.refresh_for_unknown_kid("another-unknown")
    assert jwks_server.hits == 2  # both inside the interval: no fetch
    now[0] = 22.0
    assert not store.refresh_for_unknown_kid("no-such-kid")
    assert jwks_server.hits == 3


def test_a_failed_fetch_keeps_the_last_good_keys(
    jwks_server: _JwksServer, issuer: TokenIssuer
) -> None:
    """Registry or JWKS host down: verification keeps working on the cached keys."""
    store = KeyStore(jwks_server.url)
    jwks_server.document = issuer.jwks()
    assert store.refresh()
    jwks_server.status = 503
    assert not store.refresh()
    assert store.kids() == [issuer.kid]
    assert store.last_error is not None


def test_an_unreachable_url_fails_fast_and_keeps_keys(issuer: TokenIssuer) -> None:
    """A closed port is a quick failure, not a hang."""
    store = KeyStore("http://127.0.0.1:9/jwks", keys=parse_jwks(issuer.jwks()), fetch_timeout=1)
    assert not store.refresh()
    assert store.kids() == [issuer.kid]


def test_a_jwks_file_is_reloaded_when_it_changes(tmp_path: Path, issuer: TokenIssuer) -> None:
    """Rotation by rewriting the file is picked up by the background check."""
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(issuer.jwks()))
    store = KeyStore(path)
    assert store.refresh()
    rotated = TokenIssuer()
    path.write_text(json.dumps(rotated.jwks()) + "\n")
    store.refresh_if_changed()
    assert store.kids() == [rotated.kid]


def test_a_corrupt_jwks_file_keeps_keys(tmp_path: Path, issuer: TokenIssuer) -> None:
    """A half-written file does not wipe the key set."""
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(issuer.jwks()))
    store = KeyStore(path)
    store.refresh()
    path.write_text("{not json")
    store.refresh_if_changed()
    assert store.kids() == [issuer.kid]


class _TricklingServer:
    """Answers a JWKS one byte at a time, slowly: a fetch must give up on its own deadline."""

    def __init__(self) -> None:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/jwks"
        self.connections = 0
        self.stopped = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._trickle, args=(conn,), daemon=True).start()

    def _trickle(self, conn: Any) -> None:
        with conn:
            conn.recv(4096)
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n")
            for byte in b'{"keys": []}' * 100:
                if self.stopped.wait(0.5):
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    return

    def close(self) -> None:
        self.stopped.set()
        self.sock.close()


def test_an_unknown_kid_wait_is_bounded_and_shared() -> None:
    """A trickling JWKS source cannot hold requests past the wait, and they share one fetch."""
    import time

    server = _TricklingServer()
    try:
        store = KeyStore(server.url, fetch_timeout=1.0)
        started = time.monotonic()
        futures = [store.refetch_for("new-kid") for _ in range(20)]
        assert all(f is futures[0] for f in futures) and futures[0] is not None
        assert not store.refresh_for_unknown_kid("new-kid", timeout=0.5)
        assert time.monotonic() - started < 1.0
        futures[0].result(timeout=5)  # the fetch itself ends by its own deadline
        assert time.monotonic() - started < 3.0
        assert store.last_error is not None and "longer than" in store.last_error
        assert server.connections == 1
    finally:
        server.close()
