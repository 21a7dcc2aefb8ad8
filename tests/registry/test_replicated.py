"""The replica's catalog on a real etcd store, driven directly (no watch thread unless said)."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Iterator

import pytest

from mesh_middleware.registry.replicated import (
    MAX_ETCD_CALLS,
    ReplicaBehind,
    ReplicatedCatalog,
    StoreBusy,
)
from mesh_middleware.registry.store import InstanceRecord
from mesh_middleware.registry.store.etcd import EtcdStore, StoreKey
from tests.support.etcd_cluster import Cluster, cluster_from_env


@pytest.fixture(scope="module")
def cluster() -> Cluster:
    return cluster_from_env()


@pytest.fixture
def store(cluster: Cluster) -> Iterator[EtcdStore]:
    url = f"etcd://{cluster.store_hosts}/test-{secrets.token_hex(6)}"
    opened = EtcdStore(url, StoreKey(secrets.token_bytes(32)))
    yield opened
    opened.close()


def _record(instance_id: str = "i-1") -> InstanceRecord:
    return InstanceRecord("orders", instance_id, "127.0.0.1", 8001, None, None, {}, 30.0, None, 0)


def test_a_replica_refuses_at_once_when_etcd_calls_are_backed_up(store: EtcdStore) -> None:
    catalog = ReplicatedCatalog(store)
    catalog._calls = MAX_ETCD_CALLS
    with pytest.raises(StoreBusy):
        asyncio.run(catalog.register(_record()))
    catalog.close()


def test_a_long_poll_ahead_of_a_lagging_replica_says_it_is_behind(store: EtcdStore) -> None:
    """An index etcd reached but this replica's watch did not (here: no watch runs) waits,
    then raises ReplicaBehind (503) rather than answer an older state."""
    catalog = ReplicatedCatalog(store)
    ahead = store.register(_record(), True)  # written behind the catalog's back
    start = time.monotonic()
    with pytest.raises(ReplicaBehind):
        asyncio.run(catalog.wait_for_change("orders", ahead, 0.3))
    assert 0.25 < time.monotonic() - start < 2.0
    catalog.close()


def test_a_relist_rebuilds_the_catalog_and_wakes_every_watcher(store: EtcdStore) -> None:
    catalog = ReplicatedCatalog(store)
    assert catalog.instances("orders") == []

    async def scenario() -> float:
        watching = asyncio.create_task(catalog.wait_for_change("orders", catalog.index, 5.0))
        await asyncio.sleep(0.1)
        revision = await asyncio.to_thread(store.register, _record("i-9"), True)
        loop = asyncio.get_running_loop()
        # As the app does: the store's thread re-lists, the catalog rebuilds on the loop.
        await asyncio.to_thread(
            store._relist, lambda rev: loop.call_soon_threadsafe(catalog.resync, rev)
        )
        start = time.monotonic()
        await watching
        assert catalog.index >= revision
        return time.monotonic() - start

    assert asyncio.run(scenario()) < 0.5
    assert [i["id"] for i in catalog.instances("orders")] == ["i-9"]
    catalog.close()
