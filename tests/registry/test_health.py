"""Active HTTP health checks: a real registry polling a real tiny HTTP server on loopback."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.registry.support import (
    HealthServer,
    Registry,
    create_join_token,
    register,
    wait_until,
)
from tests.support.servers import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(30)]


@pytest.fixture
def checked() -> Iterator[HealthServer]:
    """A switchable health endpoint on loopback."""
    with HealthServer() as server:
        yield server


def _check(**fields: Any) -> dict[str, Any]:
    return {"http": "/health", "interval": "1s", "timeout": "1s", **fields}


def _healthy(client: httpx.Client, registry: Registry, service: str, instance_id: str) -> bool:
    answer = client.get(f"{registry.url}/v1/catalog/services/{service}").json()
    (instance,) = [i for i in answer["instances"] if i["id"] == instance_id]
    return bool(instance["healthy"])


def _healthy_ids(client: httpx.Client, registry: Registry, service: str) -> set[str]:
    answer = client.get(
        f"{registry.url}/v1/catalog/services/{service}", params={"healthy": "true"}
    ).json()
    return {i["id"] for i in answer["instances"]}


def test_failing_check_marks_unhealthy_and_recovery_marks_healthy(
    registry: Registry, client: httpx.Client, checked: HealthServer
) -> None:
    """After `failures_before_unhealthy` failed checks the instance is unhealthy and filtered
    out by `?healthy=true`; once the endpoint answers 200 again it is healthy again."""
    token = create_join_token(client, registry, "checked")
    check = _check(failures_before_unhealthy=2, successes_before_healthy=1)
    answer = register(client, registry, "checked", "i-1", token, port=checked.port, check=check)
    assert answer.status_code == 200, answer.text
    assert register(client, registry, "checked", "plain", token).status_code == 200
    wait_until(lambda: checked.hits >= 1, 3.0)
    assert _healthy(client, registry, "checked", "i-1")
    index = client.get(f"{registry.url}/v1/catalog/services/checked").json()["index"]

    checked.status = 500
    took = wait_until(lambda: not _healthy(client, registry, "checked", "i-1"), 5.0)
    assert took >= 0.9, "one failed check must not be enough with failures_before_unhealthy=2"
    assert _healthy_ids(client, registry, "checked") == {"plain"}
    services = client.get(f"{registry.url}/v1/catalog/services").json()["services"]
    assert {"name": "checked", "instances": 2, "healthy": 1} in services
    after = client.get(f"{registry.url}/v1/catalog/services/checked").json()["index"]
    assert after > index  # a health flip is a change watchers see

    checked.status = 200
    wait_until(lambda: _healthy(client, registry, "checked", "i-1"), 3.0)
    assert _healthy_ids(client, registry, "checked") == {"i-1", "plain"}


def test_renewal_keeps_an_unhealthy_instance_unhealthy(
    registry: Registry, client: httpx.Client, checked: HealthServer
) -> None:
    """Renewing the lease (same body) does not reset the health the checks found."""
    token = create_join_token(client, registry, "sticky")
    check = _check(failures_before_unhealthy=1)
    assert register(client, registry, "sticky", "i-1", token, port=checked.port, check=check)
    checked.status = 503
    wait_until(lambda: not _healthy(client, registry, "sticky", "i-1"), 4.0)
    renewed = register(client, registry, "sticky", "i-1", token, port=checked.port, check=check)
    assert renewed.json()["instance"]["healthy"] is False
    assert not _healthy(client, registry, "sticky", "i-1")


def test_recovery_waits_for_successes_before_healthy(
    registry: Registry, client: httpx.Client, checked: HealthServer
) -> None:
    """With successes_before_healthy=3 one good answer is not enough to be healthy again."""
    token = create_join_token(client, registry, "slowback")
    check = _check(failures_before_unhealthy=1, successes_before_healthy=3)
    register(client, registry, "slowback", "i-1", token, port=checked.port, check=check)
    checked.status = 500
    wait_until(lambda: not _healthy(client, registry, "slowback", "i-1"), 4.0)
    checked.status = 200
    took = wait_until(lambda: _healthy(client, registry, "slowback", "i-1"), 6.0)
    assert took >= 1.5


def test_unreachable_instance_becomes_unhealthy(registry: Registry, client: httpx.Client) -> None:
    """A check that cannot connect (nothing listens) counts as failed."""
    token = create_join_token(client, registry, "nowhere")
    check = _check(failures_before_unhealthy=1)
    register(client, registry, "nowhere", "i-1", token, port=free_port(), check=check)
    wait_until(lambda: not _healthy(client, registry, "nowhere", "i-1"), 4.0)


def test_check_slower_than_its_timeout_fails(
    registry: Registry, client: httpx.Client, checked: HealthServer
) -> None:
    """An answer slower than the check's timeout counts as failed."""
    token = create_join_token(client, registry, "sluggish")
    check = _check(timeout="200ms", failures_before_unhealthy=1)
    checked.delay = 0.8
    register(client, registry, "sluggish", "i-1", token, port=checked.port, check=check)
    wait_until(lambda: not _healthy(client, registry, "sluggish", "i-1"), 4.0)


def test_check_of_an_address_no_url_can_hold_is_refused_or_fails(
    registry: Registry, client: httpx.Client
) -> None:
    """An address that makes no valid check URL (here `a:b`, taken for a bad IPv6 literal) is
    either refused at registration or its check fails; it never stays healthy unchecked."""
    token = create_join_token(client, registry, "oddaddr")
    check = _check(failures_before_unhealthy=1)
    answer = register(
        client, registry, "oddaddr", "i-1", token, address="a:b", port=8080, check=check
    )
    if answer.status_code == 400:
        return
    assert answer.status_code == 200, answer.text
    time.sleep(0.5)
    wait_until(lambda: not _healthy(client, registry, "oddaddr", "i-1"), 3.5)
