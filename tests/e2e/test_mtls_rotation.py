"""Certificates renewed, and the CA root rotated, under steady load: not one request fails.

Leaves live 4 s here (renewed every ~2 s by both ends), so a 14-second run crosses several
renewals of each; a root rotation lands in the middle of it. Half the requests open a new
connection each (every one a handshake with whatever certificates are current), half reuse
kept-alive connections made with older ones.
"""

from __future__ import annotations

import re
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from mesh_middleware import Mesh
from mesh_middleware.adapters.httpx import MeshTransport
from mesh_middleware.identity.x509 import load_certificate
from tests.e2e.mtls_support import mesh_run, mesh_run_argv, with_mtls
from tests.e2e.test_mtls import CLIENT_POLICY, run_env, write
from tests.registry.support import Registry, start_registry
from tests.support.policies import SERVER_POLICY
from tests.support.servers import free_port

LOAD_SECONDS = 14.0
MAX_REQUESTS = 20_000


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    extra = ["--cert-ttl", "4s", "--ca-activate-after", "5s"]
    with start_registry(tmp_path / "registry", dev=True, extra=extra) as running_registry:
        yield running_registry


def issued(registry: Registry, service: str) -> int:
    metrics = httpx.get(f"{registry.url}/metrics", timeout=5.0).text
    found = re.search(
        rf'^mesh_registry_certificates_issued_total\{{service="{service}"\}} (\S+)$',
        metrics,
        re.MULTILINE,
    )
    return int(float(found.group(1))) if found else 0


def test_zero_failed_requests_across_renewals_and_a_root_rotation(
    registry: Registry, tmp_path: Path
) -> None:
    policy = write(tmp_path / "strict.yaml", with_mtls(SERVER_POLICY, "strict"))
    port = free_port()
    with mesh_run(
        mesh_run_argv("tests.support.asgi_app:app", port),
        env=run_env(registry, policy),
        registry_url=registry.url,
        service="inventory",
        port=port,
        log_path=tmp_path / "inventory.log",
    ):
        server_certificates: set[bytes] = set()

        def handshake(event: str, info: dict[str, object]) -> None:
            if event == "connection.start_tls.complete":
                stream = info["return_value"]
                ssl_object: ssl.SSLObject = stream.get_extra_info("ssl_object")  # type: ignore[attr-defined]
                server_certificates.add(ssl_object.getpeercert(True) or b"")

        client_policy = write(tmp_path / "client.yaml", CLIENT_POLICY)
        before = issued(registry, "inventory")
        failures: list[str] = []
        sent = 0
        rotated_root: str | None = None
        with (
            Mesh(client_policy, registry_url=registry.url) as mesh,
            mesh.client(timeout=5.0) as kept_alive,
            httpx.Client(
                transport=MeshTransport(mesh, limits=httpx.Limits(max_keepalive_connections=0)),
                timeout=5.0,
            ) as fresh_each_time,
        ):
            started = time.monotonic()
            while time.monotonic() - started < LOAD_SECONDS and sent < MAX_REQUESTS:
                if rotated_root is None and time.monotonic() - started > 4.0:
                    answer = httpx.post(
                        f"{registry.url}/v1/admin/ca/rotate",
                        json={"activate_after": "5s"},
                        headers=registry.admin(),
                        timeout=5.0,
                    )
                    assert answer.status_code == 200, answer.text
                    rotated_root = str(answer.json()["root"])
                client = fresh_each_time if sent % 2 else kept_alive
                sent += 1
                try:
                    response = client.get(
                        f"http://inventory/items/{sent}", extensions={"trace": handshake}
                    )
                except httpx.HTTPError as exc:
                    failures.append(f"{type(exc).__name__}: {exc}")
                    continue
                if response.status_code != 200:
                    failures.append(f"{response.status_code}: {response.text[:200]}")
        renewals = issued(registry, "inventory") - before
        client_renewals = issued(registry, "gateway")
    print(
        f"\nmTLS rotation under load: {sent} requests, {len(failures)} failed; inventory renewed "
        f"{renewals} times, the client {client_renewals - 1}; {len(server_certificates)} server "
        "certificates seen in new handshakes; the root rotated mid-run"
    )
    assert failures == [], f"{len(failures)} of {sent} requests failed: {failures[:5]}"
    assert sent >= 200
    # Two renewals at the least on each side (about six happen in the run).
    assert renewals >= 2, renewals
    assert client_renewals >= 3, client_renewals
    assert len(server_certificates) >= 3
    # And the last certificates were signed by the new root.
    bundle = httpx.get(f"{registry.url}/v1/ca/bundle", timeout=5.0).json()
    new_root = next(r for r in bundle["roots"] if r["id"] == rotated_root)
    assert new_root["state"] == "signing"
    new_subject = load_certificate(new_root["certificate"]).subject
    issuers = {
        load_certificate(ssl.DER_cert_to_PEM_cert(der)).issuer for der in server_certificates
    }
    assert new_subject in issuers
    assert len(issuers) == 2  # served under both roots, with no failure at the switch
