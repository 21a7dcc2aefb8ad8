"""Mutual TLS handshakes between real sockets: SPIFFE IDs checked, wrong peers refused, and
certificates swapped for new connections while open ones carry on."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from mesh_middleware.identity.tls import SwappableContext, client_context, server_context
from mesh_middleware.identity.x509 import build_csr, generate_key, key_pem, peer_spiffe_id
from mesh_middleware.registry.ca import CertificateAuthority
from mesh_middleware.registry.store import SQLiteStore


class Mesh:
    """A CA and the identity files it issues, in a directory."""

    def __init__(self, directory: Path, trust_domain: str = "mesh.local") -> None:
        self.directory = directory
        self.store = SQLiteStore(directory / f"{trust_domain}.db")
        self.ca = CertificateAuthority(
            self.store,
            trust_domain=trust_domain,
            leaf_lifetime=3600,
            root_lifetime=86400,
            activate_after=600,
        )
        self.trust_domain = trust_domain

    def identity(self, service: str) -> Path:
        key = generate_key()
        issued = self.ca.issue(build_csr(key, ""), service)
        path = self.directory / f"{self.trust_domain}-{service}-{issued.serial}.pem"
        path.write_bytes(issued.certificate_pem.encode() + key_pem(key))
        return path

    def server(self, service: str) -> ssl.SSLContext:
        pem = self.identity(service)
        return server_context(self.trust_domain, pem, pem, self.ca.bundle())

    def client(self, service: str) -> ssl.SSLContext:
        pem = self.identity(service)
        return client_context(self.trust_domain, pem, pem, self.ca.bundle())


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    made = Mesh(tmp_path)
    yield made
    made.store.close()


@contextmanager
def echo_server(context: ssl.SSLContext) -> Iterator[tuple[int, list[object]]]:
    """A TLS echo server on loopback; yields its port and what each handshake gave."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    seen: list[object] = []
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                raw, _ = listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=handle, args=(raw,), daemon=True).start()

    def handle(raw: socket.socket) -> None:
        raw.settimeout(5)
        try:
            with context.wrap_socket(raw, server_side=True) as tls:
                seen.append(peer_spiffe_id(tls.getpeercert()))
                while data := tls.recv(1024):
                    tls.sendall(data)
        except (OSError, ssl.SSLError) as exc:
            seen.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield port, seen
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


def connect(context: ssl.SSLContext, port: int, service: str) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    return context.wrap_socket(raw, server_hostname=service)


def echo(context: ssl.SSLContext, port: int) -> bytes:
    """Send b"ping" and return the echo; a server refusing the client after the handshake
    (TLS 1.3 sends its verdict on the client certificate then) closes without one."""
    with connect(context, port, "inventory") as tls:
        tls.sendall(b"ping")
        answer = tls.recv(4)
    if not answer:
        raise ssl.SSLError("closed by the server without an answer")
    return answer


def test_both_ends_learn_each_others_spiffe_id(mesh: Mesh) -> None:
    with (
        echo_server(mesh.server("inventory")) as (port, seen),
        connect(mesh.client("orders"), port, "inventory") as tls,
    ):
        assert peer_spiffe_id(tls.getpeercert()) == "spiffe://mesh.local/svc/inventory"
        tls.sendall(b"ping")
        assert tls.recv(4) == b"ping"
    assert seen == ["spiffe://mesh.local/svc/orders"]


def test_a_server_of_another_service_is_refused_before_anything_is_sent(mesh: Mesh) -> None:
    expected = r"svc/payments, not .*svc/inventory"
    with (
        echo_server(mesh.server("payments")) as (port, _),
        pytest.raises(ssl.SSLCertVerificationError, match=expected),
    ):
        connect(mesh.client("orders"), port, "inventory")


def test_a_client_without_a_mesh_certificate_is_refused(mesh: Mesh, tmp_path: Path) -> None:
    anyone = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    anyone.check_hostname = False
    anyone.verify_mode = ssl.CERT_NONE
    stranger = Mesh(tmp_path / "other", trust_domain="mesh.local")
    with echo_server(mesh.server("inventory")) as (port, seen):
        for context in (anyone, stranger.client("orders")):
            with pytest.raises((ssl.SSLError, OSError)):
                echo(context, port)
    assert len(seen) == 2
    assert all(isinstance(outcome, ssl.SSLError) for outcome in seen)
    stranger.store.close()


def test_a_server_of_another_ca_is_refused(mesh: Mesh, tmp_path: Path) -> None:
    stranger = Mesh(tmp_path / "other")
    with (
        echo_server(stranger.server("inventory")) as (port, _),
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        connect(mesh.client("orders"), port, "inventory")
    stranger.store.close()


def test_an_empty_swappable_context_makes_no_handshake() -> None:
    empty = SwappableContext(ssl.PROTOCOL_TLS_CLIENT)
    assert not empty.ready
    with socket.socket() as raw, pytest.raises(ssl.SSLError, match="no mesh certificate yet"):
        empty.wrap_socket(raw, server_hostname="inventory")


def test_a_swap_serves_new_connections_and_leaves_open_ones_alone(mesh: Mesh) -> None:
    server = SwappableContext(ssl.PROTOCOL_TLS_SERVER, mesh.server("inventory"))
    client = SwappableContext(ssl.PROTOCOL_TLS_CLIENT, mesh.client("orders"))
    with echo_server(server) as (port, _), connect(client, port, "inventory") as before:
        first = before.getpeercert(binary_form=True)
        server.swap(mesh.server("inventory"))
        client.swap(mesh.client("orders"))
        with connect(client, port, "inventory") as after:
            assert after.getpeercert(binary_form=True) != first
            after.sendall(b"new")
            assert after.recv(3) == b"new"
        before.sendall(b"old")
        assert before.recv(3) == b"old"  # the open connection kept its certificate
        assert before.getpeercert(binary_form=True) == first
