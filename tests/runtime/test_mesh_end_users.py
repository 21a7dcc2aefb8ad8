"""A Mesh keeps its end-user issuers' keys: fetched in the background at start, kept across
policy reloads, refreshed on schedule, kept through an outage, dropped with their issuer."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh_middleware import Mesh
from tests.support.oidc_provider import OidcProvider, oidc_provider

POLICY = """\
service: orders
inbound:
  authentication: permissive
  end_users:
    issuers:
      - issuer: "{issuer}"
  authorization:
    rules:
      - {{name: users, action: allow, users: ["*"]}}
"""


@pytest.fixture
def idp(tmp_path: Path) -> Iterator[OidcProvider]:
    with oidc_provider(tmp_path / "idp", algs=("RS256",)) as provider:
        yield provider


def _wait(check: object, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "not in time"
        time.sleep(0.02)


def _mesh(idp: OidcProvider, path: Path) -> Mesh:
    """A Mesh whose issuer's keys were fetched (in the background, from its start)."""
    path.write_text(POLICY.format(issuer=idp.issuer))
    mesh = Mesh(path, watch=False)
    (store,) = mesh.end_user_keys.stores()
    _wait(lambda: store.loaded)
    # ...and scheduled its next one: until then the keyring holds it as under way.
    _wait(lambda: all(due < float("inf") for due in mesh.end_user_keys._due.values()))
    return mesh


def test_keys_are_fetched_at_start_and_kept_across_reloads(
    idp: OidcProvider, tmp_path: Path
) -> None:
    path = tmp_path / "policy.yaml"
    mesh = _mesh(idp, path)
    try:
        (store,) = mesh.end_user_keys.stores()
        token = idp.token("alice")
        admitted = mesh.inbound.admit("GET", "/", None, {"authorization": f"Bearer {token}"})
        assert admitted.status is None and admitted.user is not None
        fetched = idp.stats()["jwks"]
        # A reload that keeps the issuer keeps its keys: no fetch, the same store.
        path.write_text(POLICY.format(issuer=idp.issuer) + "# edited\n")
        assert mesh.reload_policy()
        assert mesh.end_user_keys.stores() == [store]
        again = mesh.inbound.admit("GET", "/", None, {"authorization": f"Bearer {token}"})
        assert again.status is None
        assert idp.stats()["jwks"] == fetched
        # A reload without end users drops the issuer; tokens are then not read at all.
        path.write_text("service: orders\ninbound: {authentication: permissive}\n")
        assert mesh.reload_policy()
        assert mesh.end_user_keys.stores() == []
        plain = mesh.inbound.admit("GET", "/", None, {"authorization": "Bearer junk"})
        assert plain.status is None and plain.user is None
    finally:
        mesh.close()


def test_refreshes_on_schedule_and_backs_off_through_an_outage(
    idp: OidcProvider, tmp_path: Path
) -> None:
    mesh = _mesh(idp, tmp_path / "policy.yaml")
    try:
        keyring = mesh.end_user_keys
        token = idp.token("alice")
        before = idp.stats()["jwks"]
        keyring.tick(now=time.monotonic())  # not due yet: nothing fetched
        time.sleep(0.2)
        assert idp.stats()["jwks"] == before
        keyring.tick(now=time.monotonic() + 400)  # past five minutes (+10% jitter): refreshed
        _wait(lambda: idp.stats()["jwks"] == before + 1)
        idp.outage(True)
        _wait(lambda: all(due < float("inf") for due in keyring._due.values()))
        keyring.tick(now=time.monotonic() + 1000)
        _wait(lambda: keyring._failures)
        due = next(iter(keyring._due.values()))
        assert due - time.monotonic() < 10  # a failed refresh is retried soon
        admitted = mesh.inbound.admit("GET", "/", None, {"authorization": f"Bearer {token}"})
        assert admitted.status is None  # the last good keys still verify
    finally:
        mesh.close()
