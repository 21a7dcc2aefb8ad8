"""Address detection: MESH_ADVERTISE, the process's listening sockets in /proc, request hints."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from mesh_middleware import TokenIssuer
from mesh_middleware.runtime.address import (
    AddressFinder,
    Listener,
    advertise_host,
    choose_listener,
    instance_id,
    listening_sockets,
    parent_holds_sockets,
    parse_advertise,
)
from tests.runtime.fake_registry import FakeRegistry
from tests.support.policies import SERVER_POLICY
from tests.support.servers import REPO, free_port, gunicorn_argv, stop, uvicorn_argv

needs_proc = pytest.mark.skipif(not Path("/proc/self/net/tcp").exists(), reason="needs /proc")


def _can_bind_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


# -- pure parts ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("10.0.0.5:8000", ("10.0.0.5", 8000)),
        ("inventory.internal:80", ("inventory.internal", 80)),
        ("[fd00::1]:8443", ("fd00::1", 8443)),
        (" 127.0.0.1:1 ", ("127.0.0.1", 1)),
    ],
)
def test_advertise_override_is_parsed(value: str, expected: tuple[str, int]) -> None:
    """MESH_ADVERTISE is host:port, or [v6]:port."""
    assert parse_advertise(value) == expected


@pytest.mark.parametrize(
    "value", ["", "8000", "host", "host:", ":80", "host:0", "host:65536", "[::1]8000", "a b:1"]
)
def test_a_malformed_override_is_an_error(value: str) -> None:
    """A bad MESH_ADVERTISE fails at start with what is expected, not at registration."""
    with pytest.raises(ValueError, match="MESH_ADVERTISE"):
        parse_advertise(value)


def test_wildcard_binds_are_advertised_on_loopback() -> None:
    """0.0.0.0 and :: cannot be dialled: they become 127.0.0.1; mapped IPv4 is unwrapped."""
    assert advertise_host("0.0.0.0") == "127.0.0.1"
    assert advertise_host("::") == "127.0.0.1"
    assert advertise_host("::ffff:10.1.2.3") == "10.1.2.3"
    assert advertise_host("10.1.2.3") == "10.1.2.3"
    assert advertise_host("::1") == "::1"


def test_instance_ids_come_from_the_address() -> None:
    """service-host-port, with characters an instance id may not hold replaced, at most 128."""
    assert instance_id("inventory", "127.0.0.1", 8000) == "inventory-127.0.0.1-8000"
    assert instance_id("inventory", "fd00::1", 80) == "inventory-fd00::1-80"
    assert instance_id("a", "host_name/x y", 1) == "a-host_name-x-y-1"
    assert len(instance_id("a", "h" * 300, 1)) == 128


def test_several_listeners_prefer_the_request_port_then_reachable_ones() -> None:
    """A request's port wins; else a wildcard bind beats loopback, IPv4 beats IPv6, low ports."""
    sockets = [
        Listener("127.0.0.1", 9100, 1),
        Listener("0.0.0.0", 8000, 2),
        Listener("::", 8000, 3),
        Listener("0.0.0.0", 8001, 4),
    ]
    assert choose_listener(sockets) == Listener("0.0.0.0", 8000, 2)
    assert choose_listener(sockets, prefer_port=9100) == Listener("127.0.0.1", 9100, 1)
    assert choose_listener([]) is None


def test_the_override_wins_then_sockets_then_the_request(tmp_path: Path) -> None:
    """AddressFinder's order; without /proc (here: an empty directory) the request decides."""
    assert AddressFinder(("10.0.0.5", 81)).resolve() is not None
    overridden = AddressFinder(("10.0.0.5", 81), proc=str(tmp_path))
    overridden.hint("127.0.0.1", 9999)
    found = overridden.resolve()
    assert found is not None
    assert (found.host, found.port, found.source) == ("10.0.0.5", 81, "MESH_ADVERTISE")

    finder = AddressFinder(proc=str(tmp_path))
    assert finder.resolve() is None
    finder.hint("0.0.0.0", "8080")  # WSGI gives SERVER_PORT as a string
    finder.hint("10.9.9.9", 1)  # only the first hint counts
    found = finder.resolve()
    assert found is not None
    assert (found.host, found.port, found.source) == ("127.0.0.1", 8080, "first request")


@pytest.mark.parametrize(
    ("host", "port"), [(None, 80), ("", 80), ("h", None), ("h", "x"), ("h", 0)]
)
def test_unusable_hints_are_ignored(tmp_path: Path, host: object, port: object) -> None:
    """A unix-socket server (port None) or a junk value never becomes the advertised address."""
    finder = AddressFinder(proc=str(tmp_path))
    finder.hint(host, port)
    assert finder.resolve() is None


# -- /proc ---------------------------------------------------------------------------------


@needs_proc
def test_listening_sockets_of_this_process_are_found() -> None:
    """A socket we listen on appears with its address and port; a merely bound one does not."""
    with (
        socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listening,
        socket.socket(socket.AF_INET, socket.SOCK_STREAM) as bound,
    ):
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        bound.bind(("127.0.0.1", 0))
        found = {(s.host, s.port) for s in listening_sockets()}
        assert ("127.0.0.1", listening.getsockname()[1]) in found
        assert ("127.0.0.1", bound.getsockname()[1]) not in found


@needs_proc
@pytest.mark.skipif(not _can_bind_ipv6(), reason="no IPv6 loopback here")
def test_ipv6_listeners_are_decoded() -> None:
    """tcp6 rows are decoded word by word: ::1 comes back as ::1."""
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
        sock.bind(("::1", 0))
        sock.listen()
        assert ("::1", sock.getsockname()[1]) in {(s.host, s.port) for s in listening_sockets()}


@needs_proc
def test_a_child_knows_when_its_parent_holds_the_same_socket() -> None:
    """A pre-fork server's worker shares the socket with its parent; an unrelated one does not."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        code = (
            "import sys\n"
            "from mesh_middleware.runtime.address import listening_sockets, parent_holds_sockets\n"
            "inodes = {s.inode for s in listening_sockets()}\n"
            "sys.exit(0 if inodes and parent_holds_sockets(inodes) else 1)\n"
        )
        inherited = subprocess.run(
            [sys.executable, "-c", code], pass_fds=[sock.fileno()], cwd=REPO, check=False
        )
        assert inherited.returncode == 0
    assert not parent_holds_sockets({1, 2, 3})  # no such sockets in our parent
    assert not parent_holds_sockets(set())


# -- real servers --------------------------------------------------------------------------


@pytest.fixture
def registry(issuer: TokenIssuer) -> Iterator[FakeRegistry]:
    fake = FakeRegistry(issuer, join_tokens={"jt-inventory": "inventory"}).start()
    yield fake
    fake.stop()


def _launch(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    full = {**os.environ, "PYTHONPATH": str(REPO), **env}
    full.pop("MESH_ADVERTISE", None)
    with open(log, "wb") as out:
        return subprocess.Popen(
            argv, env=full, cwd=REPO, stdout=out, stderr=out, start_new_session=True
        )


def _env(tmp_path: Path, registry: FakeRegistry) -> dict[str, str]:
    policy = tmp_path / "policy.yaml"
    policy.write_text(SERVER_POLICY)
    return {
        "MESH_POLICY": str(policy),
        "MESH_REGISTRY_URL": registry.url,
        "MESH_JOIN_TOKEN": "jt-inventory",
    }


@pytest.mark.slow
@needs_proc
def test_a_real_uvicorn_process_registers_the_port_it_listens_on(
    tmp_path: Path, registry: FakeRegistry, issuer: TokenIssuer
) -> None:
    """uvicorn binds after lifespan startup; /proc finds the port without any request."""
    port = free_port()
    proc = _launch(
        uvicorn_argv("tests.support.asgi_app:app", port),
        _env(tmp_path, registry),
        tmp_path / "server.log",
    )
    try:
        key = ("inventory", f"inventory-127.0.0.1-{port}")
        assert registry.wait_for(lambda: key in registry.instances, 20), (
            tmp_path / "server.log"
        ).read_text()
        instance = registry.instances[key]
        assert (instance["address"], instance["port"]) == ("127.0.0.1", port)
        assert instance["metadata"] == {"pid": str(proc.pid), "framework": "fastapi"}
        token = issuer.mint("gateway", "inventory")
        answer = httpx.get(
            f"http://127.0.0.1:{port}/items/1", headers={"x-mesh-identity": token}, timeout=5
        )
        assert answer.status_code == 200
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
        assert key not in registry.instances  # lifespan shutdown deregistered it
        assert [c.status for c in registry.calls_to("DELETE")] == [200]
    finally:
        stop(proc)


@pytest.mark.slow
@needs_proc
@pytest.mark.parametrize("preload", [False, True], ids=["import-per-worker", "preload"])
def test_gunicorn_workers_share_one_instance_and_leave_it_on_shutdown(
    tmp_path: Path, registry: FakeRegistry, preload: bool
) -> None:
    """Both workers find the master's socket and renew one instance, with the master's pid,
    before any request; a recycled worker leaves it to its siblings; a shutdown removes it."""
    port = free_port()
    argv = [*gunicorn_argv("tests.support.wsgi_app:app", port), "--max-requests", "3"]
    if preload:
        argv.append("--preload")
    proc = _launch(argv, _env(tmp_path, registry), tmp_path / "server.log")
    try:
        key = ("inventory", f"inventory-127.0.0.1-{port}")
        started = time.monotonic()
        assert registry.wait_for(lambda: key in registry.instances, 20)
        instance = registry.instances[key]
        assert instance["metadata"] == {"pid": str(proc.pid), "framework": "flask"}
        assert registry.wait_for(
            lambda: (
                len({c.path for c in registry.calls_to("PUT")}) == 1
                and len(registry.calls_to("PUT")) >= 2
            ),
            10,
        )
        assert time.monotonic() - started < 20
        # Workers exit after 3 requests each (gunicorn --max-requests) and are replaced.
        for _ in range(10):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
        time.sleep(1.0)
        assert registry.calls_to("DELETE") == []
        assert key in registry.instances
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
        assert key not in registry.instances
    finally:
        stop(proc)
