"""Outlier detection: ejection, growing ejection times, the ejection cap, probation, panic."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from structlog.testing import capture_logs

from mesh_middleware.defaults import MAX_EJECTION_SECONDS
from mesh_middleware.discovery.endpoints import Endpoint
from mesh_middleware.policy.schema import OutlierDetection
from mesh_middleware.resilience.outlier import OutlierDetector


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def endpoints(n: int) -> list[Endpoint]:
    return [Endpoint(f"i-{k}", "http", f"10.0.0.{k}", 8080) for k in range(n)]


def detector(
    clock: FakeClock,
    *,
    failures: int = 5,
    base: float = 30.0,
    percent: float = 50,
) -> OutlierDetector:
    settings = OutlierDetection(
        consecutive_failures=failures,
        base_ejection=f"{base:g}s",  # type: ignore[arg-type]
        max_ejection_percent=percent,
    )
    return OutlierDetector(settings, clock=clock)


class Untouchable(tuple[Endpoint, ...]):
    """A candidate tuple that fails the test if anyone looks inside (the fast path must not)."""

    __slots__ = ()

    def __iter__(self) -> Iterator[Endpoint]:
        raise AssertionError("the fast path iterated the endpoints")

    def __len__(self) -> int:
        raise AssertionError("the fast path measured the endpoints")


def fail(d: OutlierDetector, e: Endpoint, now: float, pool: list[Endpoint], times: int) -> bool:
    return any([d.failure(e, now, pool) for _ in range(times)])


def probe(d: OutlierDetector, e: Endpoint, pool: list[Endpoint], now: float) -> None:
    """Route one call to ``e`` the way the engine does, asserting it is offered."""
    usable, panic = d.available(pool, now)
    assert e in usable
    assert not panic
    assert d.picked(e)


def test_fast_path_returns_the_same_object() -> None:
    clock = FakeClock()
    d = detector(clock)
    pool = Untouchable(endpoints(3))
    usable, panic = d.available(pool, clock.now)
    assert usable is pool
    assert not panic
    assert d.ejected_count == 0
    with pytest.raises(AssertionError, match="iterated"):
        list(pool)  # the guard works: a slow path would have failed the test


def test_ejection_after_consecutive_failures() -> None:
    clock = FakeClock()
    d = detector(clock)
    pool = endpoints(4)
    bad = pool[0]
    assert not fail(d, bad, clock.now, pool, 4)
    assert d.available(pool, clock.now)[0] is pool
    with capture_logs() as logs:
        assert d.failure(bad, clock.now, pool)
    assert logs == [
        {
            "event": "endpoint_ejected",
            "service": "",
            "endpoint": "i-0",
            "seconds": 30.0,
            "count": 1,
            "log_level": "warning",
        }
    ]
    usable, panic = d.available(pool, clock.now)
    assert list(usable) == pool[1:]
    assert not panic
    assert d.ejected_count == 1
    assert bad.ejected_until == clock.now + 30.0


def test_a_success_in_between_resets_the_streak() -> None:
    clock = FakeClock()
    d = detector(clock)
    pool = endpoints(4)
    bad = pool[0]
    assert not fail(d, bad, clock.now, pool, 4)
    d.success(bad, clock.now)
    assert bad.consecutive_failures == 0
    assert not fail(d, bad, clock.now, pool, 4)
    assert d.ejected_count == 0
    assert d.failure(bad, clock.now, pool)  # the fifth in a row


def test_failures_while_ejected_do_not_extend_the_ejection() -> None:
    clock = FakeClock()
    d = detector(clock, failures=1)
    pool = endpoints(2)
    assert d.failure(pool[0], clock.now, pool)
    until = pool[0].ejected_until
    clock.now += 5
    assert not fail(d, pool[0], clock.now, pool, 3)  # tries sent before the ejection
    assert pool[0].ejected_until == until
    assert pool[0].ejections == 1


def test_probation_lets_exactly_one_probe_through_then_reinstates() -> None:
    clock = FakeClock()
    d = detector(clock, failures=1)
    pool = endpoints(3)
    bad = pool[0]
    assert d.failure(bad, clock.now, pool)
    clock.now += 29.9
    assert bad not in d.available(pool, clock.now)[0]
    clock.now += 0.2  # ejection over: on probation
    assert d.ejected_count == 0
    probe(d, bad, pool, clock.now)
    assert bad.probe_in_flight
    assert bad not in d.available(pool, clock.now)[0]  # the probe is taken
    assert not d.picked(bad)  # a second caller that saw it free loses the race
    d.success(bad, clock.now + 0.01)
    assert not bad.probing
    untouchable = Untouchable(pool)
    assert d.available(untouchable, clock.now)[0] is untouchable  # back on the fast path


def test_a_failed_probe_re_ejects_for_longer_and_the_time_caps() -> None:
    clock = FakeClock()
    d = detector(clock, failures=1, base=30.0, percent=100)
    pool = endpoints(2)
    bad = pool[0]
    assert d.failure(bad, clock.now, pool)
    durations = [bad.ejected_until - clock.now]
    for _ in range(11):
        clock.now = bad.ejected_until
        probe(d, bad, pool, clock.now)
        assert d.failure(bad, clock.now, pool)  # one failed probe is enough
        durations.append(bad.ejected_until - clock.now)
    assert durations == [30, 60, 90, 120, 150, 180, 210, 240, 270, 300, 300, 300]
    assert max(durations) == MAX_EJECTION_SECONDS
    assert bad.ejections == 12


def test_ejections_are_forgiven_after_staying_healthy_long_enough() -> None:
    clock = FakeClock()
    d = detector(clock, failures=1)
    pool = endpoints(2)
    bad = pool[0]
    assert d.failure(bad, clock.now, pool)
    clock.now = bad.ejected_until
    probe(d, bad, pool, clock.now)
    assert d.failure(bad, clock.now, pool)  # second ejection: 60 s
    clock.now = bad.ejected_until
    probe(d, bad, pool, clock.now)
    d.success(bad, clock.now)  # healthy again from here
    clock.now += 59.0  # healthy for less than 30 s * 2
    assert d.failure(bad, clock.now, pool)
    assert bad.ejected_until - clock.now == 90.0
    clock.now = bad.ejected_until
    probe(d, bad, pool, clock.now)
    d.success(bad, clock.now)
    clock.now += 90.0  # healthy for 30 s * 3: forgiven
    assert d.failure(bad, clock.now, pool)
    assert bad.ejections == 1
    assert bad.ejected_until - clock.now == 30.0


def test_max_ejection_percent_is_respected() -> None:
    clock = FakeClock()
    d = detector(clock, failures=1, percent=50)
    pool = endpoints(4)
    assert d.failure(pool[0], clock.now, pool)
    assert d.failure(pool[1], clock.now, pool)  # 2 of 4: 50%
    assert not d.failure(pool[2], clock.now, pool)  # 3 of 4 would be 75%
    assert d.ejected_count == 2
    assert [e.id for e in d.available(pool, clock.now)[0]] == ["i-2", "i-3"]
    clock.now += 30.0  # the first two are back on probation: room again
    assert d.failure(pool[2], clock.now, pool)


def test_one_ejection_is_always_allowed() -> None:
    clock = FakeClock()
    d = detector(clock, failures=1, percent=10)  # 10% of 2 is less than one instance
    pool = endpoints(2)
    assert d.failure(pool[0], clock.now, pool)
    assert not d.failure(pool[1], clock.now, pool)
    assert d.ejected_count == 1


def test_zero_percent_disables_ejection() -> None:
    clock = FakeClock()
    d = detector(clock, failures=1, percent=0)
    pool = endpoints(2)
    assert not d.failure(pool[0], clock.now, pool)
    assert d.available(pool, clock.now)[0] is pool


def test_panic_when_every_endpoint_is_ejected() -> None:
    clock = FakeClock()
    d = detector(clock, failures=1, percent=100)
    pool = endpoints(2)
    assert d.failure(pool[0], clock.now, pool)
    assert d.failure(pool[1], clock.now, pool)
    usable, panic = d.available(pool, clock.now)
    assert panic
    assert usable is pool
    # Panic routing to an ejected endpoint takes no probe and a success does not un-eject it.
    assert d.picked(pool[0])
    assert not pool[0].probe_in_flight
    d.success(pool[0], clock.now)
    assert d.ejected_count == 2


def test_a_probe_never_reported_is_given_up_after_the_base_ejection() -> None:
    clock = FakeClock()
    d = detector(clock, failures=1)
    pool = endpoints(2)
    bad = pool[0]
    assert d.failure(bad, clock.now, pool)
    clock.now = bad.ejected_until
    probe(d, bad, pool, clock.now)
    clock.now += 29.0
    assert bad not in d.available(pool, clock.now)[0]
    clock.now += 1.0
    probe(d, bad, pool, clock.now)


def test_an_endpoint_nobody_probes_is_eventually_released() -> None:
    # An endpoint that left the catalog while ejected must not keep the detector off its fast
    # path forever.
    clock = FakeClock()
    d = detector(clock, failures=1)
    pool = endpoints(3)
    gone = pool[0]
    assert d.failure(gone, clock.now, pool)
    rest = pool[1:]
    clock.now = gone.ejected_until + MAX_EJECTION_SECONDS - 1
    assert d.available(rest, clock.now)[0] is rest
    assert gone.probing
    clock.now += 2
    d.available(rest, clock.now)
    assert not gone.probing
    untouchable = Untouchable(rest)
    assert d.available(untouchable, clock.now)[0] is untouchable  # back on the fast path


def test_only_one_of_many_threads_takes_the_probe() -> None:
    clock = FakeClock()
    d = detector(clock, failures=1)
    pool = endpoints(2)
    bad = pool[0]
    assert d.failure(bad, clock.now, pool)
    clock.now = bad.ejected_until
    start = threading.Barrier(8)
    won: list[bool] = []

    def contend() -> None:
        start.wait()
        won.append(d.picked(bad))

    threads = [threading.Thread(target=contend) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(won) == [False] * 7 + [True]


@pytest.mark.parametrize("failures", [1, 3])
def test_threshold_is_the_setting(failures: int) -> None:
    clock = FakeClock()
    d = detector(clock, failures=failures)
    pool = endpoints(2)
    assert not fail(d, pool[0], clock.now, pool, failures - 1)
    assert d.failure(pool[0], clock.now, pool)
