"""Deadlines and trace parents carried from inbound requests to outbound calls."""

from __future__ import annotations

import re
import time

from hypothesis import given
from hypothesis import strategies as st

from mesh_middleware.runtime.context import (
    Deadline,
    deadline_from_header,
    new_traceparent,
    parse_traceparent,
)

_TRACEPARENT = re.compile(r"^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")


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
    assert deadline.header_value() == "0"


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


def test_a_valid_traceparent_gives_its_trace_and_flags() -> None:
    header = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert parse_traceparent(header) == ("4bf92f3577b34da6a3ce929d0e0e4736", "01")
    assert parse_traceparent(header.encode()) == ("4bf92f3577b34da6a3ce929d0e0e4736", "01")


def test_invalid_traceparents_are_refused() -> None:
    for header in (
        None,
        "",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",  # no flags
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # zero trace
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # zero span
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # forbidden version
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",  # upper case
    ):
        assert parse_traceparent(header) is None, header


def test_a_child_keeps_the_trace_and_flags_with_a_new_span() -> None:
    parent = ("4bf92f3577b34da6a3ce929d0e0e4736", "00")
    child = new_traceparent(parent)
    assert _TRACEPARENT.match(child)
    assert child.startswith("00-4bf92f3577b34da6a3ce929d0e0e4736-") and child.endswith("-00")
    assert new_traceparent(parent) != child


def test_a_new_trace_is_sampled_and_valid() -> None:
    header = new_traceparent()
    assert _TRACEPARENT.match(header) and header.endswith("-01")
    assert parse_traceparent(header) is not None


@given(st.text(max_size=80))
def test_traceparent_parsing_never_raises(value: str) -> None:
    parsed = parse_traceparent(value)
    assert parsed is None or (len(parsed[0]) == 32 and len(parsed[1]) == 2)
