"""Discovery: static endpoints, watches against a fake catalog and against real registries."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from mesh_middleware.discovery.catalog import Discovery
from mesh_middleware.discovery.endpoints import EndpointSet
from mesh_middleware.policy.schema import Endpoint as StaticEndpoint
from mesh_middleware.runtime.registry_client import RegistryClient
from tests.discovery.fake_catalog import FakeCatalog, instance, serving, wait_until
from tests.registry.support import Registry, start_registry


@pytest.fixture
def fake() -> Iterator[FakeCatalog]:
    with serving(FakeCatalog()) as running:
        yield running


@pytest.fixture
def discovery(fake: FakeCatalog) -> Iterator[Discovery]:
    found = Discovery(RegistryClient(fake.url))
    yield found
    found.close()


def ids(endpoints: EndpointSet | None) -> list[str]:
    return [e.id for e in endpoints.endpoints] if endpoints is not None else []


def static(url: str, **fields: Any) -> StaticEndpoint:
    return StaticEndpoint(url=url, **fields)


def watched(discovery: Discovery) -> set[str]:
    return {s for s, v in discovery.snapshot().items() if v["source"] == "registry"}


# -- static endpoints --------------------------------------------------------------------------


def test_static_endpoints_are_served_without_a_registry() -> None:
    discovery = Discovery(None)
    discovery.set_static(
        {
            "inventory": [
                static("http://127.0.0.1:8001", version="v1", zone="eu-1"),
                static("https://[::1]/"),
            ],
            "billing": [],  # no endpoints: not static
        }
    )
    found = discovery.get("inventory")
    assert found is not None and found.source == "static" and found.index == 0
    first, second = found.endpoints
    assert (first.id, first.scheme, first.authority, first.version, first.zone) == (
        "http://127.0.0.1:8001",
        "http",
        "127.0.0.1:8001",
        "v1",
        "eu-1",
    )
    assert (second.id, second.scheme, second.host, second.port) == (
        "https://[::1]",
        "https",
        "::1",
        443,
    )
    # Nothing else is known, and without a registry nothing is waited for.
    assert discovery.get("billing") is None
    begun = time.monotonic()
    assert discovery.wait("billing", 5.0) is None
    assert time.monotonic() - begun < 0.5
    assert discovery.snapshot() == {
        "inventory": {
            "source": "static",
            "index": 0,
            "instances": 2,
            "connected": None,
            "stale_seconds": 0.0,
        }
    }
    discovery.close()


def test_a_policy_reload_keeps_unchanged_static_endpoints() -> None:
    discovery = Discovery(None)
    discovery.set_static(
        {"inventory": [static("http://10.0.0.1:80"), static("http://10.0.0.2:80")]}
    )
    before = discovery.get("inventory")
    discovery.set_static(
        {"inventory": [static("http://10.0.0.1:80/"), static("http://10.0.0.2:80")]}
    )
    assert discovery.get("inventory") is before  # nothing changed: the very same set
    discovery.set_static(
        {"inventory": [static("http://10.0.0.1:80"), static("http://10.0.0.2:80", version="v2")]}
    )
    after = discovery.get("inventory")
    assert before is not None and after is not None and after is not before
    assert after.endpoints[0] is before.endpoints[0]
    assert after.endpoints[1] is not before.endpoints[1] and after.subset("v2") == (
        after.endpoints[1],
    )
    discovery.set_static({})
    assert discovery.get("inventory") is None


def test_a_static_endpoint_with_an_invalid_port_changes_nothing() -> None:
    discovery = Discovery(None)
    discovery.set_static({"inventory": [static("http://10.0.0.1:80")]})
    before = discovery.get("inventory")
    with pytest.raises(ValueError, match=r"invalid port|out of range"):
        discovery.set_static({"inventory": [static("http://10.0.0.1:99999")]})
    assert discovery.get("inventory") is before


def test_static_endpoints_win_over_the_registry(fake: FakeCatalog, discovery: Discovery) -> None:
    fake.set(5, [instance("a")])
    assert discovery.wait("inventory", 2.0) is not None
    assert watched(discovery) == {"inventory"}
    discovery.set_static({"inventory": [static("http://127.0.0.1:9000")]})
    found = discovery.get("inventory")
    assert found is not None and found.source == "static"
    assert watched(discovery) == set()  # its watch was stopped
    fake.set(6, [instance("a"), instance("b")])
    time.sleep(0.3)
    assert discovery.get("inventory") is found  # a late answer of the old watch changes nothing
    discovery.set_static({})  # back to the registry, watched again at once
    wait_until(lambda: ids(discovery.get("inventory")) == ["a", "b"], 3.0)


# -- the cache -------------------------------------------------------------------------------


def test_first_sight_starts_a_watch_and_wait_gets_its_first_answer(
    fake: FakeCatalog, discovery: Discovery
) -> None:
    fake.set(3, [instance("a")])
    assert discovery.get("inventory") is None  # nothing known yet; the watch starts
    found = discovery.wait("inventory", 2.0)
    assert ids(found) == ["a"] and found is not None and found.index == 3
    assert discovery.get("inventory") is found
    snapshot = discovery.snapshot()["inventory"]
    assert snapshot == {
        "source": "registry",
        "index": 3,
        "instances": 1,
        "connected": True,
        "stale_seconds": 0.0,
    }


def test_prefetch_starts_watches_without_waiting(fake: FakeCatalog, discovery: Discovery) -> None:
    fake.set(3, [instance("a")])
    discovery.watch(["inventory", "billing", "Not_A_Service"])
    assert watched(discovery) == {"inventory", "billing"}
    wait_until(lambda: discovery.get("billing") is not None, 2.0)


def test_watched_services_are_capped(fake: FakeCatalog) -> None:
    discovery = Discovery(RegistryClient(fake.url), max_services=2)
    try:
        with capture_logs() as logs:
            discovery.watch(["a", "b"])
            assert discovery.get("c") is None and discovery.wait("c", 1.0) is None
            assert discovery.get("d") is None
        assert watched(discovery) == {"a", "b"}
        assert [e["event"] for e in logs] == ["discovery_too_many_services"]
        threads = [t for t in threading.enumerate() if t.name.startswith("mesh-discovery-")]
        assert sorted(t.name for t in threads) == ["mesh-discovery-a", "mesh-discovery-b"]
    finally:
        discovery.close()


def test_close_stops_every_watch(fake: FakeCatalog) -> None:
    discovery = Discovery(RegistryClient(fake.url))
    discovery.watch(["a", "b"])
    wait_until(lambda: len(fake.seen()) >= 2, 2.0)
    discovery.close()
    wait_until(
        lambda: not any(t.name.startswith("mesh-discovery-") for t in threading.enumerate()), 2.0
    )
    assert discovery.get("c") is None and watched(discovery) == set()


def test_get_is_a_dict_lookup(fake: FakeCatalog, discovery: Discovery) -> None:
    fake.set(3, [instance("a")])
    assert discovery.wait("inventory", 2.0) is not None
    calls = 200_000
    begun = time.perf_counter()
    for _ in range(calls):
        discovery.get("inventory")
    per_call = (time.perf_counter() - begun) / calls
    assert per_call < 5e-6, per_call  # about 0.1 us on a 2-core runner; generous for CI noise


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_child_restarts_its_watches_from_what_it_inherited(
    fake: FakeCatalog, discovery: Discovery
) -> None:
    fake.set(3, [instance("a")])
    inherited = discovery.wait("inventory", 2.0)
    assert inherited is not None
    pid = os.fork()
    if pid == 0:  # the child: report by exit status only
        status = 1
        try:
            if discovery.get("inventory") is inherited:  # served at once, from memory
                deadline = time.monotonic() + 5.0
                while time.monotonic() < deadline and ids(discovery.get("inventory")) != ["a", "b"]:
                    time.sleep(0.02)
                found = discovery.get("inventory")
                names = {t.name for t in threading.enumerate()}
                if ids(found) == ["a", "b"] and found is not None:
                    kept = found.endpoints[0] is inherited.endpoints[0]
                    status = 0 if kept and "mesh-discovery-inventory" in names else 2
        finally:
            os._exit(status)
    fake.set(4, [instance("a"), instance("b")])
    deadline = time.monotonic() + 10.0
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            raise AssertionError("the forked child did not finish")
        time.sleep(0.05)
    assert os.waitstatus_to_exitcode(status) == 0


# -- against real registries -------------------------------------------------------------------


def put(registry: Registry, service: str, instance_id: str, port: int, **fields: Any) -> int:
    response = httpx.put(
        f"{registry.url}/v1/catalog/services/{service}/instances/{instance_id}",
        json={"address": "127.0.0.1", "port": port, **fields},
        timeout=5.0,
    )
    assert response.status_code == 200, response.text
    return int(response.json()["index"])


def delete(registry: Registry, service: str, instance_id: str) -> None:
    response = httpx.delete(
        f"{registry.url}/v1/catalog/services/{service}/instances/{instance_id}", timeout=5.0
    )
    assert response.status_code == 200, response.text


@pytest.mark.slow
def test_registrations_show_up_within_two_seconds(tmp_path: Path) -> None:
    with start_registry(tmp_path / "data", dev=True) as registry:
        discovery = Discovery(RegistryClient(registry.url))
        try:
            put(registry, "inventory", "a", 8001, version="v1")
            found = discovery.wait("inventory", 2.0)
            assert ids(found) == ["a"] and found is not None
            a = found.endpoints[0]
            assert (a.authority, a.version, a.scheme) == ("127.0.0.1:8001", "v1", "http")
            time.sleep(0.5)  # the watch is now blocked in a long-poll

            begun = time.monotonic()
            put(registry, "inventory", "b", 8002, version="v1")
            wait_until(lambda: ids(discovery.get("inventory")) == ["a", "b"], 2.0)
            put(registry, "inventory", "a", 8001, version="v1")  # a renewal changes nothing
            put(registry, "inventory", "b", 8003, version="v1")  # b moved
            wait_until(lambda: discovery.get("inventory").endpoints[1].port == 8003, 2.0)  # type: ignore[union-attr]
            delete(registry, "inventory", "b")
            wait_until(lambda: ids(discovery.get("inventory")) == ["a"], 2.0)
            assert time.monotonic() - begun < 6.0
            assert discovery.get("inventory").endpoints[0] is a  # type: ignore[union-attr]
            # A service nobody registered is an empty set, and appears when registered.
            empty = discovery.wait("billing", 2.0)
            assert empty is not None and len(empty) == 0
            put(registry, "billing", "x", 9001)
            wait_until(lambda: ids(discovery.get("billing")) == ["x"], 2.0)
        finally:
            discovery.close()
            registry.kill()  # a graceful stop would wait for the watches still in flight


@pytest.mark.slow
def test_an_outage_keeps_the_last_set_and_the_watch_recovers_by_itself(tmp_path: Path) -> None:
    data = tmp_path / "data"
    discovery: Discovery | None = None
    try:
        with start_registry(data, dev=True) as registry:
            port = registry.port
            discovery = Discovery(RegistryClient(registry.url))
            put(registry, "inventory", "a", 8001, ttl="10m")
            served = discovery.wait("inventory", 2.0)
            assert ids(served) == ["a"]
            registry.kill()

            wait_until(lambda: discovery.snapshot()["inventory"]["connected"] is False, 3.0)
            begun = time.monotonic()
            assert discovery.get("inventory") is served  # static stability
            assert discovery.get("billing") is None  # starts a watch, still no waiting
            assert time.monotonic() - begun < 0.05
            begun = time.monotonic()
            assert discovery.wait("billing", 5.0) is None  # the registry is known to be down
            assert discovery.wait("inventory", 5.0) is served
            assert time.monotonic() - begun < 1.0
            time.sleep(0.5)
            assert discovery.snapshot()["inventory"]["stale_seconds"] > 0.4

        with start_registry(data, dev=True, port=port) as registry:
            wait_until(lambda: discovery.snapshot()["inventory"]["connected"] is True, 15.0)
            assert discovery.get("inventory") is served  # same data, same set
            put(registry, "inventory", "b", 8002)
            wait_until(lambda: ids(discovery.get("inventory")) == ["a", "b"], 2.0)
            assert discovery.get("inventory").endpoints[0] is served.endpoints[0]  # type: ignore[union-attr]
            registry.kill()
    finally:
        if discovery is not None:
            discovery.close()


@pytest.mark.slow
def test_a_registry_back_with_a_new_store_replaces_the_set(tmp_path: Path) -> None:
    discovery: Discovery | None = None
    try:
        with start_registry(tmp_path / "old", dev=True) as registry:
            port = registry.port
            discovery = Discovery(RegistryClient(registry.url))
            for n in range(5):  # move the index well past the new store's
                put(registry, "inventory", "a", 8001, version=f"v{n}")
            put(registry, "inventory", "b", 8002)
            wait_until(lambda: ids(discovery.get("inventory")) == ["a", "b"], 3.0)
            old_index = discovery.snapshot()["inventory"]["index"]
            registry.kill()
            wait_until(lambda: discovery.snapshot()["inventory"]["connected"] is False, 3.0)

        with start_registry(tmp_path / "new", dev=True, port=port) as registry:
            put(registry, "inventory", "z", 8009)
            wait_until(lambda: ids(discovery.get("inventory")) == ["z"], 15.0)
            new_index = discovery.snapshot()["inventory"]["index"]
            assert new_index < old_index
            put(registry, "inventory", "y", 8008)  # and it watches from the new history on
            wait_until(lambda: ids(discovery.get("inventory")) == ["y", "z"], 2.0)
            registry.kill()
    finally:
        if discovery is not None:
            discovery.close()


@pytest.mark.slow
def test_a_new_destination_does_not_wait_while_the_registry_is_known_down() -> None:
    """A registry that accepts connections and never answers: once one watch has found it
    down, a first call to another destination does not wait for the same failure."""
    import socket

    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(16)  # never accepted, never answered
        port = hole.getsockname()[1]
        discovery = Discovery(RegistryClient(f"http://127.0.0.1:{port}", timeout=0.5))
        try:
            assert discovery.wait("inventory", 5.0) is None  # its first poll times out
            assert discovery.snapshot()["inventory"]["connected"] is False
            begun = time.monotonic()
            assert discovery.wait("billing", 5.0) is None
            assert time.monotonic() - begun < 0.3  # not billing's own 0.5 s+ timeout
        finally:
            discovery.close()
