"""Real `mesh registry` processes for the registry's tests, and small calls against them."""

from __future__ import annotations

import base64
import contextlib
import itertools
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from mesh_middleware.identity.keys import KeyStore, parse_jwks
from mesh_middleware.identity.spiffe import service_id
from mesh_middleware.identity.verifier import CallerIdentity, TokenVerifier
from tests.support.servers import REPO, free_port, stop

_starts = itertools.count()


@dataclass
class Registry:
    """One running registry process: where it listens, keeps its data, and writes its output."""

    url: str
    port: int
    data_dir: Path
    proc: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path

    @property
    def admin_token(self) -> str:
        return (self.data_dir / "admin.token").read_text().strip()

    @property
    def viewer_token(self) -> str:
        return (self.data_dir / "viewer.token").read_text().strip()

    def admin(self) -> dict[str, str]:
        """The Authorization header carrying the admin token."""
        return bearer(self.admin_token)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def kill(self) -> None:
        """kill -9 the registry (no shutdown of any kind)."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)


def registry_argv(
    port: int, data_dir: Path, *, dev: bool = False, extra: Sequence[str] = ()
) -> list[str]:
    argv = [sys.executable, "-m", "mesh_middleware", "registry", "--port", str(port)]
    argv += ["--data-dir", str(data_dir), *extra]
    return [*argv, "--dev"] if dev else argv


@contextmanager
def start_registry(
    data_dir: Path,
    *,
    dev: bool = False,
    port: int | None = None,
    timeout: float = 20.0,
    extra: Sequence[str] = (),
    scheme: str = "http",
) -> Iterator[Registry]:
    """Run `mesh registry` on a free loopback port until ``/healthz`` answers; stop it after.

    stdout and stderr go to separate files beside ``data_dir`` (one pair per start).
    """
    port = port or free_port()
    n = next(_starts)
    out_path = data_dir.with_name(f"{data_dir.name}-{n}.stdout")
    err_path = data_dir.with_name(f"{data_dir.name}-{n}.stderr")
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MESH_REGISTRY_DATA", None)
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(
            registry_argv(port, data_dir, dev=dev, extra=extra),
            env=env,
            cwd=REPO,
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    registry = Registry(f"{scheme}://127.0.0.1:{port}", port, data_dir, proc, out_path, err_path)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"registry exited with {proc.returncode}:\n{registry.stderr()}")
            try:
                httpx.get(f"{registry.url}/healthz", timeout=1.0, verify=False)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"registry not ready after {timeout}s") from None
                time.sleep(0.05)
        yield registry
    finally:
        stop(proc)


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def instance_path(service: str, instance_id: str) -> str:
    return f"/v1/catalog/services/{service}/instances/{instance_id}"


def body(port: int = 8001, **fields: Any) -> dict[str, Any]:
    """A registration body: loopback address, the given port, and any other fields."""
    return {"address": "127.0.0.1", "port": port, **fields}


def create_join_token(client: httpx.Client, registry: Registry, service: str) -> str:
    """A join token for ``service``, created with the admin token."""
    response = client.post(
        f"{registry.url}/v1/admin/join-tokens", json={"service": service}, headers=registry.admin()
    )
    assert response.status_code == 201, response.text
    return str(response.json()["token"])


def register(
    client: httpx.Client,
    registry: Registry,
    service: str,
    instance_id: str,
    token: str | None,
    **fields: Any,
) -> httpx.Response:
    """PUT a registration (``fields`` override the default body)."""
    headers = bearer(token) if token else {}
    return client.put(
        f"{registry.url}{instance_path(service, instance_id)}",
        json=body(**fields),
        headers=headers,
    )


def instance_ids(client: httpx.Client, registry: Registry, service: str) -> set[str]:
    response = client.get(f"{registry.url}/v1/catalog/services/{service}")
    assert response.status_code == 200, response.text
    return {i["id"] for i in response.json()["instances"]}


def verify(
    token: str,
    jwks: dict[str, Any],
    audience: str,
    *,
    clock: Callable[[], float] = time.time,
) -> CallerIdentity:
    """Verify a JWT-SVID for ``audience`` (a service name) against a JWKS document."""
    verifier = TokenVerifier(KeyStore(keys=parse_jwks(jwks)), clock=clock)
    return verifier.verify(token, service_id(audience, "mesh.local"))


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> float:
    """Poll until ``predicate()`` holds; return the seconds it took, or fail after ``timeout``."""
    start = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


class HealthServer:
    """A loopback HTTP server whose answer the test switches (status, or a slow answer)."""

    def __init__(self) -> None:
        self.status = 200
        self.delay = 0.0
        self.hits = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.hits += 1
                if owner.delay:
                    time.sleep(owner.delay)
                payload = b"ok" if owner.status < 400 else b"failing"
                try:
                    self.send_response(owner.status)
                    self.send_header("content-length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:
                    pass  # the registry gave up (a check timeout): nothing to answer

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> HealthServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def etcd_store(cluster_hosts: str, directory: Path) -> list[str]:
    """`mesh registry` arguments for a store of its own on the test run's etcd cluster: a fresh
    prefix, and a store key file (0600) in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    key_file = directory / "store.key"
    if not key_file.exists():
        key_file.write_text(base64.b64encode(secrets.token_bytes(32)).decode())
        key_file.chmod(0o600)
    prefix = f"mesh-test-{secrets.token_hex(6)}"
    return ["--store", f"etcd://{cluster_hosts}/{prefix}", "--store-key-file", str(key_file)]


@contextmanager
def start_replicas(
    directory: Path, store: Sequence[str], *, count: int = 3, extra: Sequence[str] = ()
) -> Iterator[list[Registry]]:
    """``count`` registry processes on one etcd store, started one after the other."""
    with contextlib.ExitStack() as stack:
        replicas = [
            stack.enter_context(start_registry(directory / f"replica-{n}", extra=[*store, *extra]))
            for n in range(count)
        ]
        yield replicas
