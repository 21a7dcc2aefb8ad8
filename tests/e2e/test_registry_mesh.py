"""Apps and the registry as real processes: join, identity, leases, outages and restarts.

A FastAPI app under uvicorn and a Flask app under gunicorn (2 workers) are started with only
MESH_POLICY, MESH_REGISTRY_URL and MESH_JOIN_TOKEN in their environment.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support.servers import REPO, free_port, gunicorn_argv, running, stop, uvicorn_argv

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

POLICY = """\
service: {service}
version: v1
inbound:
  authentication: strict
  public: [/healthz]
  authorization:
    rules:
      - name: orders-only
        action: allow
        from: [orders]
"""


@dataclass
class Registry:
    port: int
    data: Path
    admin: str
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextmanager
def _registry_process(registry: Registry, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    argv = [
        sys.executable,
        "-m",
        "mesh_middleware",
        "registry",
        "--port",
        str(registry.port),
        "--data-dir",
        str(registry.data),
    ]
    with running(argv, port=registry.port, log_path=log) as proc:
        registry.proc = proc
        yield proc


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    """A real registry process with its own data directory."""
    reg = Registry(free_port(), tmp_path / "registry", "")
    with _registry_process(reg, tmp_path / "registry.log"):
        reg.admin = (reg.data / "admin.token").read_text().strip()
        yield reg


def _join_token(registry: Registry, service: str) -> str:
    response = httpx.post(
        f"{registry.url}/v1/admin/join-tokens",
        json={"service": service},
        headers={"authorization": f"Bearer {registry.admin}"},
    )
    response.raise_for_status()
    return str(response.json()["token"])


def _token(registry: Registry, join_token: str, audience: str) -> str:
    response = httpx.post(
        f"{registry.url}/v1/identity/token",
        json={"audience": audience},
        headers={"authorization": f"Bearer {join_token}"},
    )
    response.raise_for_status()
    return str(response.json()["token"])


def _mesh_instances(registry: Registry, service: str) -> list[dict[str, object]]:
    done = subprocess.run(
        [sys.executable, "-m", "mesh_middleware", "instances", service, "--json"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        env={**os.environ, "MESH_REGISTRY_URL": registry.url},
        cwd=REPO,
    )
    instances: list[dict[str, object]] = json.loads(done.stdout)
    return instances


def _eventually(check: Callable[[], bool], within: float, step: float = 0.1) -> float:
    """Seconds until ``check`` held; fails after ``within``."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > within:
            raise AssertionError(f"not within {within}s")
        time.sleep(step)
    return time.monotonic() - started


def _app_env(tmp_path: Path, registry: Registry, service: str) -> dict[str, str]:
    policy = tmp_path / f"{service}.yaml"
    policy.write_text(POLICY.format(service=service))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env.update(
        MESH_POLICY=str(policy),
        MESH_REGISTRY_URL=registry.url,
        MESH_JOIN_TOKEN=_join_token(registry, service),
    )
    return env


def _kill9(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


@pytest.mark.parametrize("server", ["uvicorn", "gunicorn"])
def test_an_app_joins_within_2s_and_vanishes_within_a_lease_after_kill_9(
    tmp_path: Path, registry: Registry, server: str
) -> None:
    """Started with only the three variables, an app is listed within 2 s; kill -9 removes it
    within one lease (15 s)."""
    service = "inventory" if server == "uvicorn" else "orders"
    env = _app_env(tmp_path, registry, service)
    port = free_port()
    argv = (
        uvicorn_argv("tests.support.asgi_app:app", port)
        if server == "uvicorn"
        else gunicorn_argv("tests.support.wsgi_app:app", port, workers=2)
    )
    started = time.monotonic()
    with running(argv, port=port, env=env, log_path=tmp_path / "app.log") as app:
        _eventually(lambda: len(_mesh_instances(registry, service)) == 1, within=5.0)
        assert time.monotonic() - started <= 2.0 + 1.5  # CLI process start-up is not the app's
        (instance,) = _mesh_instances(registry, service)
        assert instance["port"] == port and instance["version"] == "v1"
        _kill9(app)
        gone = _eventually(lambda: not _mesh_instances(registry, service), within=20.0, step=0.5)
        assert gone <= 15.0 + 1.5


def test_tokens_from_the_registry_are_verified_by_the_app(
    tmp_path: Path, registry: Registry
) -> None:
    """The app verifies the registry's JWT-SVIDs: orders is allowed, another service is not."""
    env = _app_env(tmp_path, registry, "inventory")
    port = free_port()
    orders = _join_token(registry, "orders")
    payments = _join_token(registry, "payments")
    with running(uvicorn_argv("tests.support.asgi_app:app", port), port=port, env=env):
        url = f"http://127.0.0.1:{port}/items/1"
        ok = httpx.get(url, headers={"x-mesh-identity": _token(registry, orders, "inventory")})
        assert ok.status_code == 200 and ok.json()["caller"] == "orders"
        denied = httpx.get(
            url, headers={"x-mesh-identity": _token(registry, payments, "inventory")}
        )
        assert denied.status_code == 403
        wrong_audience = httpx.get(url, headers={"x-mesh-identity": _token(registry, orders, "x")})
        assert wrong_audience.status_code == 401


def test_registry_down_the_app_keeps_serving_and_rejoins_by_itself(
    tmp_path: Path, registry: Registry
) -> None:
    """With the registry stopped, authorized calls keep working on cached keys; when it
    returns (same data), the app re-registers without a restart."""
    env = _app_env(tmp_path, registry, "inventory")
    port = free_port()
    orders = _join_token(registry, "orders")
    token = _token(registry, orders, "inventory")
    with running(uvicorn_argv("tests.support.asgi_app:app", port), port=port, env=env):
        _eventually(lambda: len(_mesh_instances(registry, "inventory")) == 1, within=5.0)
        assert registry.proc is not None
        _kill9(registry.proc)
        url = f"http://127.0.0.1:{port}/items/1"
        deadline = time.monotonic() + 20.0  # longer than the lease: the app must not care
        while time.monotonic() < deadline:
            response = httpx.get(url, headers={"x-mesh-identity": token}, timeout=5)
            assert response.status_code == 200
            time.sleep(1.0)
        with _registry_process(registry, tmp_path / "registry-2.log"):
            # The stored registration is back at once; its lease is renewed by the app.
            _eventually(lambda: len(_mesh_instances(registry, "inventory")) == 1, within=5.0)
            time.sleep(16.0)  # one lease later it is still there: the app renewed it
            assert len(_mesh_instances(registry, "inventory")) == 1
            fresh = _token(registry, orders, "inventory")
            assert httpx.get(url, headers={"x-mesh-identity": fresh}).status_code == 200


def test_a_registry_restart_keeps_registrations_and_tokens_verifying(
    tmp_path: Path, registry: Registry
) -> None:
    """SIGTERM and restart the registry: the instance is still listed, a token minted before
    the restart still verifies, and new tokens verify too."""
    env = _app_env(tmp_path, registry, "inventory")
    port = free_port()
    orders = _join_token(registry, "orders")
    before = _token(registry, orders, "inventory")
    with running(uvicorn_argv("tests.support.asgi_app:app", port), port=port, env=env):
        _eventually(lambda: len(_mesh_instances(registry, "inventory")) == 1, within=5.0)
        assert registry.proc is not None
        stop(registry.proc)
        with _registry_process(registry, tmp_path / "registry-2.log"):
            assert len(_mesh_instances(registry, "inventory")) == 1
            url = f"http://127.0.0.1:{port}/items/1"
            assert httpx.get(url, headers={"x-mesh-identity": before}).status_code == 200
            after = _token(registry, orders, "inventory")
            assert httpx.get(url, headers={"x-mesh-identity": after}).status_code == 200
