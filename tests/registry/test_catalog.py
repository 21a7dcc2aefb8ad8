"""The catalog: idempotent registration, leases on an injected clock, the index, watches."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Any

import pytest

from mesh_middleware.registry import settings
from mesh_middleware.registry.catalog import Catalog, TooManyWatches
from mesh_middleware.registry.store import InstanceRecord, SQLiteStore


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _record(instance_id: str = "i-1", service: str = "orders", **changes: object) -> InstanceRecord:
    fields: dict[str, object] = {
        "service": service,
        "instance_id": instance_id,
        "address": "127.0.0.1",
        "port": 8001,
        "version": "v1",
        "zone": None,
        "metadata": {},
        "ttl": 10.0,
        "check": None,
        "modify_index": 0,
    }
    fields.update(changes)
    return InstanceRecord(**fields)  # type: ignore[arg-type]


@pytest.fixture
def clock() -> FakeClock:
    """The catalog's clock."""
    return FakeClock()


@pytest.fixture
def catalog(store: SQLiteStore, clock: FakeClock) -> Catalog:
    """A catalog on the store and the fake clock."""
    return Catalog(store, clock=clock)


def test_first_registration_moves_the_index_and_is_stored(
    catalog: Catalog, store: SQLiteStore
) -> None:
    """A new instance is a change: index 1, stored with that index before the call returns."""
    instance, changed = asyncio.run(catalog.register(_record()))
    assert changed
    assert catalog.index == 1
    assert catalog.service_index("orders") == 1
    assert instance.record.modify_index == 1
    assert store.load_index() == 1
    assert [r.instance_id for r in store.load_instances()] == ["i-1"]


def test_renewal_of_an_unchanged_body_only_extends_the_lease(
    catalog: Catalog, clock: FakeClock
) -> None:
    """Re-registering the same data renews the lease and leaves the index where it was."""
    asyncio.run(catalog.register(_record()))
    clock.advance(8)
    instance, changed = asyncio.run(catalog.register(_record()))
    assert not changed
    assert catalog.index == 1
    assert instance.expires_at == clock.now + 10.0
    (view,) = catalog.instances("orders")
    assert view["expires_in"] == 10.0


@pytest.mark.parametrize(
    "change",
    [
        {"port": 9000},
        {"address": "10.0.0.1"},
        {"version": "v2"},
        {"zone": "eu-2"},
        {"metadata": {"k": "v"}},
        {"ttl": 20.0},
        {"check": {"http": "/h", "interval": 5.0}},
    ],
)
def test_a_changed_body_moves_the_index(
    catalog: Catalog, store: SQLiteStore, change: dict[str, Any]
) -> None:
    """Any change but the lease is a new index, stored."""
    asyncio.run(catalog.register(_record()))
    instance, changed = asyncio.run(catalog.register(_record(**change)))
    assert changed
    assert catalog.index == 2
    assert instance.record.modify_index == 2
    (stored,) = store.load_instances()
    assert stored == replace(_record(**change), modify_index=2)


def test_lease_expires_after_ttl(catalog: Catalog, clock: FakeClock, store: SQLiteStore) -> None:
    """An instance not renewed within its TTL is removed by the sweep, which moves the index."""
    asyncio.run(catalog.register(_record(ttl=5.0)))
    clock.advance(4.9)
    assert asyncio.run(catalog.expire()) == 0
    clock.advance(0.2)
    assert asyncio.run(catalog.expire()) == 1
    assert catalog.instances("orders") == []
    assert catalog.services() == []
    assert catalog.index == 2
    assert catalog.service_index("orders") == 2
    assert store.load_instances() == []
    assert store.load_index() == 2


def test_renewing_keeps_an_instance_past_its_first_ttl(catalog: Catalog, clock: FakeClock) -> None:
    """Renewing before the lease ends keeps the instance for another TTL."""
    asyncio.run(catalog.register(_record(ttl=5.0)))
    for _ in range(4):
        clock.advance(4.0)
        asyncio.run(catalog.register(_record(ttl=5.0)))
        assert asyncio.run(catalog.expire()) == 0
    assert len(catalog.instances("orders")) == 1
    assert catalog.index == 1


def test_deregister(catalog: Catalog, store: SQLiteStore) -> None:
    """Deregistering removes the instance, moves the index, and is stored; unknown is False."""
    asyncio.run(catalog.register(_record("a")))
    asyncio.run(catalog.register(_record("b")))
    assert asyncio.run(catalog.deregister("orders", "a"))
    assert not asyncio.run(catalog.deregister("orders", "a"))
    assert not asyncio.run(catalog.deregister("nope", "a"))
    assert catalog.index == 3
    assert [i["id"] for i in catalog.instances("orders")] == ["b"]
    assert [r.instance_id for r in store.load_instances()] == ["b"]


def test_services_count_instances_and_healthy(catalog: Catalog) -> None:
    """The service list says how many instances each service has, and how many are healthy."""
    asyncio.run(catalog.register(_record("a")))
    asyncio.run(catalog.register(_record("b")))
    asyncio.run(catalog.register(_record("c", service="inventory")))
    asyncio.run(catalog.set_health("orders", "b", False))
    assert catalog.services() == [
        {"name": "inventory", "instances": 1, "healthy": 1},
        {"name": "orders", "instances": 2, "healthy": 1},
    ]


def test_healthy_filter(catalog: Catalog) -> None:
    """`healthy_only` leaves out unhealthy instances."""
    asyncio.run(catalog.register(_record("a")))
    asyncio.run(catalog.register(_record("b")))
    asyncio.run(catalog.set_health("orders", "a", False))
    assert [i["id"] for i in catalog.instances("orders", healthy_only=True)] == ["b"]
    assert [i["healthy"] for i in catalog.instances("orders")] == [False, True]


def test_health_flip_moves_the_index_once(catalog: Catalog) -> None:
    """A health change moves the service's index; setting the same health again does not."""
    asyncio.run(catalog.register(_record()))
    asyncio.run(catalog.set_health("orders", "i-1", False))
    assert catalog.service_index("orders") == 2
    asyncio.run(catalog.set_health("orders", "i-1", False))
    assert catalog.index == 2


def test_renewal_keeps_health_but_a_new_check_resets_it(catalog: Catalog) -> None:
    """Renewing (same check) keeps the instance unhealthy; a different check starts healthy."""
    check = {"http": "/h", "interval": 5.0}
    asyncio.run(catalog.register(_record(check=check)))
    asyncio.run(catalog.set_health("orders", "i-1", False))
    asyncio.run(catalog.register(_record(check=check)))
    asyncio.run(catalog.register(_record(check=check, port=9)))
    assert catalog.instances("orders")[0]["healthy"] is False
    asyncio.run(catalog.register(_record(check={"http": "/other", "interval": 5.0}, port=9)))
    assert catalog.instances("orders")[0]["healthy"] is True


def test_unknown_service_is_an_empty_list(catalog: Catalog) -> None:
    """A service nobody registered has no instances and index 0 (it can still be watched)."""
    assert catalog.instances("ghost") == []
    assert catalog.service_index("ghost") == 0


def test_a_new_catalog_loads_what_was_acknowledged(store: SQLiteStore, clock: FakeClock) -> None:
    """A catalog on the same store has every instance, the index, and fresh leases."""
    first = Catalog(store, clock=clock)
    asyncio.run(first.register(_record("a", ttl=5.0)))
    asyncio.run(first.register(_record("b", service="inventory", ttl=30.0)))
    asyncio.run(first.deregister("inventory", "b"))
    asyncio.run(first.register(_record("c", service="inventory", ttl=30.0)))
    clock.advance(4.0)
    second = Catalog(store, clock=clock)
    assert second.index == first.index == 4
    # Every service starts at the loaded index: watchers re-read once after a restart.
    assert second.service_index("orders") == 4
    assert [i["id"] for i in second.instances("orders")] == ["a"]
    assert second.instances("orders")[0]["expires_in"] == 5.0
    assert [i["id"] for i in second.instances("inventory")] == ["c"]


def test_reloading_never_moves_the_index_backwards(store: SQLiteStore, clock: FakeClock) -> None:
    """A catalog reloaded from the store starts at or above every index the old one answered.

    A health flip moves the index in memory only; if the reload starts lower, indexes are
    handed out twice and a watcher holding the higher one misses changes.
    """
    first = Catalog(store, clock=clock)
    asyncio.run(first.register(_record()))
    asyncio.run(first.set_health("orders", "i-1", False))
    answered = first.index
    second = Catalog(store, clock=clock)
    assert second.index >= answered


def _watch(catalog: Catalog, service: str, after: int, wait: float) -> float:
    async def run() -> float:
        start = time.monotonic()
        await catalog.wait_for_change(service, after, wait)
        return time.monotonic() - start

    return asyncio.run(run())


def test_watch_returns_at_once_when_the_index_already_moved(catalog: Catalog) -> None:
    """A watch with an index behind the service's answers without waiting."""
    asyncio.run(catalog.register(_record()))
    assert _watch(catalog, "orders", 0, 5.0) < 0.1


def test_watch_with_an_index_from_another_history_returns_at_once(catalog: Catalog) -> None:
    """An index greater than the catalog's (it went backwards) answers at once."""
    asyncio.run(catalog.register(_record()))
    assert _watch(catalog, "orders", 1000, 5.0) < 0.1


def test_idle_watch_waits_for_wait_plus_at_most_a_sixteenth(catalog: Catalog) -> None:
    """Without changes a watch returns after `wait`, plus jitter of at most wait/16."""
    asyncio.run(catalog.register(_record()))
    took = _watch(catalog, "orders", 1, 0.4)
    assert 0.4 <= took <= 0.4 + 0.4 / 16 + 0.05


def test_zero_wait_answers_at_once(catalog: Catalog) -> None:
    """`wait=0` never blocks."""
    asyncio.run(catalog.register(_record()))
    assert _watch(catalog, "orders", 1, 0.0) < 0.05


def test_change_wakes_watchers_of_that_service_only(catalog: Catalog) -> None:
    """A change of the watched service wakes its watchers; another service's does not."""

    async def run() -> tuple[float, float, int]:
        await catalog.register(_record())
        start = time.monotonic()
        watched = asyncio.create_task(catalog.wait_for_change("orders", 1, 5.0))
        other = asyncio.create_task(catalog.wait_for_change("inventory", 0, 0.6))
        await asyncio.sleep(0.1)
        await catalog.register(_record("x", service="inventory"))  # wakes `other` only
        await catalog.register(_record("x", service="payments"))
        await asyncio.sleep(0.1)
        assert not watched.done()
        await catalog.register(_record("i-2"))
        await watched
        woke = time.monotonic() - start
        await other
        return woke, time.monotonic() - start, catalog.service_index("orders")

    woke, other_done, index = asyncio.run(run())
    assert woke < 0.5
    assert other_done < 0.5  # `inventory` changed, so its watcher returned early too
    assert index == 4


def test_many_watchers_of_one_service_all_wake(catalog: Catalog) -> None:
    """Every watcher of a service wakes on one change."""

    async def run() -> float:
        start = time.monotonic()
        tasks = [asyncio.create_task(catalog.wait_for_change("orders", 0, 5.0)) for _ in range(200)]
        await asyncio.sleep(0.05)
        await catalog.register(_record())
        await asyncio.gather(*tasks)
        return time.monotonic() - start

    took = asyncio.run(run())
    assert took < 1.0


def test_too_many_watched_services_is_refused(
    catalog: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the cap on distinct watched services, a new watch raises TooManyWatches."""
    monkeypatch.setattr(settings, "MAX_WATCHED_SERVICES", 2)

    async def run() -> None:
        tasks = [asyncio.create_task(catalog.wait_for_change(name, 0, 0.5)) for name in ("a", "b")]
        await asyncio.sleep(0.05)
        with pytest.raises(TooManyWatches):
            await catalog.wait_for_change("c", 0, 0.5)
        await asyncio.gather(*tasks)

    asyncio.run(run())
