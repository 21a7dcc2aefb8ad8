"""The bar of registry replicas: kill -9 a registry replica and the etcd leader at once under
steady renewals, lookups and token calls from clients that know all three replicas.

Counts every call that failed after the client's failover (printed, and required to be none),
checks that no instance ever left the catalog, that tokens kept verifying on every replica, and
that everything converges once both come back.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from mesh_middleware.runtime.registry_client import RegistryClient, RegistryError
from tests.registry.support import (
    Registry,
    create_join_token,
    etcd_store,
    start_registry,
    start_replicas,
    verify,
    wait_until,
)
from tests.support.etcd_cluster import cluster_from_env

pytestmark = pytest.mark.slow

INSTANCES = 6
TTL = "6s"  # renewed every second: a lease outlives five missed renewals
RUN_BEFORE = 3.0
RUN_AFTER = 14.0  # over two TTLs after the kills: a lost lease would show


class Tally:
    """Calls by kind: how many, how many failed (after failover), and the first errors."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: collections.Counter[str] = collections.Counter()
        self.failed: collections.Counter[str] = collections.Counter()
        self.errors: list[str] = []

    def run(self, kind: str, call: Callable[[], None]) -> None:
        try:
            call()
        except (RegistryError, AssertionError, httpx.HTTPError, ValueError) as exc:
            with self.lock:
                self.calls[kind] += 1
                self.failed[kind] += 1
                if len(self.errors) < 20:
                    self.errors.append(f"{time.strftime('%X')} {kind}: {exc}")
        else:
            with self.lock:
                self.calls[kind] += 1


def test_kill_a_replica_and_the_etcd_leader_under_load(tmp_path: Path) -> None:
    cluster = cluster_from_env()
    store = etcd_store(cluster.store_hosts, tmp_path / "store")
    with start_replicas(tmp_path, store) as replicas:
        a = replicas[0]
        urls = ",".join(r.url for r in replicas)  # A first: every client starts on A
        with httpx.Client(timeout=10.0) as http:
            join = create_join_token(http, a, "orders")
        tally = Tally()
        stop = threading.Event()
        missing: list[str] = []
        verified: collections.Counter[str] = collections.Counter()

        def renewals(n: int) -> None:
            client = RegistryClient(urls, join)
            body = {"address": "127.0.0.1", "port": 9000 + n, "ttl": TTL}
            while not stop.is_set():
                tally.run("renewal", lambda: client.register("orders", f"i-{n}", body))
                stop.wait(1.0)
            client.close()

        def lookups() -> None:
            client = RegistryClient(urls, join)

            def look() -> None:
                _, listed = client.instances("orders", index=None, wait=None, timeout=2.0)
                ids = {i["id"] for i in listed}
                if len(ids) != INSTANCES:
                    missing.append(f"{time.strftime('%X')} listed {sorted(ids)}")

            while not stop.is_set():
                tally.run("lookup", look)
                stop.wait(0.05)
            client.close()

        def tokens() -> None:
            client = RegistryClient(urls, join)

            def mint_and_verify() -> None:
                issued = client.token("orders", "inventory")
                # Verified with the keys every live replica publishes now (a restarted one too).
                for replica in replicas:
                    if replica.proc.poll() is not None:
                        continue
                    try:
                        jwks = httpx.get(f"{replica.url}/v1/identity/jwks", timeout=2).json()
                    except httpx.HTTPError:
                        continue  # killed meanwhile
                    assert verify(issued.token, jwks, "inventory").service == "orders"
                    verified[replica.url] += 1

            while not stop.is_set():
                tally.run("token", mint_and_verify)
                stop.wait(0.2)
            client.close()

        threads = [threading.Thread(target=renewals, args=(n,)) for n in range(INSTANCES)]
        threads += [threading.Thread(target=lookups), threading.Thread(target=tokens)]
        for thread in threads:
            thread.start()
        try:
            with httpx.Client(timeout=5.0) as http:
                wait_until(
                    lambda: (
                        len(http.get(f"{a.url}/v1/catalog/services/orders").json()["instances"])
                        == INSTANCES
                    ),
                    10.0,
                )
            missing.clear()  # before every instance had registered once
            time.sleep(RUN_BEFORE)
            leader = cluster.leader()
            a.kill()
            leader.kill()
            killed_at = time.monotonic()
            time.sleep(RUN_AFTER)
            leader.start()
            with start_registry(a.data_dir, port=a.port, extra=store) as restarted:
                replicas[0] = restarted
                converged = _converge(replicas, cluster)
                time.sleep(2.0)  # traffic goes on across the restarts
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=15)
        after = time.monotonic() - killed_at
        print(
            f"\nkill -9 of registry replica A and of the etcd leader ({leader.name}); "
            f"{after:.0f} s of traffic after the kills, converged {converged:.1f} s after "
            f"the restarts"
        )
        for kind in ("renewal", "lookup", "token"):
            print(f"  {kind:8s} calls {tally.calls[kind]:5d}   failed {tally.failed[kind]}")
        print(f"  lookups missing an instance: {len(missing)}")
        print(f"  tokens verified with each replica's keys: {sorted(verified.values())}")
        assert not tally.errors, tally.errors
        assert not missing, missing[:10]
        assert min(tally.calls[k] for k in ("renewal", "lookup", "token")) > 20
        assert verified[restarted.url] > 0  # the restarted replica signs and verifies alike


def _converge(replicas: list[Registry], cluster: object) -> float:
    """Wait until every replica lists the same instances (a restarted replica answers at the
    revision it loaded, or later: its index may be ahead, never behind)."""

    def same() -> bool:
        seen = set()
        for replica in replicas:
            answer = httpx.get(f"{replica.url}/v1/catalog/services/orders", timeout=2.0).json()
            seen.add(tuple(sorted((i["id"], i["port"], i["healthy"]) for i in answer["instances"])))
        return len(seen) == 1 and len(next(iter(seen))) == INSTANCES

    try:
        return wait_until(same, 15.0)
    except AssertionError:
        answers = [
            httpx.get(f"{r.url}/v1/catalog/services/orders", timeout=2.0).json() for r in replicas
        ]
        raise AssertionError(f"the replicas did not converge: {answers}") from None
