"""inventory in-process: its handlers behind the mesh, with its real policy (standalone Mesh)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from mesh_middleware import Mesh, TokenIssuer
from sample_apps.inventory.service import ITEMS, create_app
from tests.sample_apps.shop import POLICIES, lifespan

Exchange = tuple[str, str, str | None, dict[str, object] | None]
"""method, path, calling service (or None), JSON body."""


@pytest.fixture
def mesh(jwks_file: Path) -> Iterator[Mesh]:
    """A standalone Mesh on inventory's real policy, trusting the test issuer's keys."""
    with Mesh(POLICIES["inventory"], jwks=jwks_file, watch=False) as built:
        yield built


def _run(mesh: Mesh, issuer: TokenIssuer, *exchanges: Exchange) -> list[httpx.Response]:
    """Serve ``exchanges`` in order from the app around ``mesh``, lifespan included."""
    app = create_app(mesh)

    async def scenario() -> list[httpx.Response]:
        answers = []
        async with lifespan(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://inventory") as c:
                for method, path, caller, body in exchanges:
                    headers = {}
                    if caller is not None:
                        headers["x-mesh-identity"] = issuer.mint(caller, "inventory")
                    answers.append(await c.request(method, path, json=body, headers=headers))
        return answers

    return asyncio.run(scenario())


def test_healthz_is_public_and_says_who_answers(mesh: Mesh, issuer: TokenIssuer) -> None:
    """`GET /healthz` needs no identity: status, service, version and pid."""
    (answer,) = _run(mesh, issuer, ("GET", "/healthz", None, None))
    assert answer.status_code == 200
    assert answer.json() == {
        "status": "ok",
        "service": "inventory",
        "version": "v1",
        "instance": str(os.getpid()),
        "pid": os.getpid(),
    }


def test_items_are_served_to_gateway_and_orders(mesh: Mesh, issuer: TokenIssuer) -> None:
    """An item, this instance's version and its name (the pid while not registered)."""
    answers = _run(
        mesh, issuer, ("GET", "/items/2", "gateway", None), ("GET", "/items/5", "orders", None)
    )
    assert [a.status_code for a in answers] == [200, 200]
    first, second = (a.json() for a in answers)
    assert first["item"] == ITEMS[2].model_dump()
    assert (first["version"], first["instance"]) == ("v1", str(os.getpid()))
    assert (first["caller"], second["caller"]) == ("gateway", "orders")
    assert second["item"]["name"] == "paper filters"


def test_mesh_version_makes_the_same_app_and_policy_the_canary(
    jwks_file: Path, issuer: TokenIssuer
) -> None:
    """`Mesh(version="v2")` (what MESH_VERSION sets) is the version the app reports."""
    with Mesh(POLICIES["inventory"], jwks=jwks_file, watch=False, version="v2") as canary:
        answers = _run(
            canary, issuer, ("GET", "/items/1", "gateway", None), ("GET", "/healthz", None, None)
        )
    assert [a.json()["version"] for a in answers] == ["v2", "v2"]


def test_unknown_item_is_a_json_404(mesh: Mesh, issuer: TokenIssuer) -> None:
    """An item that does not exist: 404 with a JSON error, not FastAPI's `detail`."""
    unknown, invalid = _run(
        mesh, issuer, ("GET", "/items/99", "gateway", None), ("GET", "/items/abc", "gateway", None)
    )
    assert unknown.status_code == 404
    assert unknown.json() == {"error": "not_found", "reason": "no item 99"}
    assert invalid.status_code == 422
    assert invalid.json()["error"] == "invalid_request"


def test_orders_reserves_and_each_reservation_is_numbered(mesh: Mesh, issuer: TokenIssuer) -> None:
    """`POST /reserve` from orders: 200, reservations 1 and 2, the amount at the item's price."""
    answers = _run(
        mesh,
        issuer,
        ("POST", "/reserve", "orders", {"item": 3, "quantity": 2}),
        ("POST", "/reserve", "orders", {"item": 1, "quantity": 1}),
    )
    assert [a.status_code for a in answers] == [200, 200]
    first, second = (a.json() for a in answers)
    assert (first["reservation"], second["reservation"]) == (1, 2)
    assert first["amount"] == 258.0
    assert (first["version"], first["instance"]) == ("v1", str(os.getpid()))


def test_reserving_an_unknown_item_or_too_many_is_refused(mesh: Mesh, issuer: TokenIssuer) -> None:
    """404 for an unknown item, 422 for a quantity out of 1-100, both JSON."""
    unknown, too_many = _run(
        mesh,
        issuer,
        ("POST", "/reserve", "orders", {"item": 42, "quantity": 1}),
        ("POST", "/reserve", "orders", {"item": 1, "quantity": 1000}),
    )
    assert (unknown.status_code, unknown.json()["error"]) == (404, "not_found")
    assert (too_many.status_code, too_many.json()["error"]) == (422, "invalid_request")


def test_the_gateway_may_not_reserve_and_learns_the_rule(mesh: Mesh, issuer: TokenIssuer) -> None:
    """The gateway's reserve is 403, naming `reserve-only-orders` and where it is written."""
    (answer,) = _run(mesh, issuer, ("POST", "/reserve", "gateway", {"item": 1, "quantity": 1}))
    assert answer.status_code == 403
    body = answer.json()
    assert (body["error"], body["rule"]) == ("forbidden", "reserve-only-orders")
    assert "sample_apps/inventory/policy.yaml:" in body["reason"]


def test_admin_is_denied_to_everyone_and_strangers_get_401(mesh: Mesh, issuer: TokenIssuer) -> None:
    """/admin/* is `no-admin` even for orders; payments reads nothing; no identity is 401."""
    admin, stranger, anonymous = _run(
        mesh,
        issuer,
        ("GET", "/admin/stats", "orders", None),
        ("GET", "/items/1", "payments", None),
        ("GET", "/items/1", None, None),
    )
    assert (admin.status_code, admin.json()["rule"]) == (403, "no-admin")
    assert (stranger.status_code, stranger.json()["rule"]) == (403, None)
    assert (anonymous.status_code, anonymous.json()["error"]) == (401, "unauthenticated")
