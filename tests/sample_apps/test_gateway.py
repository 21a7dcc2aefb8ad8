"""gateway in-process (httpx.ASGITransport), calling the real inventory and orders processes.

The app is built around a standalone :class:`MintingMesh` whose policy is the gateway's real
one with static endpoints added: inventory v1 and v2, and orders (the real orders app under
gunicorn, whose payments is the instance that fails every chaos charge).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from mesh_middleware import (
    CircuitOpen,
    DeadlineExceeded,
    NoHealthyInstances,
    RetryBudgetExhausted,
)
from sample_apps.gateway.service import create_app, mesh_failure
from tests.sample_apps.blackhole import blackhole
from tests.sample_apps.minting import MintingMesh
from tests.sample_apps.shop import Endpoints, Shop, derive_policy, lifespan, metric, pid_of, url
from tests.support.servers import free_port

pytestmark = pytest.mark.slow

T = TypeVar("T")
Scenario = Callable[[httpx.AsyncClient], Awaitable[T]]
ORDER = {"item": 2, "quantity": 1}


@pytest.fixture
def serve(shop: Shop, tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """Run a scenario against the gateway app (lifespan included) with these endpoints and
    policy edits; the default endpoints are the shop's inventories and orders."""
    meshes: list[MintingMesh] = []

    def run(
        scenario: Scenario[T],
        endpoints: Endpoints | None = None,
        edit: Callable[[dict[str, Any]], None] | None = None,
    ) -> T:
        if endpoints is None:
            endpoints = {
                "inventory": shop.inventory_endpoints(),
                "orders": [(url(shop.orders), None)],
            }
        policy = derive_policy("gateway", tmp_path / f"gateway-{len(meshes)}.yaml", endpoints, edit)
        mesh = MintingMesh(policy, issuer=shop.issuer, jwks=shop.jwks, watch=False)
        meshes.append(mesh)
        app = create_app(mesh, forward_chaos=True)

        async def go() -> T:
            async with lifespan(app):
                transport = httpx.ASGITransport(app=app)
                async with httpx.AsyncClient(
                    transport=transport, base_url="http://gateway", timeout=30
                ) as client:
                    return await scenario(client)

        return asyncio.run(go())

    yield run
    for mesh in meshes:
        mesh.close()


def test_healthz_is_public(serve: Callable[..., Any]) -> None:
    """`GET /healthz`: 200 with status, service and version."""

    async def scenario(client: httpx.AsyncClient) -> httpx.Response:
        return await client.get("/healthz")

    answer = serve(scenario)
    assert answer.status_code == 200
    assert {k: answer.json()[k] for k in ("status", "service", "version")} == {
        "status": "ok",
        "service": "gateway",
        "version": "v1",
    }


def test_item_reads_split_90_10_and_a_fifth_is_mirrored_to_v2(
    shop: Shop, serve: Callable[..., Any]
) -> None:
    """200 reads: each names its version and instance; v2 answers about 10% (3-20%, over 3
    standard deviations either way) and also receives shadows of about 20% of all reads."""
    v2_before = _requests_from_gateway(shop.inventory_v2)

    async def scenario(client: httpx.AsyncClient) -> tuple[list[httpx.Response], float]:
        answers = [await client.get(f"/shop/items/{1 + n % 5}") for n in range(200)]
        v2_reads = sum(a.json()["inventory"]["version"] == "v2" for a in answers)
        # Shadows are in flight until they end; the lifespan's end would cancel them.
        deadline = time.monotonic() + 10
        while (seen := _requests_from_gateway(shop.inventory_v2) - v2_before) < v2_reads + 15:
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        return answers, seen

    answers, v2_seen = serve(scenario)
    assert {a.status_code for a in answers} == {200}
    versions = collections.Counter(a.json()["inventory"]["version"] for a in answers)
    assert set(versions) == {"v1", "v2"}
    assert 6 <= versions["v2"] <= 40
    instances = {"v1": pid_of(shop.inventory_v1), "v2": pid_of(shop.inventory_v2)}
    for answer in answers:
        inventory = answer.json()["inventory"]
        assert inventory["instance"] == instances[inventory["version"]]
    assert answers[0].json()["item"]["id"] == 1
    assert v2_seen - versions["v2"] >= 15  # about 40 shadows expected


def _requests_from_gateway(port: int) -> float:
    """Requests from the gateway an inventory process has counted."""
    page = httpx.get(f"{url(port)}/metrics", timeout=10).text
    return metric(page, "mesh_requests_total", reporter="destination", source_service="gateway")


def test_an_unknown_item_is_inventorys_404_passed_on(serve: Callable[..., Any]) -> None:
    """Status and JSON body of inventory's answer, unchanged."""

    async def scenario(client: httpx.AsyncClient) -> httpx.Response:
        return await client.get("/shop/items/99")

    answer = serve(scenario)
    assert answer.status_code == 404
    assert answer.json() == {"error": "not_found", "reason": "no item 99"}


def test_reserve_direct_is_refused_by_inventory_naming_the_rule(
    serve: Callable[..., Any],
) -> None:
    """403 `{"error": "forbidden", "by": "inventory", "rule": "reserve-only-orders", ...}`."""

    async def scenario(client: httpx.AsyncClient) -> httpx.Response:
        return await client.post("/shop/reserve-direct", json=ORDER)

    answer = serve(scenario)
    assert answer.status_code == 403
    body = answer.json()
    assert {k: body[k] for k in ("error", "by", "rule")} == {
        "error": "forbidden",
        "by": "inventory",
        "rule": "reserve-only-orders",
    }
    assert body["reason"].startswith("denied by rule 'reserve-only-orders' (")


def test_orders_are_placed_through_orders_and_chaos_is_forwarded(
    shop: Shop, serve: Callable[..., Any]
) -> None:
    """Without `x-chaos` the order is 201 from orders; with it, orders' only payments
    instance fails every try, and orders' 502 naming the payment step comes back as it is."""

    async def scenario(client: httpx.AsyncClient) -> tuple[httpx.Response, httpx.Response]:
        calm = await client.post("/shop/orders", json=ORDER)
        chaos = await client.post("/shop/orders", json=ORDER, headers={"x-chaos": "on"})
        return calm, chaos

    calm, chaos = serve(scenario)
    assert calm.status_code == 201, calm.text
    assert calm.json()["payment"] == {"status": "charged", "instance": pid_of(shop.payments_chaos)}
    assert calm.json()["reserved"]["version"] in ("v1", "v2")
    assert chaos.status_code == 502
    body = chaos.json()
    assert (body["step"], body["upstream"]["fault"]) == ("payment", "chaos-monkey")


def test_anonymous_orders_are_audited_not_denied(shop: Shop, serve: Callable[..., Any]) -> None:
    """Each anonymous order is counted as an audit-mode denial of `no-anonymous-orders` and
    goes through; an order from a caller with an identity is not counted."""
    labels = {"service": "gateway", "rule": "no-anonymous-orders", "mode": "audit"}
    token = {"x-mesh-identity": shop.issuer.mint("orders", "gateway")}

    async def scenario(client: httpx.AsyncClient) -> tuple[list[int], float]:
        page = (await client.get("/metrics")).text
        before = metric(page, "mesh_authorization_denials_total", **labels)
        statuses = [(await client.post("/shop/orders", json=ORDER)).status_code for _ in range(3)]
        statuses.append((await client.post("/shop/orders", json=ORDER, headers=token)).status_code)
        page = (await client.get("/metrics")).text
        counted = metric(page, "mesh_authorization_denials_total", **labels) - before
        return statuses, counted

    statuses, counted = serve(scenario)
    assert statuses == [201, 201, 201, 201]
    assert counted == 3


def test_invalid_orders_and_unknown_paths_are_json(serve: Callable[..., Any]) -> None:
    """A bad body is a 422 in the shop's error shape; a path outside /shop/* is the mesh's 403."""

    async def scenario(client: httpx.AsyncClient) -> list[httpx.Response]:
        return [
            await client.post("/shop/orders", json={"item": 1}),
            await client.post("/shop/orders", json={"item": 1, "quantity": 0}),
            await client.get("/docs"),
        ]

    missing, zero, docs = serve(scenario)
    assert (missing.status_code, missing.json()["error"]) == (422, "invalid_request")
    assert (zero.status_code, zero.json()["error"]) == (422, "invalid_request")
    assert (docs.status_code, docs.json()["error"]) == (403, "forbidden")


def test_no_inventory_instance_is_a_503_naming_it(serve: Callable[..., Any]) -> None:
    """No instance known: `no_healthy_instances`, 503, naming inventory."""

    async def scenario(client: httpx.AsyncClient) -> httpx.Response:
        return await client.get("/shop/items/1")

    answer = serve(scenario, endpoints={})
    assert answer.status_code == 503
    assert {k: answer.json()[k] for k in ("error", "service")} == {
        "error": "no_healthy_instances",
        "service": "inventory",
    }


def test_nothing_listening_is_a_502(serve: Callable[..., Any]) -> None:
    """Connect failures are retried elsewhere, then the failure is a JSON 502."""
    dead = [(url(free_port()), "v1"), (url(free_port()), "v2")]

    async def scenario(client: httpx.AsyncClient) -> httpx.Response:
        return await client.get("/shop/items/1")

    answer = serve(scenario, endpoints={"inventory": dead})
    assert (answer.status_code, answer.json()["error"]) == (502, "upstream_unreachable")


def test_a_silent_inventory_is_a_504_and_a_full_one_a_503(serve: Callable[..., Any]) -> None:
    """inventory never answers: the 2 s timeout gives 504; with `max_concurrent: 1`, a
    second read while the first waits is refused at once: circuit open, 503."""

    def one_at_a_time(document: dict[str, Any]) -> None:
        document["outbound"]["services"]["inventory"]["max_concurrent"] = 1

    async def scenario(client: httpx.AsyncClient) -> tuple[httpx.Response, httpx.Response]:
        first = asyncio.create_task(client.get("/shop/items/1"))
        await asyncio.sleep(0.3)
        second = await client.get("/shop/items/2")
        return await first, second

    with blackhole() as v1, blackhole() as v2:
        endpoints = {"inventory": [(url(v1), "v1"), (url(v2), "v2")]}
        started = time.monotonic()
        slow, refused = serve(scenario, endpoints=endpoints, edit=one_at_a_time)
        waited = time.monotonic() - started
    assert (slow.status_code, slow.json()["error"]) == (504, "deadline_exceeded")
    assert 1.9 < waited < 5
    assert (refused.status_code, refused.json()["error"]) == (503, "circuit_open")


@pytest.mark.parametrize(
    ("error", "status", "name"),
    [
        (NoHealthyInstances, 503, "no_healthy_instances"),
        (RetryBudgetExhausted, 503, "retry_budget_exhausted"),
        (DeadlineExceeded, 504, "deadline_exceeded"),
        (httpx.ReadTimeout, 504, "upstream_timeout"),
        (httpx.RemoteProtocolError, 502, "upstream_unreachable"),
    ],
)
def test_every_mesh_error_has_its_json_answer(
    error: type[httpx.TransportError], status: int, name: str
) -> None:
    """Each failure a mesh call raises maps to one status and error name, naming the service."""
    request = httpx.Request("GET", "http://inventory/items/1")
    answer = mesh_failure("inventory", error("it failed", request=request))
    assert answer.status_code == status
    assert answer.body.startswith(f'{{"error":"{name}","service":"inventory"'.encode())


def test_circuit_open_has_its_json_answer() -> None:
    """CircuitOpen (an HTTPStatusError carrying the mesh's 503) is a 503 `circuit_open`."""
    request = httpx.Request("GET", "http://inventory/items/1")
    refused = CircuitOpen("full", request=request, response=httpx.Response(503, request=request))
    answer = mesh_failure("inventory", refused)
    assert answer.status_code == 503
    assert b'"error":"circuit_open"' in answer.body
