"""This instance's certificate against a real registry: obtained, written owner-only, renewed at
half life, kept through an outage, and its trust bundle refreshed after a root rotation."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from mesh_middleware.runtime.certificates import CertificateManager, TLSFiles
from mesh_middleware.runtime.registry_client import RegistryClient
from tests.registry.support import Registry, start_registry


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    with start_registry(tmp_path / "registry", dev=True) as running:
        yield running


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def manager(registry: Registry, clock: Clock, tmp_path: Path) -> Iterator[CertificateManager]:
    client = RegistryClient(registry.url, timeout=2.0)
    directory = tmp_path / "tls"
    directory.mkdir(mode=0o700)
    made = CertificateManager(
        client,
        lambda: "orders",
        lambda: "mesh.local",
        TLSFiles(directory),
        clock=clock,
        uniform=lambda low, high: high,
    )
    yield made
    client.close()


def serial(manager: CertificateManager) -> bytes:
    return manager.files.identity.read_bytes().split(b"-----END CERTIFICATE-----")[0]


def test_nothing_is_fetched_until_someone_wants_a_certificate(
    manager: CertificateManager,
) -> None:
    manager.tick()
    assert not manager.contexts.ready
    assert not manager.files.identity.exists()


def test_obtained_written_owner_only_and_renewed_at_half_life(
    manager: CertificateManager, clock: Clock
) -> None:
    assert manager.obtain(timeout=5.0)
    assert manager.contexts.ready
    assert manager.contexts.spiffe_id == "spiffe://mesh.local/svc/orders"
    mode = stat.S_IMODE(manager.files.identity.stat().st_mode)
    assert mode == 0o600
    assert b"PRIVATE KEY" in manager.files.identity.read_bytes()
    first = serial(manager)
    clock.now += 12 * 3600 - 1  # 24 h leaves: not yet half way
    manager.tick()
    assert serial(manager) == first
    clock.now += 1
    manager.tick()
    assert serial(manager) != first


def test_an_outage_keeps_the_certificate_in_use_and_retries_with_backoff(
    manager: CertificateManager, registry: Registry, clock: Clock
) -> None:
    assert manager.obtain(timeout=5.0)
    current = manager.contexts.client.current
    registry.kill()
    clock.now += 12 * 3600
    manager.tick()
    assert manager.contexts.client.current is current  # still presented
    assert manager.contexts.ready
    due = manager._renew_at
    assert clock.now < due <= clock.now + 0.5


def test_the_bundle_follows_a_root_rotation(
    manager: CertificateManager, registry: Registry, clock: Clock
) -> None:
    assert manager.obtain(timeout=5.0)
    assert len(manager.files.read_bundle()) == 1
    rotated = httpx.post(
        f"{registry.url}/v1/admin/ca/rotate", json={}, headers=registry.admin(), timeout=5.0
    )
    assert rotated.status_code == 200
    before = manager.contexts.client.current
    clock.now += 66  # the bundle is refetched every minute (jittered up to +10%)
    manager.tick()
    assert len(manager.files.read_bundle()) == 2
    assert manager.contexts.client.current is not before  # new handshakes trust both roots


def test_close_removes_the_key(manager: CertificateManager) -> None:
    assert manager.obtain(timeout=5.0)
    manager.close()
    assert not manager.files.directory.exists()


def test_a_failed_fetch_is_not_asked_again_by_every_caller(
    registry: Registry, clock: Clock, tmp_path: Path
) -> None:
    """The files cannot be written (an OSError, not a crash): the failure backs off, and callers
    asking meanwhile get an answer at once instead of another round trip each."""
    client = RegistryClient(registry.url, timeout=2.0)
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    manager = CertificateManager(
        client, lambda: "orders", lambda: "mesh.local", TLSFiles(blocked), clock=clock
    )
    try:
        before = issued_count(registry)
        assert not manager.obtain(timeout=5.0)
        assert issued_count(registry) == before + 1
        assert not manager.obtain(timeout=5.0)  # within the backoff: no second request
        assert issued_count(registry) == before + 1
        clock.now += 1.0
        assert not manager.obtain(timeout=5.0)  # after it: one more try
        assert issued_count(registry) == before + 2
    finally:
        client.close()


def issued_count(registry: Registry) -> int:
    metrics = httpx.get(f"{registry.url}/metrics", timeout=5.0).text
    return int(
        sum(
            float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("mesh_registry_certificates_issued_total{")
        )
    )


def test_a_mesh_never_presents_another_services_certificate(
    manager: CertificateManager, registry: Registry, tmp_path: Path
) -> None:
    """MESH_TLS_DIR inherited by a process of another service (a child of a `mesh run` app):
    its Mesh ignores the directory, and says nothing about serving mTLS."""
    from mesh_middleware import Mesh
    from mesh_middleware.policy.compiled import compile_policy_text

    assert manager.obtain(timeout=5.0)  # orders' certificate
    policy = compile_policy_text("service: payments\n")
    with Mesh(
        policy, registry_url=registry.url, watch=False, tls_dir=manager.files.directory
    ) as payments:
        assert payments.tls is None or payments.tls.spiffe_id != manager.contexts.spiffe_id
        assert payments.certificates is not None  # it would fetch its own
    policy = compile_policy_text("service: orders\n")
    with Mesh(
        policy, registry_url=registry.url, watch=False, tls_dir=manager.files.directory
    ) as orders:
        assert orders.tls is not None
        assert orders.tls.spiffe_id == "spiffe://mesh.local/svc/orders"
