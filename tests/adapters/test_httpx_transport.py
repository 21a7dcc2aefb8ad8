"""The httpx transports against real upstream processes (standalone Mesh, static endpoints)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import anyio
import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh_middleware import (
    AsyncMeshTransport,
    CircuitOpen,
    DeadlineExceeded,
    MeshTransport,
    NoHealthyInstances,
)
from mesh_middleware.adapters.httpx import aim
from mesh_middleware.discovery.endpoints import Endpoint
from mesh_middleware.runtime.context import (
    Deadline,
    current_deadline,
    current_trace,
    set_current_span,
)
from mesh_middleware.telemetry.tracecontext import SpanContext
from tests.adapters.outbound_upstreams import Upstreams, endpoints, mesh_for, upstreams, url

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ups() -> Iterator[Upstreams]:
    with upstreams() as running:
        yield running


@pytest.fixture(autouse=True)
def _clean(ups: Upstreams) -> None:
    ups.reset()


def test_a_mesh_host_is_sent_to_an_instance_with_context(ups: Upstreams) -> None:
    mesh = mesh_for(f"    inventory:\n      endpoints:\n{endpoints(*ups.ok)}")
    with mesh.client() as client:
        answer = client.get("http://inventory/items/1?x=1")
    assert answer.status_code == 200
    body = answer.json()
    assert body["name"] in ("ok0", "ok1") and body["path"] == "/items/1"
    headers = body["headers"]
    assert headers["host"] == "inventory"  # the service, not the instance
    assert headers["traceparent"].startswith("00-")
    assert 4000 < int(headers["x-mesh-deadline-ms"]) <= 5000  # the 5 s default timeout
    assert headers["x-mesh-identity"] is None  # standalone: no registry, no token
    mesh.close()


def test_other_hosts_bypass_the_mesh_and_get_only_trace_context(ups: Upstreams) -> None:
    mesh = mesh_for(f"    inventory:\n      endpoints:\n{endpoints(ups.ok[0])}")
    with mesh.client() as client:
        headers = client.get(f"{url(ups.ok[1])}/x").json()["headers"]
    assert headers["traceparent"] is not None
    assert headers["x-mesh-deadline-ms"] is None and headers["x-mesh-identity"] is None
    mesh.close()
    quiet = mesh_for(
        f"    inventory:\n      endpoints:\n{endpoints(ups.ok[0])}",
        "    trace_context_to_external_hosts: false\n",
    )
    with quiet.client() as client:
        assert client.get(f"{url(ups.ok[1])}/x").json()["headers"]["traceparent"] is None
    quiet.close()


def test_the_inbound_trace_is_continued(ups: Upstreams) -> None:
    mesh = mesh_for(f"    inventory:\n      endpoints:\n{endpoints(ups.ok[0])}")
    token = set_current_span(
        SpanContext("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", 1, "vendor=x")
    )
    try:
        with mesh.client() as client:
            sent = client.get("http://inventory/x").json()["headers"]["traceparent"]
    finally:
        current_trace.reset(token)
    assert sent.startswith("00-4bf92f3577b34da6a3ce929d0e0e4736-") and sent.endswith("-01")
    mesh.close()


def test_a_dead_instance_is_retried_elsewhere_and_ejected(ups: Upstreams) -> None:
    mesh = mesh_for(
        f"    inventory:\n      load_balancer: round_robin\n      endpoints:\n"
        f"{endpoints(ups.dead, ups.ok[0])}"
    )
    with mesh.client() as client:
        names = [client.get("http://inventory/x").json()["name"] for _ in range(20)]
    assert names == ["ok0"] * 20
    destination = mesh.outbound.destination("inventory")
    assert destination is not None and destination.outlier.ejected_count == 1
    mesh.close()


def test_a_post_answered_503_is_not_retried_without_an_idempotency_key(ups: Upstreams) -> None:
    mesh = mesh_for(
        f"    inventory:\n      retries: {{on: [503]}}\n      endpoints:\n{endpoints(ups.failing)}"
    )
    with mesh.client() as client:
        assert client.post("http://inventory/orders", json={"n": 1}).status_code == 503
        assert ups.stats(ups.failing).get("POST") == 1
        answer = client.post(
            "http://inventory/orders", json={"n": 1}, headers={"Idempotency-Key": "a1"}
        )
        assert answer.status_code == 503
        assert ups.stats(ups.failing).get("POST") == 1 + 3  # 2 retries
        assert client.get("http://inventory/x").status_code == 503
        assert ups.stats(ups.failing).get("GET") == 3
    mesh.close()


def test_a_streamed_body_is_never_replayed(ups: Upstreams) -> None:
    mesh = mesh_for(
        f"    inventory:\n      retries: {{on: [503]}}\n      endpoints:\n{endpoints(ups.failing)}"
    )

    def body() -> Iterator[bytes]:
        yield b"part"

    with mesh.client() as client:
        assert client.put("http://inventory/x", content=body()).status_code == 503
    assert ups.stats(ups.failing).get("PUT") == 1
    mesh.close()


def test_a_per_try_timeout_moves_on_to_another_instance(ups: Upstreams) -> None:
    mesh = mesh_for(
        "    inventory:\n      load_balancer: round_robin\n"
        "      retries: {per_try_timeout: 150ms}\n"
        f"      endpoints:\n{endpoints(ups.slow, ups.ok[0])}"
    )
    with mesh.client() as client:
        names = {client.get("http://inventory/x").json()["name"] for _ in range(4)}
    assert names == {"ok0"}
    mesh.close()


def test_the_timeout_ends_the_call_with_deadline_exceeded(ups: Upstreams) -> None:
    mesh = mesh_for(
        f"    inventory:\n      timeout: 150ms\n      endpoints:\n{endpoints(ups.slow)}"
    )
    started = time.monotonic()
    with mesh.client() as client, pytest.raises(DeadlineExceeded):
        client.get("http://inventory/x")
    assert time.monotonic() - started < 2.0
    mesh.close()


def test_the_callers_deadline_bounds_the_call(ups: Upstreams) -> None:
    mesh = mesh_for(f"    inventory:\n      endpoints:\n{endpoints(ups.slow)}")
    token = current_deadline.set(Deadline(time.monotonic() + 0.15))
    try:
        with mesh.client() as client, pytest.raises(httpx.TimeoutException):
            client.get("http://inventory/x")
    finally:
        current_deadline.reset(token)
    expired = current_deadline.set(Deadline(time.monotonic() - 1))
    try:
        with mesh.client() as client, pytest.raises(DeadlineExceeded):
            client.get("http://inventory/x")
    finally:
        current_deadline.reset(expired)
    assert ups.stats(ups.slow).get("GET", 0) <= 1  # the expired one was never sent
    mesh.close()


def test_no_instance_raises_no_healthy_instances(ups: Upstreams) -> None:
    mesh = mesh_for("    inventory: {}\n")
    with mesh.client() as client, pytest.raises(NoHealthyInstances) as raised:
        client.get("http://inventory/x")
    assert "inventory" in str(raised.value)
    mesh.close()


def test_max_concurrent_answers_a_fast_503(ups: Upstreams) -> None:
    mesh = mesh_for(
        f"    inventory:\n      max_concurrent: 2\n      endpoints:\n{endpoints(ups.slow)}"
    )

    async def main() -> list[object]:
        async with mesh.async_client() as client:
            calls = [client.get("http://inventory/x") for _ in range(5)]
            return await asyncio.gather(*calls, return_exceptions=True)

    results = asyncio.run(main())
    refused = [r for r in results if isinstance(r, CircuitOpen)]
    answered = [r for r in results if isinstance(r, httpx.Response)]
    assert len(refused) == 3 and len(answered) == 2
    assert refused[0].response.status_code == 503
    assert refused[0].response.json()["error"] == "circuit_open"
    mesh.close()


def test_the_async_client_balances_and_retries_too(ups: Upstreams) -> None:
    mesh = mesh_for(
        f"    inventory:\n      load_balancer: round_robin\n      endpoints:\n"
        f"{endpoints(ups.dead, *ups.ok)}"
    )

    async def main() -> set[str]:
        async with mesh.async_client() as client:
            answers = await asyncio.gather(*(client.get("http://inventory/x") for _ in range(30)))
            return {a.json()["name"] for a in answers}

    assert asyncio.run(main()) == {"ok0", "ok1"}
    mesh.close()


def test_mirrored_requests_are_marked_and_never_answer(ups: Upstreams) -> None:
    mesh = mesh_for(
        "    inventory:\n      mirror: {to: {version: shadow}, percent: 100}\n"
        f"      endpoints:\n        - {{url: '{url(ups.ok[0])}', version: v1}}\n"
        f"        - {{url: '{url(ups.failing)}', version: shadow}}\n"
        "      routes:\n        - to: [{version: v1}]\n"
    )
    with mesh.client() as client:
        for _ in range(5):
            answer = client.get("http://inventory/x")
            assert answer.status_code == 200 and answer.json()["name"] == "ok0"
        # Wait with the client open: closing it drops shadows still queued (by design), and
        # on a loaded machine the shared 4-thread pool may not have started them all yet.
        deadline = time.monotonic() + 5
        while ups.stats(ups.failing).get("GET shadow", 0) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert ups.stats(ups.failing).get("GET shadow") == 5
    assert ups.stats(ups.failing).get("GET") is None  # the primary never went there
    last = httpx.get(f"{url(ups.ok[0])}/stats").json()["last_headers"]
    assert last["x-mesh-shadow"] is None
    mesh.close()


def test_the_transports_can_be_used_directly(ups: Upstreams) -> None:
    mesh = mesh_for(f"    inventory:\n      endpoints:\n{endpoints(ups.ok[0])}")
    with httpx.Client(transport=MeshTransport(mesh)) as client:
        assert client.get("http://inventory/x").json()["name"] == "ok0"

    async def main() -> str:
        async with httpx.AsyncClient(transport=AsyncMeshTransport(mesh)) as client:
            name: str = (await client.get("http://inventory/x")).json()["name"]
            return name

    assert asyncio.run(main()) == "ok0"
    mesh.close()


@given(
    path=st.text(alphabet="abcxyz/%20-._~", max_size=20),
    query=st.text(alphabet="abc=&%20", max_size=10),
    host=st.sampled_from(["127.0.0.1", "10.1.2.3", "inventory-1", "::1"]),
    port=st.integers(1, 65535),
    scheme=st.sampled_from(["http", "https"]),
)
def test_aiming_a_url_is_copy_with(
    path: str, query: str, host: str, port: int, scheme: str
) -> None:
    original = httpx.URL(f"http://inventory/{path}" + (f"?{query}" if query else ""))
    endpoint = Endpoint("id", scheme, host, port)
    assert aim(original, endpoint) == original.copy_with(scheme=scheme, host=host, port=port)


def test_a_redirect_never_carries_the_identity_token_to_another_host(ups: Upstreams) -> None:
    """A mesh service answering 302 to an outside host: the token and deadline stay home; a
    relative redirect goes through the mesh again (to the service, not the instance)."""
    mesh = mesh_for(f"    inventory:\n      endpoints:\n{endpoints(ups.ok[0])}")
    outside = f"{url(ups.ok[1])}/landed"
    with mesh.client(follow_redirects=True) as client:
        client.headers["x-mesh-identity"] = "pretend-token"  # as a mesh call would carry
        landed = client.get("http://inventory/redirect", params={"to": outside})
        assert landed.json()["name"] == "ok1"
        seen = landed.json()["headers"]
        assert seen["x-mesh-identity"] is None and seen["x-mesh-deadline-ms"] is None
        relative = client.get("http://inventory/redirect", params={"to": "/again"})
    assert relative.json()["path"] == "/again" and relative.json()["headers"]["host"] == "inventory"
    assert str(relative.url) == "http://inventory/again"
    mesh.close()


def test_the_timeout_covers_reading_the_answer(ups: Upstreams) -> None:
    """A body trickled past the deadline is cut off, not waited for (one read at most late)."""
    mesh = mesh_for(
        f"    inventory:\n      timeout: 600ms\n      endpoints:\n{endpoints(ups.ok[0])}"
    )
    started = time.monotonic()
    with mesh.client() as client, pytest.raises(DeadlineExceeded, match="reading"):
        client.get("http://inventory/drip", params={"chunks": 20, "every": 0.1})
    assert time.monotonic() - started < 1.5  # the whole body would take 2 s

    async def main() -> None:
        async with mesh.async_client() as client:
            await client.get("http://inventory/drip", params={"chunks": 20, "every": 0.1})

    with pytest.raises(DeadlineExceeded):
        asyncio.run(main())
    mesh.close()


def test_the_deadline_header_says_what_this_try_may_take(ups: Upstreams) -> None:
    mesh = mesh_for(
        "    inventory:\n      retries: {per_try_timeout: 200ms}\n"
        f"      endpoints:\n{endpoints(ups.ok[0])}"
    )
    with mesh.client() as client:
        sent = client.get("http://inventory/x").json()["headers"]["x-mesh-deadline-ms"]
    assert 150 <= int(sent) <= 200
    mesh.close()


def test_a_cancelled_call_frees_its_slot_and_ejects_nobody(ups: Upstreams) -> None:
    mesh = mesh_for(
        "    inventory:\n      max_concurrent: 1\n"
        "      outlier_detection: {consecutive_failures: 1}\n"
        f"      endpoints:\n{endpoints(ups.slow)}"
    )

    async def main() -> None:
        async with mesh.async_client() as client:
            for _ in range(3):
                with anyio.move_on_after(0.05):
                    await client.get("http://inventory/x")

    asyncio.run(main())
    destination = mesh.outbound.destination("inventory")
    assert destination is not None
    assert destination.in_flight == 0 and destination.outlier.ejected_count == 0
    endpoint_set = destination.endpoints()
    assert endpoint_set is not None and endpoint_set.endpoints[0].in_flight == 0
    mesh.close()


def test_mirror_slots_are_released_when_the_client_closes(ups: Upstreams) -> None:
    from mesh_middleware.outbound.mirror import mirror_slots

    mesh = mesh_for(
        "    inventory:\n      mirror: {to: {version: shadow}, percent: 100}\n"
        f"      endpoints:\n        - {{url: '{url(ups.ok[0])}', version: v1}}\n"
        f"        - {{url: '{url(ups.slow)}', version: shadow}}\n"
        "      routes:\n        - to: [{version: v1}]\n"
    )
    before = mirror_slots.in_flight

    async def main() -> None:
        async with mesh.async_client() as client:
            for _ in range(5):
                await client.get("http://inventory/x")
        # closed while the slow shadows were still on their way

    asyncio.run(main())
    assert mirror_slots.in_flight == before
    mesh.close()


def test_dropping_headers_matches_the_public_api() -> None:
    from mesh_middleware.adapters.httpx import drop_headers

    headers = httpx.Headers(
        [("A", "1"), ("X-Mesh-Identity", "t"), ("b", "2"), ("x-mesh-identity", "u")]
    )
    drop_headers(headers, frozenset({b"x-mesh-identity", b"x-mesh-deadline-ms"}))
    assert headers.raw == [(b"A", b"1"), (b"b", b"2")]
    untouched = httpx.Headers({"a": "1"})
    drop_headers(untouched, frozenset({b"x-mesh-identity"}))
    assert untouched.raw == [(b"a", b"1")]


def test_a_closing_sync_client_lets_its_shadows_finish_first(ups: Upstreams) -> None:
    """A shadow sent on a closed pool would open a connection nobody closes; so ``close`` waits
    (bounded) for the shadows in flight, and they complete instead of failing."""
    mesh = mesh_for(
        "    inventory:\n      mirror: {to: {version: shadow}, percent: 100}\n"
        f"      endpoints:\n        - {{url: '{url(ups.ok[0])}', version: v1}}\n"
        f"        - {{url: '{url(ups.slow)}', version: shadow}}\n"
        "      routes:\n        - to: [{version: v1}]\n"
    )
    transport = MeshTransport(mesh)
    with httpx.Client(transport=transport) as client:
        for _ in range(3):
            assert client.get("http://inventory/x").status_code == 200
    shadows = transport._shadows
    # close returned once every shadow was over: those running got their (400 ms) answer; one
    # still queued behind other tests' shadows in the shared pool was dropped unsent.
    assert shadows.sent + shadows.unsent == 3 and shadows.failed == 0
    assert shadows.sent >= 1
    mesh.close()
