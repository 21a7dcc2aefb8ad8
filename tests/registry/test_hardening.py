"""What the second review found: watches that outlive clients, unbounded caches and checks,
deep JSON, slow registries, and health checks aimed at link-local addresses."""

from __future__ import annotations

import asyncio
import re
import socket
import time
from pathlib import Path

import httpx
import pytest

from mesh_middleware.registry.catalog import Catalog
from mesh_middleware.registry.health import HealthChecker
from mesh_middleware.registry.store import InstanceRecord, SQLiteStore
from mesh_middleware.runtime.registry_client import RegistryClient, RegistryUnavailable
from tests.identity.test_keys import _TricklingServer
from tests.registry.support import Registry

pytestmark = pytest.mark.timeout(60)


def _watchers(client: httpx.Client, registry: Registry) -> float:
    text = client.get(f"{registry.url}/metrics").text
    match = re.search(r"^mesh_registry_watchers (\S+)$", text, re.MULTILINE)
    assert match is not None
    return float(match.group(1))


def test_a_watch_whose_client_left_stops_waiting(
    dev_registry: Registry, client: httpx.Client
) -> None:
    """Closing the connection of a long-poll frees its place at once, not after the wait."""
    watches = []
    for _ in range(20):
        sock = socket.create_connection(("127.0.0.1", dev_registry.port))
        sock.sendall(b"GET /v1/catalog/services/ghost?index=0&wait=5m HTTP/1.1\r\nHost: x\r\n\r\n")
        watches.append(sock)
    deadline = time.monotonic() + 5
    while _watchers(client, dev_registry) < 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _watchers(client, dev_registry) == 20
    for sock in watches:
        sock.close()
    deadline = time.monotonic() + 3
    while _watchers(client, dev_registry) > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _watchers(client, dev_registry) == 0


def test_deeply_nested_json_is_a_400(dev_registry: Registry, client: httpx.Client) -> None:
    """A body nested past the parser's recursion limit is refused, not a 5xx."""
    body = b"[" * 30_000 + b"]" * 30_000
    for method, path in [
        ("PUT", "/v1/catalog/services/deep/instances/i-1"),
        ("POST", "/v1/identity/token"),
    ]:
        response = client.request(method, f"{dev_registry.url}{path}", content=body)
        assert response.status_code in (400, 413), (path, response.text)


def test_a_link_local_address_cannot_be_health_checked(
    dev_registry: Registry, client: httpx.Client
) -> None:
    """The registry never connects to link-local addresses (cloud metadata lives there)."""
    response = client.put(
        f"{dev_registry.url}/v1/catalog/services/meta/instances/i-1",
        json={"address": "169.254.169.254", "port": 80, "check": {"http": "/"}},
    )
    assert response.status_code == 400
    assert "link-local" in response.json()["reason"]


def test_watch_answers_are_cached_once_per_service(
    dev_registry: Registry, client: httpx.Client
) -> None:
    """Many changes and reads keep one encoded answer per service, not one per index."""
    url = f"{dev_registry.url}/v1/catalog/services/churn"
    for n in range(30):
        client.put(f"{url}/instances/i-1", json={"address": "127.0.0.1", "port": 1000 + n})
        assert client.get(url).json()["instances"][0]["port"] == 1000 + n


def test_a_slow_check_is_not_started_again_while_in_flight(tmp_path: Path) -> None:
    """A check whose target never answers runs once at a time, bounded by its timeout."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # accepts connections into the backlog, never answers
    port = silent.getsockname()[1]
    store = SQLiteStore(tmp_path / "registry.db")
    try:
        catalog = Catalog(store)
        register = catalog.register(
            InstanceRecord(
                "slow",
                "i-1",
                "127.0.0.1",
                port,
                None,
                None,
                {},
                30.0,
                {
                    "http": "/",
                    "interval": 0.2,
                    "timeout": 0.5,
                    "failures_before_unhealthy": 1,
                    "successes_before_healthy": 1,
                },
                0,
            )
        )
        asyncio.run(register)

        async def main() -> int:
            checker = HealthChecker(catalog)
            most = 0
            for _ in range(15):
                await checker.tick()
                most = max(most, len(checker._running))
                await asyncio.sleep(0.1)
            await checker.close()
            return most

        assert asyncio.run(main()) == 1
        assert catalog.instances("slow")[0]["healthy"] is False
    finally:
        store.close()
        silent.close()


def test_a_trickling_registry_cannot_hold_a_call_past_its_deadline() -> None:
    """The runtime's registry calls end by an overall deadline, whatever the server sends."""
    server = _TricklingServer()
    try:
        client = RegistryClient(server.url.rsplit("/", 1)[0], timeout=1.0)
        started = time.monotonic()
        with pytest.raises(RegistryUnavailable):
            client.trust()
        assert time.monotonic() - started < 4.0
        client.close()
    finally:
        server.close()


def test_the_rendered_cache_holds_one_entry_per_service(tmp_path: Path) -> None:
    """In-process: the shared watch answer is replaced, not accumulated, as the index moves."""
    from mesh_middleware.registry.app import create_registry_app
    from mesh_middleware.registry.settings import RegistrySettings

    app = create_registry_app(RegistrySettings(data_dir=tmp_path / "data", dev=True))
    state = app.state.registry

    async def main() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://r") as http:
            for n in range(50):
                await http.put(
                    "/v1/catalog/services/churn/instances/i-1",
                    json={"address": "127.0.0.1", "port": 2000 + n},
                )
                await http.get("/v1/catalog/services/churn")
                await http.get("/v1/catalog/services/churn?healthy=true")

    asyncio.run(main())
    assert len(state.rendered) == 2
