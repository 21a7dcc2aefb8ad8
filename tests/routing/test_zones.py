"""Zone preference: stay local while the zone is healthy enough (Envoy's 1.4 factor), then spill."""

from __future__ import annotations

import math
import random

import pytest

from mesh_middleware.discovery.endpoints import Endpoint
from mesh_middleware.routing.zones import prefer_zone

ALMOST_ONE = math.nextafter(1.0, 0.0)


def endpoints(zone: str | None, n: int) -> list[Endpoint]:
    return [Endpoint(f"{zone}-{i}", "http", "10.0.0.1", 8000 + i, zone=zone) for i in range(n)]


LOCAL = endpoints("eu-1", 3)
REMOTE = endpoints("us-1", 2)
SUBSET = (*LOCAL, *REMOTE)


def test_no_caller_zone_returns_available_unchanged() -> None:
    available = (LOCAL[0], REMOTE[0])
    assert prefer_zone(available, SUBSET, None, 0.0) is available


def test_no_instance_in_the_callers_zone_returns_available_unchanged() -> None:
    available = SUBSET[1:]
    assert prefer_zone(available, SUBSET, "ap-1", 0.0) is available
    # an available instance in the zone does not count if the subset has none there
    assert prefer_zone(available, REMOTE, "eu-1", 0.0) is available


@pytest.mark.parametrize("rand", [0.0, 0.5, ALMOST_ONE])
def test_healthy_local_zone_keeps_every_call(rand: float) -> None:
    assert list(prefer_zone(SUBSET, SUBSET, "eu-1", rand)) == LOCAL


def test_zone_above_the_overprovisioned_threshold_keeps_every_call() -> None:
    # 4 of 5 local left: 1.4 * 0.8 = 1.12, capped at 1
    local = endpoints("eu-1", 5)
    available = (*local[:4], *REMOTE)
    assert list(prefer_zone(available, (*local, *REMOTE), "eu-1", ALMOST_ONE)) == local[:4]


def test_two_of_three_left_keeps_93_percent() -> None:
    available = (LOCAL[0], LOCAL[1], *REMOTE)
    share = 1.4 * 2 / 3
    assert list(prefer_zone(available, SUBSET, "eu-1", share - 1e-9)) == LOCAL[:2]
    assert list(prefer_zone(available, SUBSET, "eu-1", share)) == REMOTE


def test_one_of_three_left_spills_the_expected_share() -> None:
    available = (LOCAL[0], *REMOTE)
    rng = random.Random(2024)
    n = 10_000
    spilled = sum(
        list(prefer_zone(available, SUBSET, "eu-1", rng.random())) == REMOTE for _ in range(n)
    )
    p = 1 - 1.4 / 3  # about 53% spill
    assert abs(spilled - n * p) <= 4.5 * math.sqrt(n * p * (1 - p)), spilled


def test_local_zone_with_nothing_available_goes_to_the_other_zones() -> None:
    assert list(prefer_zone(REMOTE, SUBSET, "eu-1", 0.0)) == REMOTE


def test_spill_with_no_other_zone_available_stays_local() -> None:
    available = (LOCAL[0],)
    assert list(prefer_zone(available, SUBSET, "eu-1", ALMOST_ONE)) == [LOCAL[0]]


def test_nothing_available_returns_available() -> None:
    available: tuple[Endpoint, ...] = ()
    assert prefer_zone(available, SUBSET, "eu-1", 0.5) is available


def test_endpoints_without_a_zone_count_as_other_zones() -> None:
    unzoned = endpoints(None, 2)
    available = (LOCAL[0], *unzoned)
    assert list(prefer_zone(available, (*LOCAL, *unzoned), "eu-1", ALMOST_ONE)) == unzoned
