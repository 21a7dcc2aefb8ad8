"""The retry budget: retries <= ratio * requests + min_per_second * window, per window."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh_middleware.resilience.budget import RetryBudget


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def worst_window(
    requests: Counter[int], retries: Counter[int], window: int, ratio: float, reserve: float
) -> float:
    """The largest overshoot of retries over the bound, across every run of ``window`` seconds."""
    seconds = set(requests) | set(retries)
    worst = -float("inf")
    for end in range(min(seconds), max(seconds) + 1):
        span = range(end - window + 1, end + 1)
        req = sum(requests[s] for s in span)
        ret = sum(retries[s] for s in span)
        worst = max(worst, ret - (ratio * req + reserve))
    return worst


@pytest.mark.parametrize("rate", [5, 100, 1000])
def test_total_outage_keeps_retries_within_the_budget_in_every_window(rate: int) -> None:
    clock = FakeClock(0.0)
    budget = RetryBudget(0.2, 10, window=10, clock=clock)
    requests: Counter[int] = Counter()
    retries: Counter[int] = Counter()
    seconds = 35
    for i in range(rate * seconds):
        clock.now = i / rate
        budget.deposit()
        requests[int(clock.now)] += 1
        for _ in range(2):  # every try fails; attempts = 2
            if budget.withdraw():
                retries[int(clock.now)] += 1
    assert worst_window(requests, retries, 10, 0.2, 100) <= 1e-9
    # and the budget is spent, not hoarded: the first window gets all of it
    first = sum(retries[s] for s in range(10))
    assert first == min(2 * rate * 10, int(0.2 * rate * 10 + 100))


def test_reserve_allows_retries_at_low_traffic() -> None:
    clock = FakeClock()
    budget = RetryBudget(0.2, 10, window=10, clock=clock)
    assert sum(budget.withdraw() for _ in range(150)) == 100
    assert budget.retries == 100
    assert budget.requests == 0


def test_ratio_adds_retries_per_request() -> None:
    clock = FakeClock()
    budget = RetryBudget(0.2, 0, window=10, clock=clock)
    assert not budget.withdraw()
    for _ in range(15):
        budget.deposit()
    assert sum(budget.withdraw() for _ in range(10)) == 3


def test_no_ratio_and_no_reserve_never_retries() -> None:
    budget = RetryBudget(0, 0, clock=FakeClock())
    for _ in range(100):
        budget.deposit()
    assert not budget.withdraw()


def test_refused_withdrawal_changes_nothing() -> None:
    budget = RetryBudget(0.5, 0, window=10, clock=FakeClock())
    budget.deposit()
    budget.deposit()
    assert budget.withdraw()
    assert not budget.withdraw()
    assert (budget.requests, budget.retries) == (2, 1)
    budget.deposit()
    budget.deposit()
    assert budget.withdraw()


def test_old_buckets_expire_one_second_at_a_time() -> None:
    clock = FakeClock(100.0)
    budget = RetryBudget(0.2, 0, window=10, clock=clock)
    for _ in range(50):
        budget.deposit()  # second 100
    clock.now = 105.5
    for _ in range(20):
        budget.deposit()  # second 105
    assert sum(budget.withdraw() for _ in range(30)) == 14
    clock.now = 109.999
    assert (budget.requests, budget.retries) == (70, 14)
    clock.now = 110.0  # second 100 leaves the window
    assert (budget.requests, budget.retries) == (20, 14)
    assert not budget.withdraw()  # 14 retries already exceed 0.2 * 20
    clock.now = 115.0  # second 105 leaves too
    assert (budget.requests, budget.retries) == (0, 0)


def test_a_long_pause_empties_the_window() -> None:
    clock = FakeClock(0.0)
    budget = RetryBudget(0.2, 1, window=10, clock=clock)
    for _ in range(1000):
        budget.deposit()
    assert sum(budget.withdraw() for _ in range(500)) == 210
    clock.now = 1e6
    assert (budget.requests, budget.retries) == (0, 0)
    assert sum(budget.withdraw() for _ in range(50)) == 10


def test_a_clock_stepping_back_keeps_counting() -> None:
    clock = FakeClock(50.0)
    budget = RetryBudget(1.0, 0, window=10, clock=clock)
    budget.deposit()
    clock.now = 40.0
    budget.deposit()
    assert budget.requests == 2
    assert budget.withdraw()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"ratio": -0.1, "min_per_second": 10},
        {"ratio": float("nan"), "min_per_second": 10},
        {"ratio": 0.2, "min_per_second": -1},
        {"ratio": 0.2, "min_per_second": float("inf")},
        {"ratio": 0.2, "min_per_second": 10, "window": 0},
        {"ratio": 0.2, "min_per_second": 10, "window": 2.5},
        {"ratio": 0.2, "min_per_second": 10, "window": 1e9},
    ],
)
def test_invalid_settings_are_rejected(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=r"retry budget|min_per_second"):
        RetryBudget(**kwargs)


# --- against a reference model ----------------------------------------------------------------

_OPS = st.lists(
    st.one_of(
        st.just(("deposit", 0.0)),
        st.just(("withdraw", 0.0)),
        st.tuples(st.just("tick"), st.floats(min_value=0.0, max_value=4.0)),
    ),
    max_size=300,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=_OPS,
    ratio=st.sampled_from([0.0, 0.1, 0.2, 0.5, 1.0]),
    min_per_second=st.sampled_from([0.0, 0.1, 1.0]),
    window=st.integers(min_value=1, max_value=5),
)
def test_matches_a_reference_model_of_the_last_window_seconds(
    ops: list[tuple[str, float]], ratio: float, min_per_second: float, window: int
) -> None:
    clock = FakeClock(0.0)
    budget = RetryBudget(ratio, min_per_second, window=window, clock=clock)
    events: list[tuple[int, str]] = []

    def in_window(kind: str) -> Iterator[int]:
        now = int(clock.now)
        return (1 for second, k in events if k == kind and now - window < second <= now)

    for op, dt in ops:
        if op == "tick":
            clock.now += dt
        elif op == "deposit":
            budget.deposit()
            events.append((int(clock.now), "request"))
        else:
            requests = sum(in_window("request"))
            retries = sum(in_window("retry"))
            expected = retries + 1 <= ratio * requests + min_per_second * window + 1e-9
            assert budget.withdraw() is expected
            if expected:
                events.append((int(clock.now), "retry"))
        assert budget.requests == sum(in_window("request"))
        assert budget.retries == sum(in_window("retry"))
