"""The Mesh runtime: fail closed on a bad policy at start, reload in place, count failures."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from mesh_middleware import Mesh, PolicyError
from mesh_middleware.telemetry import metrics
from tests.conftest import PolicyWriter

GOOD = "service: inventory\ninbound:\n  authentication: permissive\n"


def test_an_invalid_policy_stops_the_app_from_starting(write_policy: PolicyWriter) -> None:
    """No policy, no app: construction raises PolicyError with the problems."""
    with pytest.raises(PolicyError, match=r"inbound\.authentication"):
        Mesh(write_policy("service: a\ninbound:\n  authentication: sometimes\n"), watch=False)


def test_from_env_needs_a_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Mesh.from_env() without MESH_POLICY says which variable to set."""
    monkeypatch.delenv("MESH_POLICY", raising=False)
    with pytest.raises(PolicyError, match="MESH_POLICY"):
        Mesh.from_env()


def test_from_env_reads_the_variables(
    monkeypatch: pytest.MonkeyPatch, write_policy: PolicyWriter, jwks_file: Path
) -> None:
    """MESH_POLICY, MESH_JWKS and MESH_TRUST_DOMAIN configure the Mesh."""
    monkeypatch.setenv("MESH_POLICY", str(write_policy(GOOD)))
    monkeypatch.setenv("MESH_JWKS", str(jwks_file))
    monkeypatch.setenv("MESH_TRUST_DOMAIN", "shop.internal")
    with Mesh.from_env(watch=False) as mesh:
        assert mesh.spiffe_id == "spiffe://shop.internal/svc/inventory"
        assert mesh.keys.kids()


def test_the_deployments_version_overrides_the_policy_files_across_reloads(
    monkeypatch: pytest.MonkeyPatch, write_policy: PolicyWriter
) -> None:
    """One app and policy run as v1 and v2 (a canary): MESH_VERSION names the deployment's."""
    path = write_policy("service: inventory\nversion: v1\n")
    monkeypatch.setenv("MESH_POLICY", str(path))
    monkeypatch.setenv("MESH_VERSION", "v2")
    with Mesh.from_env(watch=False) as mesh:
        assert mesh.policy.loaded.policy.version == mesh.version == "v2"
        path.write_text("service: inventory\nversion: v1\ninbound: {authentication: permissive}\n")
        assert mesh.reload_policy()
        assert mesh.policy.loaded.policy.version == "v2"
        assert not mesh.policy.strict
    monkeypatch.delenv("MESH_VERSION")
    with Mesh.from_env(watch=False) as mesh:
        assert mesh.policy.loaded.policy.version == "v1"
    with pytest.raises(ValueError, match="version"):
        Mesh(path, watch=False, version="")


def test_reload_swaps_the_policy_and_a_broken_edit_keeps_it(
    write_policy: PolicyWriter, make_mesh: Callable[..., Mesh]
) -> None:
    """A valid edit is installed; an invalid one is counted and the last good policy stays."""
    path = write_policy(GOOD)
    mesh = make_mesh(path, watch=False)
    path.write_text("service: orders\n")
    assert mesh.reload_policy()
    assert mesh.service == "orders"
    assert mesh.spiffe_id == "spiffe://mesh.local/svc/orders"
    failures = metrics.POLICY_RELOADS.labels("orders", "failure")
    before = failures._value.get()
    path.write_text("service: orders\nbogus: 1\n")
    assert not mesh.reload_policy()
    assert mesh.service == "orders"
    assert mesh.reload_failures == 1
    assert mesh.last_reload_error is not None and "bogus" in mesh.last_reload_error
    assert failures._value.get() == before + 1


def test_a_deleted_policy_file_keeps_the_running_policy(
    write_policy: PolicyWriter, make_mesh: Callable[..., Mesh]
) -> None:
    """An unreadable file during reload is a failure, not an outage."""
    path = write_policy(GOOD)
    mesh = make_mesh(path, watch=False)
    path.unlink()
    assert not mesh.reload_policy()
    assert mesh.service == "inventory"


def test_a_change_is_loaded_only_once_it_has_settled(write_policy: PolicyWriter) -> None:
    """A file caught mid-write is not installed: it must look the same at two checks in a row."""
    from mesh_middleware.runtime.policy_watch import PolicyFileWatch

    path = write_policy(GOOD)
    installed: list[str] = []
    watch = PolicyFileWatch(path, lambda compiled: installed.append(compiled.service), lambda: "x")
    assert watch.check() is None
    path.write_text("service: half-written\n")
    assert watch.check() is None and installed == []
    path.write_text("service: orders\n")
    assert watch.check() is None and installed == []
    assert watch.check() is True and installed == ["orders"]
    assert watch.check() is None
