"""The retry policy: conditions, methods, backoff and Retry-After."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh_middleware.policy import schema
from mesh_middleware.resilience.retry_policy import (
    Failure,
    RetryPolicy,
    backoff,
    parse_retry_after,
)

IDEMPOTENT = ["GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"]
OTHERS = ["POST", "PATCH", "CONNECT", "PROPFIND"]
NOT_CONNECT = [None, Failure.RESET, Failure.REFUSED_STREAM, Failure.TIMEOUT]


def policy(**fields: Any) -> RetryPolicy:
    return RetryPolicy(schema.Retries.model_validate(fields))


# --- conditions -------------------------------------------------------------------------------


def test_defaults_retry_transport_failures_and_no_status() -> None:
    p = policy()
    assert p.attempts == 2
    assert p.per_try_timeout is None
    assert p.retry_failure(Failure.CONNECT_FAILURE)
    assert p.retry_failure(Failure.RESET)
    assert p.retry_failure(Failure.REFUSED_STREAM)
    assert not p.retry_failure(Failure.TIMEOUT)
    for status in (500, 502, 503, 504, 409, 429):
        assert not p.retry_status(status), status


def test_gateway_error_is_502_503_504() -> None:
    p = policy(on=["gateway-error"])
    assert [s for s in range(100, 600) if p.retry_status(s)] == [502, 503, 504]
    assert not p.retry_failure(Failure.CONNECT_FAILURE)


def test_retriable_4xx_is_409() -> None:
    p = policy(on=["retriable-4xx"])
    assert [s for s in range(100, 600) if p.retry_status(s)] == [409]


def test_numeric_codes_as_listed_in_either_spelling() -> None:
    p = policy(on=["503", 429, "reset"])
    assert [s for s in range(100, 600) if p.retry_status(s)] == [429, 503]
    assert p.retry_failure(Failure.RESET)
    assert not p.retry_failure(Failure.CONNECT_FAILURE)
    assert not p.retry_failure(Failure.REFUSED_STREAM)


@pytest.mark.parametrize(
    "failure", [Failure.CONNECT_FAILURE, Failure.RESET, Failure.REFUSED_STREAM]
)
def test_each_failure_only_when_listed(failure: Failure) -> None:
    p = policy(on=[failure.value])
    assert {f for f in Failure if p.retry_failure(f)} == {failure}


def test_per_try_timeout_makes_timeouts_retriable() -> None:
    p = policy(per_try_timeout="200ms", attempts=3)
    assert p.per_try_timeout == pytest.approx(0.2)
    assert p.attempts == 3
    assert p.retry_failure(Failure.TIMEOUT)


def test_nothing_listed_retries_nothing() -> None:
    p = policy(on=[])
    assert not any(p.retry_failure(f) for f in Failure)
    assert not any(p.retry_status(s) for s in range(100, 600))


# --- methods ----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", IDEMPOTENT)
@pytest.mark.parametrize("failure", [*Failure, None])
def test_idempotent_methods_always(method: str, failure: Failure | None) -> None:
    assert policy().method_allows(method, {}, False, failure)


@pytest.mark.parametrize("method", OTHERS)
@pytest.mark.parametrize("failure", NOT_CONNECT)
def test_other_methods_not_by_default(method: str, failure: Failure | None) -> None:
    assert not policy().method_allows(method, {}, False, failure)


@pytest.mark.parametrize("method", OTHERS)
def test_connect_failure_is_retriable_for_every_method(method: str) -> None:
    assert policy().method_allows(method, {}, False, Failure.CONNECT_FAILURE)


@pytest.mark.parametrize(
    "headers",
    [
        {"idempotency-key": "k-1"},
        {"Idempotency-Key": "k-1"},
        {"IDEMPOTENCY-KEY": "k-1", "x-other": "1"},
    ],
)
@pytest.mark.parametrize("failure", NOT_CONNECT)
def test_idempotency_key_allows_post(headers: dict[str, str], failure: Failure | None) -> None:
    assert policy().method_allows("POST", headers, False, failure)


def test_idempotency_key_in_client_header_mappings() -> None:
    httpx = pytest.importorskip("httpx")
    structures = pytest.importorskip("requests.structures")
    p = policy()
    assert p.method_allows("POST", httpx.Headers({"Idempotency-Key": "k"}), False, None)
    assert p.method_allows(
        "PATCH", structures.CaseInsensitiveDict({"Idempotency-Key": "k"}), False, None
    )
    assert not p.method_allows("POST", httpx.Headers({"X-Key": "k"}), False, None)


def test_empty_idempotency_key_does_not_count() -> None:
    assert not policy().method_allows("POST", {"idempotency-key": ""}, False, Failure.RESET)


def test_route_opt_in_allows_post() -> None:
    assert policy().method_allows("POST", {}, True, Failure.RESET)


def test_idempotent_only_false_allows_every_method() -> None:
    p = policy(idempotent_only=False)
    assert all(p.method_allows(m, {}, False, Failure.RESET) for m in OTHERS)


# --- backoff ----------------------------------------------------------------------------------


def test_backoff_doubles_to_the_cap() -> None:
    top = math.nextafter(1.0, 0.0)
    assert backoff(0, lambda: 0.0) == 0.0
    assert backoff(0, lambda: 0.5) == pytest.approx(0.0125)
    assert backoff(1, lambda: 0.5) == pytest.approx(0.025)
    assert backoff(3, lambda: 0.5) == pytest.approx(0.1)
    assert backoff(4, lambda: 0.5) == pytest.approx(0.125)  # 0.4 capped at 0.25
    assert backoff(10**6, lambda: 0.5) == pytest.approx(0.125)
    assert backoff(0, lambda: top) < 0.025
    assert backoff(-3, lambda: 0.5) == pytest.approx(0.0125)


@given(
    retry=st.integers(min_value=-10, max_value=10**9),
    rand=st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
)
def test_backoff_is_within_full_jitter_bounds(retry: int, rand: float) -> None:
    ceiling = min(0.25, 0.025 * 2 ** min(max(retry, 0), 10))
    wait = backoff(retry, lambda: rand)
    assert 0.0 <= wait < ceiling or wait == ceiling == 0.0
    assert wait == pytest.approx(rand * ceiling)


# --- Retry-After ------------------------------------------------------------------------------

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("120", 120.0), ("0", 0.0), (" 7 ", 7.0), ("0030", 30.0), ("9" * 5000, math.inf)],
)
def test_retry_after_delta_seconds(value: str, seconds: float) -> None:
    assert parse_retry_after(value, NOW) == seconds


@pytest.mark.parametrize(
    "value", [None, "", "  ", "soon", "-5", "1.5", "+3", "1e3", "\u0661\u0662", "12 s"]
)
def test_retry_after_absent_or_unparsable_is_none(value: str | None) -> None:
    assert parse_retry_after(value, NOW) is None


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("Sun, 01 Mar 2026 12:00:30 GMT", 30.0),  # IMF-fixdate
        ("Sunday, 01-Mar-26 12:01:00 GMT", 60.0),  # obsolete RFC 850
        ("Sun Mar  1 12:00:05 2026", 5.0),  # obsolete asctime, no zone: GMT
        ("Sun, 01 Mar 2026 12:00:00 GMT", 0.0),
    ],
)
def test_retry_after_http_dates(value: str, seconds: float) -> None:
    assert parse_retry_after(value, NOW) == pytest.approx(seconds)


def test_retry_after_date_in_the_past_is_none() -> None:
    assert parse_retry_after("Sun, 01 Mar 2026 11:59:59 GMT", NOW) is None


def test_retry_after_defaults_to_the_wall_clock() -> None:
    later = datetime.now(UTC) + timedelta(hours=1)
    wait = parse_retry_after(format_datetime(later, usegmt=True))
    assert wait is not None
    assert 3590 < wait <= 3600


@given(st.text(max_size=60))
def test_retry_after_never_raises(value: str) -> None:
    wait = parse_retry_after(value, NOW)
    assert wait is None or wait >= 0


@given(st.integers(min_value=0, max_value=10**12))
def test_retry_after_seconds_round_trip(n: int) -> None:
    assert parse_retry_after(str(n), NOW) == float(n)


@given(st.integers(min_value=0, max_value=10 * 365 * 86400))
def test_retry_after_dates_round_trip(offset: int) -> None:
    when = datetime.fromtimestamp(NOW + offset, UTC)
    assert parse_retry_after(format_datetime(when, usegmt=True), NOW) == pytest.approx(offset)
