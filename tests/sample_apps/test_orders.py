"""orders in-process (Flask's test client), calling the real inventory and payments processes.

The app is built around a standalone :class:`MintingMesh` whose policy is orders' real one
with static endpoints added, so the 90/10 route, the retries and the outlier detection are
the ones the sample ships.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from flask import Flask
from werkzeug.test import TestResponse

from sample_apps.orders.service import WorkerClient, create_app
from tests.sample_apps.blackhole import blackhole
from tests.sample_apps.minting import MintingMesh
from tests.sample_apps.shop import Endpoints, Shop, derive_policy, metric, pid_of, scrape, url
from tests.support.servers import free_port

pytestmark = pytest.mark.slow

Build = Callable[..., Flask]
ORDER = {"item": 3, "quantity": 2}


@pytest.fixture
def build(shop: Shop, tmp_path: Path) -> Iterator[Build]:
    """Build the orders app with these payments (and inventory) endpoints; closed after."""
    made: list[tuple[Flask, MintingMesh]] = []

    def make(payments: list[int], inventory: bool = True, forward_chaos: bool = True) -> Flask:
        endpoints: Endpoints = {
            "payments": [(url(port), None) for port in payments],
            **({"inventory": shop.inventory_endpoints()} if inventory else {}),
        }
        policy = derive_policy("orders", tmp_path / f"orders-{len(made)}.yaml", endpoints)
        mesh = MintingMesh(policy, issuer=shop.issuer, jwks=shop.jwks, watch=False)
        app = create_app(mesh, forward_chaos=forward_chaos)
        made.append((app, mesh))
        return app

    yield make
    for app, mesh in made:
        app.extensions["mesh_client"].close()
        mesh.close()


def _order(
    shop: Shop, app: Flask, body: object = ORDER, caller: str | None = "gateway", **headers: str
) -> TestResponse:
    if caller is not None:
        headers["x-mesh-identity"] = shop.issuer.mint(caller, "orders")
    return app.test_client().post("/orders", json=body, headers=headers)


def test_an_order_reserves_then_charges(shop: Shop, build: Build) -> None:
    """201 with the order id, the reservation's version and instance, and the charge's."""
    app = build([shop.payments_steady])
    answer = _order(shop, app)
    assert answer.status_code == 201, answer.json
    body = answer.json
    assert body is not None
    assert len(body["order"]) == 32
    assert (body["item"], body["quantity"]) == (3, 2)
    reserved = body["reserved"]
    port = {"v1": shop.inventory_v1, "v2": shop.inventory_v2}[reserved["version"]]
    assert reserved["instance"] == pid_of(port)
    assert body["payment"] == {"status": "charged", "instance": pid_of(shop.payments_steady)}


def test_only_the_gateway_may_order(shop: Shop, build: Build) -> None:
    """No identity is 401 (strict); inventory's identity matches no allow rule: 403."""
    app = build([shop.payments_steady])
    assert _order(shop, app, caller=None).status_code == 401
    refused = _order(shop, app, caller="inventory")
    assert refused.status_code == 403
    assert refused.json is not None and refused.json["error"] == "forbidden"


def test_retries_hide_chaos_from_the_customer(shop: Shop, build: Build) -> None:
    """With one payments instance failing every chaos charge and one healthy, every chaos
    order succeeds, and every charge is the healthy instance's: failed tries went elsewhere."""
    app = build([shop.payments_chaos, shop.payments_steady])
    answers = [_order(shop, app, **{"x-chaos": "on"}) for _ in range(12)]
    assert [a.status_code for a in answers] == [201] * 12
    steady = pid_of(shop.payments_steady)
    assert {a.json["payment"]["instance"] for a in answers if a.json} == {steady}


def test_a_charge_is_retried_three_times_then_the_step_is_named(shop: Shop, build: Build) -> None:
    """Only the chaotic instance: `x-chaos: on` is forwarded, the 503 is retried 3 times
    (`attempts: 3`, allowed for a POST by its Idempotency-Key), then 502 naming the step."""
    app = build([shop.payments_chaos])
    client = app.test_client()
    retries_before = metric(
        client.get("/metrics").text,
        "mesh_outbound_retries_total",
        source_service="orders",
        destination_service="payments",
        reason="503",
    )
    faults_before = metric(scrape(shop.payments_chaos), "mesh_faults_injected_total")
    failed = _order(shop, app, **{"x-chaos": "on"})
    assert failed.status_code == 502
    body = failed.json
    assert body is not None
    assert (body["error"], body["step"], body["service"]) == (
        "payment_failed",
        "payment",
        "payments",
    )
    assert (body["status"], body["upstream"]["fault"]) == (503, "chaos-monkey")
    retries = metric(
        client.get("/metrics").text,
        "mesh_outbound_retries_total",
        source_service="orders",
        destination_service="payments",
        reason="503",
    )
    assert retries - retries_before == 3
    deadline = time.monotonic() + 5  # the payments process folds its counts within a second
    while metric(scrape(shop.payments_chaos), "mesh_faults_injected_total") - faults_before < 4:
        assert time.monotonic() < deadline, "payments did not count 4 injected faults"
        time.sleep(0.2)
    calm = _order(shop, app)  # no x-chaos header: nothing forwarded, nothing injected
    assert calm.status_code == 201


def test_x_chaos_goes_no_further_unless_the_app_forwards_it(shop: Shop, build: Build) -> None:
    """Outside the demo (no SHOP_FORWARD_CHAOS) a caller's `x-chaos` never reaches payments:
    the instance that fails every chaos charge answers this one."""
    app = build([shop.payments_chaos], forward_chaos=False)
    assert _order(shop, app, **{"x-chaos": "on"}).status_code == 201


def test_the_customers_mistakes_are_passed_on(shop: Shop, build: Build) -> None:
    """An unknown item is inventory's 404 naming the reserve step; a bad body is 422."""
    app = build([shop.payments_steady])
    unknown = _order(shop, app, {"item": 99, "quantity": 1})
    assert unknown.status_code == 404
    assert unknown.json is not None
    assert (unknown.json["step"], unknown.json["upstream"]["error"]) == ("reserve", "not_found")
    for bad in ({"item": 1}, {"item": "1", "quantity": 1}, {"item": 1, "quantity": True}, [1]):
        invalid = _order(shop, app, bad)
        assert invalid.status_code == 422, bad
        assert invalid.json is not None and invalid.json["error"] == "invalid_request"


def test_a_placed_order_can_be_read_back(shop: Shop, build: Build) -> None:
    """`GET /orders/{id}`: 200 with the order this worker placed; an unknown id says so."""
    app = build([shop.payments_steady])
    placed = _order(shop, app)
    assert placed.json is not None
    token = {"x-mesh-identity": shop.issuer.mint("gateway", "orders")}
    again = app.test_client().get(f"/orders/{placed.json['order']}", headers=token)
    assert again.status_code == 200
    assert again.json is not None
    assert again.json["status"] == "placed"
    assert again.json["payment"] == placed.json["payment"]
    unknown = app.test_client().get("/orders/nope", headers=token)
    assert (unknown.status_code, unknown.json) == (
        200,
        {"order": "nope", "status": "unknown", "worker": os.getpid()},
    )


def test_no_inventory_instance_is_a_503_naming_the_step(shop: Shop, build: Build) -> None:
    """No instance of inventory known: the mesh's NoHealthyInstances becomes a JSON 503."""
    app = build([shop.payments_steady], inventory=False)
    answer = _order(shop, app)
    assert answer.status_code == 503
    assert answer.json is not None
    assert answer.json["error"] == "no_healthy_instances"
    assert (answer.json["step"], answer.json["service"]) == ("reserve", "inventory")


def test_an_unreachable_payments_is_a_502_naming_the_step(shop: Shop, build: Build) -> None:
    """Nothing listens where payments should be: after the retries, 502 naming the step."""
    app = build([free_port()])
    answer = _order(shop, app)
    assert answer.status_code == 502
    assert answer.json is not None
    assert (answer.json["error"], answer.json["step"]) == ("upstream_unreachable", "payment")


def test_a_silent_payments_is_a_504_at_the_deadline(shop: Shop, build: Build) -> None:
    """payments never answers: each try times out after 1 s (`per_try_timeout`), the retries
    with it, and at the call's 3 s `timeout` the answer is a JSON 504."""
    with blackhole() as port:
        app = build([port])
        started = time.monotonic()
        answer = _order(shop, app)
        waited = time.monotonic() - started
    assert answer.status_code == 504
    assert answer.json is not None
    assert (answer.json["error"], answer.json["step"]) == ("deadline_exceeded", "payment")
    assert 2.9 < waited < 5


def test_each_process_makes_its_own_client_on_first_use(shop: Shop, build: Build) -> None:
    """One client per process, reused; a forked child (a gunicorn worker) makes its own."""
    app = build([shop.payments_steady])
    holder: WorkerClient = app.extensions["mesh_client"]
    parent = holder.get()
    assert holder.get() is parent
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through its exit status only
        os._exit(0 if holder.get() is not parent else 1)
    deadline = time.monotonic() + 10
    while (waited := os.waitpid(child, os.WNOHANG)) == (0, 0):
        assert time.monotonic() < deadline, "the forked child did not exit"
        time.sleep(0.05)
    assert os.waitstatus_to_exitcode(waited[1]) == 0
    holder.close()
    assert holder.get() is not parent
