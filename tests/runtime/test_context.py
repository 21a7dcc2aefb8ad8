"""Deadlines carried from inbound requests to outbound calls (trace context: tests/telemetry)."""

from __future__ import annotations

import time

from hypothesis import given
from hypothesis import strategies as st

from mesh_middleware.runtime.context import Deadline, deadline_from_header


def test_a_deadline_header_is_milliseconds_left() -> None:
    before = time.monotonic()
    deadline = deadline_from_header("1500")
    assert deadline is not None
    assert before + 1.5 <= deadline.at <= time.monotonic() + 1.5
    assert 1.4 < deadline.remaining() <= 1.5
    assert not deadline.expired


def test_zero_milliseconds_left_is_expired() -> None:
    deadline = deadline_from_header(b"0")
    assert deadline is not None and deadline.expired and deadline.remaining() == 0.0


def test_malformed_deadlines_are_ignored() -> None:
    for value in (None, "", "-5", "1.5", "abc", "1e3", "9" * 13, "  "):
        assert deadline_from_header(value) is None, value


def test_a_huge_deadline_is_capped_at_a_day() -> None:
    deadline = deadline_from_header("999999999999")
    assert deadline is not None and deadline.remaining() <= 24 * 3600


@given(st.text(max_size=40) | st.binary(max_size=40))
def test_deadline_parsing_never_raises(value: str | bytes) -> None:
    result = deadline_from_header(value)
    assert result is None or isinstance(result, Deadline)
