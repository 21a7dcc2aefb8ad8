"""The load balancers: peak-EWMA bookkeeping, P2C choices, round robin and random."""

from __future__ import annotations

import heapq
import math
import random
import time
from collections import Counter

import pytest

from mesh_middleware.defaults import EWMA_DECAY_SECONDS, EWMA_DEFAULT_SECONDS
from mesh_middleware.discovery.endpoints import Endpoint
from mesh_middleware.policy.schema import ConsistentHash, ConsistentHashBalancer
from mesh_middleware.routing.balancers import (
    Balancer,
    EwmaBalancer,
    LeastRequestBalancer,
    RandomBalancer,
    RingHashBalancer,
    RoundRobinBalancer,
    balancer_for,
    call_finished,
    call_started,
    latency_estimate,
)


def endpoints(n: int) -> list[Endpoint]:
    # Created at time 0 of the fake clocks below.
    return [Endpoint(f"i-{k}", "http", f"10.0.0.{k}", 8080, ewma_at=0.0) for k in range(n)]


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# -- peak EWMA ------------------------------------------------------------------------------


def test_in_flight_counts_and_never_drops_below_zero() -> None:
    (e,) = endpoints(1)
    call_started(e)
    call_started(e)
    assert e.in_flight == 2
    call_finished(e, 0.01, 1.0)
    call_finished(e, 0.01, 2.0)
    call_finished(e, 0.01, 3.0)  # one finish too many (a caller's bug) is absorbed
    assert e.in_flight == 0


def test_unmeasured_endpoint_reads_the_default_estimate_decaying_since_it_appeared() -> None:
    (e,) = endpoints(1)
    assert latency_estimate(e, 0.0) == EWMA_DEFAULT_SECONDS
    decayed = latency_estimate(e, EWMA_DECAY_SECONDS)
    assert decayed == pytest.approx(EWMA_DEFAULT_SECONDS * math.exp(-1))
    # so an instance nobody tried yet wins against ones answering in 5 ms, eventually
    assert latency_estimate(e, 60.0) < 0.005


def test_a_new_endpoint_appears_with_the_default_estimate() -> None:
    before = time.monotonic()
    fresh = Endpoint("i", "http", "10.0.0.1", 8080)
    assert before <= fresh.ewma_at <= time.monotonic()
    assert latency_estimate(fresh, fresh.ewma_at) == EWMA_DEFAULT_SECONDS


def test_a_first_sample_long_after_creation_is_taken_and_a_higher_one_replaces_it() -> None:
    (e,) = endpoints(1)
    call_finished(e, 0.010, 100.0)  # the 30 ms default has had 100 s to fade
    assert e.ewma == pytest.approx(0.010, rel=1e-3)
    assert e.ewma_at == 100.0
    call_finished(e, 0.500, 100.001)  # peak: no averaging with the earlier 10 ms
    assert e.ewma == 0.500


def test_a_lower_sample_pulls_the_estimate_by_the_time_since_the_last_one() -> None:
    (e,) = endpoints(1)
    call_finished(e, 0.100, 100.0)
    call_finished(e, 0.020, 105.0)
    w = math.exp(-5.0 / EWMA_DECAY_SECONDS)
    assert e.ewma == pytest.approx(0.100 * w + 0.020 * (1 - w))
    # Right after a sample, another lower one barely moves the estimate.
    before = e.ewma
    call_finished(e, 0.001, 105.0)
    assert e.ewma == pytest.approx(before)


def test_an_idle_estimate_decays_toward_zero_when_read() -> None:
    (e,) = endpoints(1)
    call_finished(e, 1.0, 100.0)
    assert latency_estimate(e, 100.0) == 1.0
    assert latency_estimate(e, 110.0) == pytest.approx(math.exp(-1.0))
    assert latency_estimate(e, 200.0) < EWMA_DEFAULT_SECONDS
    assert e.ewma == 1.0  # reading does not write


def test_a_zero_latency_sample_still_counts_as_measured() -> None:
    (e,) = endpoints(1)
    call_finished(e, 0.0, 100.0)
    assert 0.0 < latency_estimate(e, 100.0) < EWMA_DEFAULT_SECONDS


def simulate(
    balancer: Balancer,
    pool: list[Endpoint],
    latency: dict[str, float],
    clock: FakeClock,
    picks: int,
    interval: float = 0.001,
) -> Counter[str]:
    """One request every ``interval``; each takes its endpoint's latency (calls overlap)."""
    due: list[tuple[float, int, Endpoint]] = []
    counts: Counter[str] = Counter()
    for n in range(picks):
        clock.now += interval
        while due and due[0][0] <= clock.now:
            at, _, done = heapq.heappop(due)
            call_finished(done, latency[done.id], at)
        chosen = balancer.pick(pool, None)
        counts[chosen.id] += 1
        call_started(chosen)
        heapq.heappush(due, (clock.now + latency[chosen.id], n, chosen))
    return counts


def test_p2c_ewma_keeps_traffic_away_from_a_slow_endpoint() -> None:
    clock = FakeClock()
    pool = endpoints(3)
    latency = {"i-0": 0.010, "i-1": 0.012, "i-2": 0.400}
    counts = simulate(EwmaBalancer(clock=clock, rng=random.Random(7)), pool, latency, clock, 10_000)
    assert counts["i-2"] < 1_000
    assert counts["i-0"] > 3_000
    assert counts["i-1"] > 3_000


def test_a_random_pick_would_not_keep_traffic_away_from_the_slow_one() -> None:
    # The control for the test above: the same simulation without a latency-aware choice.
    clock = FakeClock()
    pool = endpoints(3)
    latency = {"i-0": 0.010, "i-1": 0.012, "i-2": 0.400}
    counts = simulate(RandomBalancer(rng=random.Random(7)), pool, latency, clock, 10_000)
    assert counts["i-2"] > 3_000


def test_an_unmeasured_endpoint_gets_tried() -> None:
    clock = FakeClock()
    old_a, old_b, new = endpoints(3)
    call_finished(old_a, 0.100, clock.now)
    call_finished(old_b, 0.100, clock.now)
    balancer = EwmaBalancer(clock=clock, rng=random.Random(3))
    counts = Counter(balancer.pick([old_a, old_b, new], None).id for _ in range(3_000))
    # It wins every pair it is drawn into: two pairs in three.
    assert counts[new.id] == pytest.approx(2_000, rel=0.1)


def test_ewma_cost_weighs_calls_in_flight() -> None:
    clock = FakeClock()
    a, b = endpoints(2)
    call_finished(a, 0.010, clock.now)
    call_finished(b, 0.030, clock.now)
    balancer = EwmaBalancer(clock=clock, rng=random.Random(1))
    assert {balancer.pick([a, b], None) for _ in range(50)} == {a}
    for _ in range(3):  # 10 ms * 4 > 30 ms * 1
        call_started(a)
    assert {balancer.pick([a, b], None) for _ in range(50)} == {b}


@pytest.mark.parametrize("kind", ["ewma", "least_request"])
def test_p2c_draws_two_distinct_candidates(kind: str) -> None:
    # With two candidates, drawing the same one twice would let the worse one win half the time.
    clock = FakeClock()
    a, b = endpoints(2)
    call_finished(a, 1.0, clock.now)
    a.in_flight = 10
    balancer: Balancer
    if kind == "ewma":
        balancer = EwmaBalancer(clock=clock, rng=random.Random(5))
    else:
        balancer = LeastRequestBalancer(rng=random.Random(5))
    assert {balancer.pick([a, b], None) for _ in range(200)} == {b}


def test_least_request_prefers_fewer_calls_in_flight() -> None:
    pool = endpoints(3)
    pool[0].in_flight = 4
    pool[1].in_flight = 0
    pool[2].in_flight = 4
    balancer = LeastRequestBalancer(rng=random.Random(11))
    counts = Counter(balancer.pick(pool, None).id for _ in range(3_000))
    assert counts["i-1"] == pytest.approx(2_000, rel=0.1)


def test_single_candidate_is_returned() -> None:
    (only,) = endpoints(1)
    for balancer in (EwmaBalancer(), LeastRequestBalancer(), RoundRobinBalancer()):
        assert balancer.pick([only], None) is only


def test_round_robin_visits_all_evenly_and_in_turn() -> None:
    pool = endpoints(3)
    balancer = RoundRobinBalancer()
    order = [balancer.pick(pool, None).id for _ in range(3_000)]
    assert order[:4] == ["i-0", "i-1", "i-2", "i-0"]
    assert Counter(order) == {"i-0": 1_000, "i-1": 1_000, "i-2": 1_000}


def test_random_is_roughly_uniform() -> None:
    pool = endpoints(5)
    balancer = RandomBalancer(rng=random.Random(2024))
    picks = 50_000
    counts = Counter(balancer.pick(pool, None).id for _ in range(picks))
    expected = picks / len(pool)
    chi_square = sum((counts[e.id] - expected) ** 2 / expected for e in pool)
    assert chi_square < 18.5  # 4 degrees of freedom: p < 0.001 by chance


def test_balancer_for_each_policy_setting() -> None:
    assert type(balancer_for("ewma")) is EwmaBalancer
    assert type(balancer_for("least_request")) is LeastRequestBalancer
    assert type(balancer_for("round_robin")) is RoundRobinBalancer
    assert type(balancer_for("random")) is RandomBalancer
    spec = ConsistentHashBalancer(consistent_hash=ConsistentHash(header="X-User"))
    hashing = balancer_for(spec)
    assert type(hashing) is RingHashBalancer
    assert hashing.needs_key
    assert hashing.key_of({"x-user": "bob"}) == "bob"
    for name in ("ewma", "least_request", "round_robin", "random"):
        plain = balancer_for(name)
        assert not plain.needs_key
        assert plain.key_of({"x-user": "bob"}) is None
    with pytest.raises(ValueError, match="unknown load balancer"):
        balancer_for("fastest")  # type: ignore[arg-type]
