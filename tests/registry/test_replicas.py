"""Three `mesh registry` processes on one etcd store: one catalog, one issuer, one admin token."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from mesh_middleware.cli import main
from tests.registry.support import (
    Registry,
    bearer,
    create_join_token,
    etcd_store,
    instance_ids,
    register,
    start_registry,
    start_replicas,
    verify,
    wait_until,
)
from tests.registry.test_telemetry import many, report
from tests.support.etcd_cluster import Cluster, cluster_from_env
from tests.support.servers import free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster() -> Cluster:
    return cluster_from_env()


@pytest.fixture
def store(cluster: Cluster, tmp_path: Path) -> list[str]:
    return etcd_store(cluster.store_hosts, tmp_path / "store")


@pytest.fixture
def replicas(tmp_path: Path, store: list[str]) -> Iterator[list[Registry]]:
    with start_replicas(tmp_path, store) as running:
        yield running


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10.0) as http:
        yield http


def test_an_instance_registered_through_one_replica_is_listed_by_the_others(
    replicas: list[Registry], client: httpx.Client
) -> None:
    a, b, c = replicas
    # The first replica's admin token works on every replica: B makes the join token.
    b.data_dir = a.data_dir  # (B keeps no copy of the token file)
    token = create_join_token(client, b, "orders")
    answer = register(client, a, "orders", "i-1", token, port=8001)
    assert answer.status_code == 200, answer.text
    index = answer.json()["index"]
    for replica in (b, c):
        wait_until(lambda r=replica: instance_ids(client, r, "orders") == {"i-1"}, 1.0)  # type: ignore[misc]
        listed = client.get(f"{replica.url}/v1/catalog/services/orders").json()
        assert listed["index"] == index  # one index on every replica: the etcd revision
    # Deregistered through C: gone everywhere.
    gone = client.delete(f"{c.url}/v1/catalog/services/orders/instances/i-1", headers=bearer(token))
    assert gone.status_code == 200, gone.text
    for replica in (a, b):
        wait_until(lambda r=replica: instance_ids(client, r, "orders") == set(), 1.0)  # type: ignore[misc]


def test_a_watch_on_one_replica_wakes_within_a_second_of_a_change_through_another(
    replicas: list[Registry], client: httpx.Client
) -> None:
    a, _, c = replicas
    token = create_join_token(client, a, "orders")
    index = register(client, a, "orders", "i-1", token).json()["index"]
    answered: dict[str, float | int] = {}

    def watch() -> None:
        start = time.monotonic()
        with httpx.Client(timeout=30.0) as http:
            response = http.get(f"{c.url}/v1/catalog/services/orders?index={index}&wait=20s")
        answered["seconds"] = time.monotonic() - start
        answered["index"] = response.json()["index"]

    thread = threading.Thread(target=watch)
    thread.start()
    time.sleep(0.5)  # the watch is waiting on C
    changed = register(client, a, "orders", "i-2", token).json()["index"]
    thread.join(timeout=25)
    woke_after = answered["seconds"] - 0.5
    print(f"\nwatch on C woke {woke_after * 1000:.0f} ms after the change through A")
    assert answered["index"] == changed
    assert woke_after < 1.0


def test_tokens_from_any_replica_verify_with_the_keys_of_any_other(
    replicas: list[Registry], client: httpx.Client
) -> None:
    a, b, c = replicas
    token = create_join_token(client, a, "orders")
    for issuing in replicas:
        minted = client.post(
            f"{issuing.url}/v1/identity/token",
            json={"audience": "inventory"},
            headers=bearer(token),
        )
        assert minted.status_code == 200, minted.text
        for verifying in (a, b, c):
            jwks = client.get(f"{verifying.url}/v1/identity/jwks").json()
            assert verify(minted.json()["token"], jwks, "inventory").service == "orders"
    # A key rotation through B reaches A and C (new key published everywhere).
    rotated = client.post(f"{b.url}/v1/admin/keys/rotate", headers=a.admin())
    assert rotated.status_code == 200, rotated.text
    kids = {k["kid"] for k in client.get(f"{b.url}/v1/identity/jwks").json()["keys"]}
    for replica in (a, c):
        wait_until(
            lambda r=replica: (
                {  # type: ignore[misc]
                    k["kid"] for k in client.get(f"{r.url}/v1/identity/jwks").json()["keys"]
                }
                == kids
            ),
            1.0,
        )


def test_one_replica_leads_and_another_takes_over_when_it_dies(
    replicas: list[Registry], client: httpx.Client
) -> None:
    def leaders() -> list[Registry]:
        out = []
        for replica in replicas:
            try:
                status = client.get(f"{replica.url}/healthz", timeout=1.0).json()
            except httpx.HTTPError:
                continue
            if status["replica"]["leader"]:
                out.append(replica)
        return out

    wait_until(lambda: len(leaders()) == 1, 10.0)
    [leader] = leaders()
    leader.kill()
    took = wait_until(lambda: len(leaders()) == 1, 15.0)
    print(f"\nanother replica leads {took:.1f} s after kill -9 of the leader")
    assert leaders()[0] is not leader


def test_a_restarted_replica_catches_up(
    tmp_path: Path, store: list[str], client: httpx.Client
) -> None:
    with start_replicas(tmp_path, store, count=2) as (a, b):
        token = create_join_token(client, a, "orders")
        register(client, a, "orders", "i-1", token, ttl="60s")
        b.kill()
        register(client, a, "orders", "i-2", token, ttl="60s")
        register(client, a, "orders", "i-3", token, ttl="60s")
        with start_registry(b.data_dir, port=b.port, extra=store) as again:
            assert instance_ids(client, again, "orders") == {"i-1", "i-2", "i-3"}
            mine = client.get(f"{again.url}/v1/catalog/services/orders").json()["index"]
            assert mine == client.get(f"{a.url}/v1/catalog/services/orders").json()["index"]


def test_a_replica_without_the_store_key_refuses_to_start(tmp_path: Path, store: list[str]) -> None:
    without_key = store[:2]
    with (
        pytest.raises(RuntimeError, match="MESH_STORE_KEY"),
        start_registry(tmp_path / "keyless", extra=without_key),
    ):
        pass


def test_every_replica_shows_the_edge_reports_any_replica_took(
    tmp_path: Path, store: list[str], client: httpx.Client
) -> None:
    """One telemetry view: a report posted to A shows on B at once, and on a replica started
    later (it merges what etcd still holds)."""
    with start_replicas(tmp_path, store, count=2) as (a, b):
        token = create_join_token(client, a, "orders")
        body = report("orders", many("orders", "inventory", 40))
        posted = client.post(f"{a.url}/v1/telemetry/reports", json=body, headers=bearer(token))
        assert posted.status_code == 202, posted.text

        def requests_on(replica: Registry) -> int:
            answer = client.get(f"{replica.url}/v1/telemetry/topology?window=60s").json()
            edges = [e for e in answer["edges"] if e["source"] == "orders"]
            return int(edges[0]["requests"]) if edges else 0

        wait_until(lambda: requests_on(b) == 40, 1.0)
        assert requests_on(a) == 40  # merged once on A, not again from its own share
        with start_registry(tmp_path / "late", extra=store) as late:
            assert requests_on(late) == 40


def test_an_index_from_another_history_is_answered_at_once(
    replicas: list[Registry], client: httpx.Client
) -> None:
    """An index etcd never reached (a client of a wiped store) is answered at once with the
    current state, as a single registry does; never a 503 loop."""
    start = time.monotonic()
    answer = client.get(f"{replicas[1].url}/v1/catalog/services/orders?index=999999999&wait=10s")
    assert answer.status_code == 200, answer.text
    assert time.monotonic() - start < 2.0
    assert answer.json()["index"] < 999999999


def test_mesh_doctor_says_whether_the_urls_make_one_registry(
    replicas: list[Registry], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    urls = ",".join(r.url for r in replicas)
    wait_until(lambda: main(["doctor", "--registry", urls]) == 0, 10.0)  # once one leads
    out = capsys.readouterr().out
    assert "ok: 3 registries agree" in out and out.count(" up ") == 3
    dead = f"http://127.0.0.1:{free_port()}"
    assert main(["doctor", "--registry", f"{urls},{dead}"]) == 1
    assert f"problem: {dead} does not answer" in capsys.readouterr().out
    with start_registry(tmp_path / "alone") as alone:
        assert main(["doctor", "--registry", f"{replicas[0].url},{alone.url}"]) == 1
    assert "different stores" in capsys.readouterr().out
