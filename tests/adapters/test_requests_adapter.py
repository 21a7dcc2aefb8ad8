"""The requests adapter against real upstream processes (standalone Mesh, static endpoints)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import requests

from mesh_middleware.runtime.context import Deadline, current_deadline
from tests.adapters.outbound_upstreams import Upstreams, endpoints, mesh_for, upstreams, url

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ups() -> Iterator[Upstreams]:
    with upstreams() as running:
        yield running


@pytest.fixture(autouse=True)
def _clean(ups: Upstreams) -> None:
    ups.reset()


def test_a_mesh_host_goes_to_an_instance_with_context(ups: Upstreams) -> None:
    mesh = mesh_for(f"    inventory:\n      endpoints:\n{endpoints(*ups.ok)}")
    session = mesh.requests_session()
    answer = session.get("http://inventory/items?q=1", timeout=5)
    body = answer.json()
    assert answer.status_code == 200 and body["path"] == "/items"
    assert body["headers"]["host"] == "inventory"
    assert body["headers"]["traceparent"].startswith("00-")
    assert int(body["headers"]["x-mesh-deadline-ms"]) <= 5000
    other = session.get(f"{url(ups.ok[0])}/x", timeout=5).json()["headers"]
    assert other["traceparent"] is not None and other["x-mesh-deadline-ms"] is None
    session.close()
    mesh.close()


def test_dead_instances_are_retried_elsewhere(ups: Upstreams) -> None:
    mesh = mesh_for(
        "    inventory:\n      load_balancer: round_robin\n"
        f"      endpoints:\n{endpoints(ups.dead, ups.ok[1])}"
    )
    session = mesh.requests_session()
    names = {session.get("http://inventory/x", timeout=5).json()["name"] for _ in range(10)}
    assert names == {"ok1"}
    session.close()
    mesh.close()


def test_posts_are_retried_only_with_an_idempotency_key(ups: Upstreams) -> None:
    mesh = mesh_for(
        f"    inventory:\n      retries: {{on: [503]}}\n      endpoints:\n{endpoints(ups.failing)}"
    )
    session = mesh.requests_session()
    assert session.post("http://inventory/o", json={"a": 1}, timeout=5).status_code == 503
    assert ups.stats(ups.failing).get("POST") == 1
    keyed = session.post(
        "http://inventory/o", json={"a": 1}, headers={"Idempotency-Key": "k"}, timeout=5
    )
    assert keyed.status_code == 503
    assert ups.stats(ups.failing).get("POST") == 4
    session.close()
    mesh.close()


def test_refusals_are_requests_own_exceptions(ups: Upstreams) -> None:
    mesh = mesh_for(
        "    inventory: {}\n"
        f"    slow:\n      timeout: 150ms\n      endpoints:\n{endpoints(ups.slow)}\n"
    )
    session = mesh.requests_session()
    with pytest.raises(requests.ConnectionError, match="inventory"):
        session.get("http://inventory/x", timeout=5)
    started = time.monotonic()
    with pytest.raises(requests.Timeout):
        session.get("http://slow/x", timeout=5)
    assert time.monotonic() - started < 2
    token = current_deadline.set(Deadline(time.monotonic() - 1))
    try:
        with pytest.raises(requests.Timeout, match="deadline"):
            session.get("http://slow/x", timeout=5)
    finally:
        current_deadline.reset(token)
    session.close()
    mesh.close()


def test_mirrored_requests_reach_the_shadow_only(ups: Upstreams) -> None:
    mesh = mesh_for(
        "    inventory:\n      mirror: {to: {version: shadow}, percent: 100}\n"
        f"      endpoints:\n        - {{url: '{url(ups.ok[0])}', version: v1}}\n"
        f"        - {{url: '{url(ups.ok[1])}', version: shadow}}\n"
        "      routes:\n        - to: [{version: v1}]\n"
    )
    session = mesh.requests_session()
    for _ in range(3):
        assert session.get("http://inventory/x", timeout=5).json()["name"] == "ok0"
    deadline = time.monotonic() + 5
    while ups.stats(ups.ok[1]).get("GET shadow", 0) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ups.stats(ups.ok[1]) == {"GET shadow": 3}
    session.close()
    mesh.close()


def test_a_closing_session_lets_its_shadows_finish_first(ups: Upstreams) -> None:
    from mesh_middleware.adapters.requests import MeshAdapter

    mesh = mesh_for(
        "    inventory:\n      mirror: {to: {version: shadow}, percent: 100}\n"
        f"      endpoints:\n        - {{url: '{url(ups.ok[0])}', version: v1}}\n"
        f"        - {{url: '{url(ups.slow)}', version: shadow}}\n"
        "      routes:\n        - to: [{version: v1}]\n"
    )
    session = mesh.requests_session()
    adapter = session.get_adapter("http://inventory/")
    assert isinstance(adapter, MeshAdapter)
    for _ in range(3):
        assert session.get("http://inventory/x", timeout=5).status_code == 200
    session.close()
    shadows = adapter._shadows
    # close returned once every shadow was over: those running got their (400 ms) answer; one
    # still queued behind other tests' shadows in the shared pool was dropped unsent.
    assert shadows.sent + shadows.unsent == 3 and shadows.failed == 0
    assert shadows.sent >= 1
    mesh.close()


def test_a_redirect_never_carries_mesh_headers_to_another_host(ups: Upstreams) -> None:
    mesh = mesh_for(f"    inventory:\n      endpoints:\n{endpoints(ups.ok[0])}")
    session = mesh.requests_session()
    session.headers["x-mesh-identity"] = "pretend-token"
    outside = f"{url(ups.ok[1])}/landed"
    landed = session.get("http://inventory/redirect", params={"to": outside}, timeout=5)
    seen = landed.json()["headers"]
    assert landed.json()["name"] == "ok1"
    assert seen["x-mesh-identity"] is None and seen["x-mesh-deadline-ms"] is None
    assert seen["host"] == f"127.0.0.1:{ups.ok[1]}"  # not the service name
    relative = session.get("http://inventory/redirect", params={"to": "/again"}, timeout=5)
    assert relative.json()["path"] == "/again" and relative.json()["headers"]["host"] == "inventory"
    assert relative.url == "http://inventory/again"
    session.close()
    mesh.close()
