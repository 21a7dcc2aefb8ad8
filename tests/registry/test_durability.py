"""What a registry acknowledged survives a restart and a kill -9 (real processes, same data dir)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.registry.support import (
    HealthServer,
    Registry,
    bearer,
    create_join_token,
    instance_ids,
    instance_path,
    register,
    start_registry,
    verify,
    wait_until,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]


def _listing(client: httpx.Client, registry: Registry, service: str) -> list[dict[str, Any]]:
    """A service's instances without the lease countdown (which restarts on a restart)."""
    answer = client.get(f"{registry.url}/v1/catalog/services/{service}").json()
    return [{k: v for k, v in i.items() if k != "expires_in"} for i in answer["instances"]]


def _index(client: httpx.Client, registry: Registry) -> int:
    return int(client.get(f"{registry.url}/healthz").json()["index"])


def test_restart_keeps_registrations_tokens_keys_and_index(
    tmp_path: Path, client: httpx.Client
) -> None:
    """Stop (SIGTERM) and start on the same data dir: every registration is listed, the index
    did not go backwards, old JWT-SVIDs verify, join tokens work, the admin token is reused."""
    data = tmp_path / "data"
    services = ("orders", "inventory", "payments")
    with start_registry(data) as first:
        admin = first.admin_token
        admin_file = os.stat(data / "admin.token")
        joins = {s: create_join_token(client, first, s) for s in services}
        for service in services:
            for n in range(3):
                answer = register(
                    client,
                    first,
                    service,
                    f"{service}-{n}",
                    joins[service],
                    port=9000 + n,
                    version=f"v{n}",
                    zone="eu-1",
                    metadata={"n": str(n)},
                    ttl="2m",
                )
                assert answer.status_code == 200
        gone = client.delete(
            f"{first.url}{instance_path('payments', 'payments-2')}",
            headers=bearer(joins["payments"]),
        )
        assert gone.status_code == 200
        issued = client.post(
            f"{first.url}/v1/identity/token",
            json={"audience": "inventory"},
            headers=bearer(joins["orders"]),
        ).json()["token"]
        before = {s: _listing(client, first, s) for s in services}
        index = _index(client, first)
        catalog_index = client.get(f"{first.url}/v1/catalog/services").json()["index"]
    assert first.proc.returncode is not None

    with start_registry(data) as second:
        for service in services:
            assert _listing(client, second, service) == before[service]
        assert _index(client, second) >= index
        assert client.get(f"{second.url}/v1/catalog/services").json()["index"] >= catalog_index
        jwks = client.get(f"{second.url}/v1/identity/jwks").json()
        assert verify(issued, jwks, "inventory").service == "orders"
        assert register(client, second, "orders", "late", joins["orders"]).status_code == 200
        fresh = client.post(
            f"{second.url}/v1/identity/token",
            json={"audience": "payments"},
            headers=bearer(joins["inventory"]),
        )
        assert fresh.status_code == 200
        assert verify(fresh.json()["token"], jwks, "payments").service == "inventory"
        assert _index(client, second) > index
        assert second.admin_token == admin
        again = os.stat(data / "admin.token")
        assert (again.st_ino, again.st_mtime_ns) == (admin_file.st_ino, admin_file.st_mtime_ns)
        assert "created the admin token" not in second.stderr()
        assert admin not in second.stderr()
        assert client.get(f"{second.url}/v1/admin/join-tokens", headers=bearer(admin)).is_success


def test_restart_after_a_health_flip_does_not_move_the_index_backwards(
    tmp_path: Path, client: httpx.Client
) -> None:
    """An index a registry answered (here the one of a health flip) is never answered again for
    another state after a restart: the restarted registry's index is at least as high."""
    data = tmp_path / "data"
    with HealthServer() as checked, start_registry(data) as first:
        token = create_join_token(client, first, "flipped")
        check = {"http": "/h", "interval": "1s", "failures_before_unhealthy": 1}
        register(client, first, "flipped", "i-1", token, port=checked.port, check=check)
        checked.status = 500

        def unhealthy() -> bool:
            answer = client.get(f"{first.url}/v1/catalog/services/flipped").json()
            return answer["instances"][0]["healthy"] is False

        wait_until(unhealthy, 5.0)
        seen = client.get(f"{first.url}/v1/catalog/services/flipped").json()["index"]
        first_index = _index(client, first)
    with start_registry(data) as second:
        assert _index(client, second) >= first_index
        answer = client.get(
            f"{second.url}/v1/catalog/services/flipped", params={"index": seen, "wait": "0s"}
        ).json()
        assert answer["index"] >= seen


def _writer(
    registry: Registry,
    token: str,
    ids: list[str],
    acknowledged: list[str],
    failures: list[str],
) -> None:
    with httpx.Client(timeout=5.0) as http:
        for instance_id in ids:
            try:
                answer = register(
                    http, registry, "durable", instance_id, token, ttl="10m", zone="z"
                )
            except httpx.HTTPError:
                return  # the registry was killed
            if answer.status_code == 200:
                acknowledged.append(instance_id)
            else:
                failures.append(f"{instance_id}: {answer.status_code} {answer.text}")


def test_kill_9_loses_no_acknowledged_registration(tmp_path: Path, client: httpx.Client) -> None:
    """Writers register 2,000 distinct instances as fast as they can; kill -9 the registry
    mid-way; after a restart every registration it answered 200 to is listed."""
    data = tmp_path / "data"
    acknowledged: list[str] = []
    failures: list[str] = []
    with start_registry(data) as first:
        token = create_join_token(client, first, "durable")
        writers = [
            threading.Thread(
                target=_writer,
                args=(first, token, [f"w{w}-{n:04d}" for n in range(500)], acknowledged, failures),
                daemon=True,
            )
            for w in range(4)
        ]
        started = time.monotonic()
        for writer in writers:
            writer.start()
        wait_until(lambda: len(acknowledged) >= 600, 30.0, interval=0.005)
        first.kill()
        for writer in writers:
            writer.join(10.0)
        rate = len(acknowledged) / (time.monotonic() - started)
    assert not failures
    assert 600 <= len(acknowledged) < 2000, "the kill did not land mid-way"
    with start_registry(data) as second:
        listed = instance_ids(client, second, "durable")
        missing = set(acknowledged) - listed
        assert not missing, f"{len(missing)} acknowledged registrations lost ({rate:.0f}/s)"
        assert len(listed - set(acknowledged)) <= len(writers)  # at most one in flight each
        assert _index(client, second) >= len(acknowledged)
        again = register(client, second, "durable", "after", token)
        assert again.status_code == 200
        assert again.json()["index"] > len(acknowledged)


def test_kill_9_during_renewals_keeps_the_last_acknowledged_data(
    tmp_path: Path, client: httpx.Client
) -> None:
    """Instances renew (every other round with new metadata) while the registry is killed -9;
    after a restart each one has at least the data of its last acknowledged registration."""
    data = tmp_path / "data"
    last: dict[str, int] = {}
    ids = [f"r-{n:02d}" for n in range(40)]
    with start_registry(data) as first:
        token = create_join_token(client, first, "durable")
        stop = threading.Event()

        def renew() -> None:
            with httpx.Client(timeout=5.0) as http:
                round_ = 0
                while not stop.is_set():
                    generation = round_ // 2  # odd rounds renew an unchanged body
                    for instance_id in ids:
                        try:
                            answer = register(
                                http,
                                first,
                                "durable",
                                instance_id,
                                token,
                                ttl="10m",
                                metadata={"gen": str(generation)},
                            )
                        except httpx.HTTPError:
                            return
                        assert answer.status_code == 200, answer.text
                        last[instance_id] = generation
                    round_ += 1

        renewer = threading.Thread(target=renew, daemon=True)
        renewer.start()
        wait_until(lambda: min(last.values(), default=0) >= 10, 30.0, interval=0.005)
        first.kill()
        stop.set()
        renewer.join(10.0)
    with start_registry(data) as second:
        answer = client.get(f"{second.url}/v1/catalog/services/durable").json()
        stored = {i["id"]: int(i["metadata"]["gen"]) for i in answer["instances"]}
    assert set(stored) == set(ids)
    behind = {i: (stored[i], last[i]) for i in ids if stored[i] < last[i]}
    assert not behind, f"acknowledged data lost (stored, acknowledged): {behind}"
    assert all(stored[i] <= last[i] + 1 for i in ids)
