"""payments in-process: charges behind the mesh, with its real policy (standalone Mesh)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from mesh_middleware import Mesh, TokenIssuer
from sample_apps.payments.service import create_app
from tests.sample_apps.shop import POLICIES, lifespan

Charge = tuple[str | None, dict[str, object], dict[str, str]]
"""calling service (or None), JSON body, extra headers."""


@pytest.fixture
def mesh(jwks_file: Path) -> Iterator[Mesh]:
    """A standalone Mesh on payments' real policy, trusting the test issuer's keys."""
    with Mesh(POLICIES["payments"], jwks=jwks_file, watch=False) as built:
        yield built


def _charge(mesh: Mesh, issuer: TokenIssuer, *charges: Charge) -> list[httpx.Response]:
    """Send ``POST /charge`` for each of ``charges`` to the app around ``mesh``."""
    app = create_app(mesh)

    async def scenario() -> list[httpx.Response]:
        answers = []
        async with lifespan(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://payments") as c:
                for caller, body, extra in charges:
                    headers = dict(extra)
                    if caller is not None:
                        headers["x-mesh-identity"] = issuer.mint(caller, "payments")
                    answers.append(await c.post("/charge", json=body, headers=headers))
        return answers

    return asyncio.run(scenario())


def test_orders_charges_and_the_answer_names_the_instance(mesh: Mesh, issuer: TokenIssuer) -> None:
    """200 `{"status": "charged", "instance": ...}`; each charge gets its own number."""
    first, second = _charge(
        mesh,
        issuer,
        ("orders", {"order": "o-1", "amount": 12.5}, {}),
        ("orders", {"order": "o-2", "amount": 3}, {}),
    )
    assert (first.status_code, second.status_code) == (200, 200)
    assert first.json() == {
        "status": "charged",
        "charge": 1,
        "order": "o-1",
        "amount": 12.5,
        "replayed": False,
        "instance": str(os.getpid()),
    }
    assert second.json()["charge"] == 2


def test_a_retried_charge_is_charged_once(mesh: Mesh, issuer: TokenIssuer) -> None:
    """The same Idempotency-Key again is the first charge, replayed; another key is new."""
    body = {"order": "o-7", "amount": 9.99}
    answers = _charge(
        mesh,
        issuer,
        ("orders", body, {"Idempotency-Key": "o-7"}),
        ("orders", body, {"Idempotency-Key": "o-7"}),
        ("orders", body, {"Idempotency-Key": "o-8"}),
    )
    charges = [(a.json()["charge"], a.json()["replayed"]) for a in answers]
    assert charges == [(1, False), (1, True), (2, False)]


def test_only_orders_may_charge(mesh: Mesh, issuer: TokenIssuer) -> None:
    """The gateway is 403 (no allow rule matches), no identity is 401."""
    body = {"order": "o-1", "amount": 1}
    gateway, anonymous = _charge(mesh, issuer, ("gateway", body, {}), (None, body, {}))
    assert (gateway.status_code, gateway.json()["error"]) == (403, "forbidden")
    assert (anonymous.status_code, anonymous.json()["error"]) == (401, "unauthenticated")


def test_an_invalid_charge_is_a_json_422(mesh: Mesh, issuer: TokenIssuer) -> None:
    """A negative amount or a missing order: 422 in the shop's error shape."""
    negative, missing = _charge(
        mesh,
        issuer,
        ("orders", {"order": "o-1", "amount": -5}, {}),
        ("orders", {"amount": 5}, {}),
    )
    assert (negative.status_code, negative.json()["error"]) == (422, "invalid_request")
    assert (missing.status_code, missing.json()["error"]) == (422, "invalid_request")


def test_chaos_aborts_about_a_quarter_of_charges_and_nothing_else(
    mesh: Mesh, issuer: TokenIssuer
) -> None:
    """With `x-chaos: on`, 503s from the `chaos-monkey` fault at about 25% (400 charges: 15-35%
    is more than 4 standard deviations wide); without the header, none."""
    body = {"order": "o-1", "amount": 1}
    chaos = [("orders", body, {"x-chaos": "on"}) for _ in range(400)]
    calm = [("orders", body, {"x-chaos": "off"}) for _ in range(100)]
    answers = _charge(mesh, issuer, *chaos, *calm)
    assert {a.status_code for a in answers[:400]} == {200, 503}
    aborted = [a for a in answers[:400] if a.status_code == 503]
    assert 60 <= len(aborted) <= 140
    assert {a.json()["fault"] for a in aborted} == {"chaos-monkey"}
    assert [a.status_code for a in answers[400:]] == [200] * 100
