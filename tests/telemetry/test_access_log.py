"""Access log lines: format, independence from the app's structlog setup, and sampling."""

from __future__ import annotations

import inspect
import io
import json
import math
import random
import threading
import time
from typing import Any

import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st

from mesh_middleware.telemetry import access_log
from mesh_middleware.telemetry.access_log import (
    FIELDS,
    MAX_BUFFERED_LINES,
    AccessLog,
    flush_access_logs,
    render_json_line,
    sampled,
)
from mesh_middleware.telemetry.log_context import bind, unbind

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def request(**changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "direction": "inbound",
        "method": "GET",
        "path": "/items/1",
        "route": "/items/{id}",
        "status": 200,
        "flags": "-",
        "duration_ms": 1.23456,
        "request_bytes": 0,
        "response_bytes": 512,
        "caller": "orders",
        "destination": "inventory",
    }
    fields.update(changes)
    return fields


_ENTRY_ORDER = tuple(inspect.signature(AccessLog.entry).parameters)[1:]
"""`AccessLog.entry`'s parameters, in order."""


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_one_json_line_with_every_field_in_order() -> None:
    out = io.StringIO()
    written = AccessLog(1.0, stream=out).log(
        **request(path="/items/1?secret=x", upstream="10.0.0.5:8001", request_id="r-1"),
        trace_id=TRACE,
        span_id="00f067aa0ba902b7",
    )
    assert written
    assert out.getvalue().count("\n") == 1
    (line,) = lines(out)
    assert list(line) == list(FIELDS)
    assert line["ts"].endswith("Z") and len(line["ts"]) == len("2025-01-01T00:00:00.000Z")
    assert line | {"ts": None} == {
        "ts": None,
        "level": "info",
        "logger": "mesh.access",
        "event": "access",
        "direction": "inbound",
        "method": "GET",
        "path": "/items/1",  # the query never reaches the log
        "route": "/items/{id}",
        "status": 200,
        "flags": "-",
        "duration_ms": 1.235,
        "request_bytes": 0,
        "response_bytes": 512,
        "caller": "orders",
        "destination": "inventory",
        "upstream": "10.0.0.5:8001",
        "trace_id": TRACE,
        "span_id": "00f067aa0ba902b7",
        "request_id": "r-1",
    }


def test_missing_values_are_null_and_extras_follow() -> None:
    out = io.StringIO()
    AccessLog(stream=out).log(**request(caller=None, route=None), user_agent='curl "8"\n\u00e9')
    (line,) = lines(out)
    assert line["caller"] is None and line["route"] is None and line["trace_id"] is None
    assert list(line)[-1] == "user_agent" and line["user_agent"] == 'curl "8"\n\u00e9'
    assert out.getvalue().isascii()


def test_the_line_is_json_whatever_the_app_configured_for_structlog() -> None:
    structlog.configure(
        processors=[structlog.dev.ConsoleRenderer(colors=False)],
        logger_factory=structlog.ReturnLoggerFactory(),
    )
    try:
        out = io.StringIO()
        AccessLog(stream=out).log(**request())
        assert lines(out)[0]["event"] == "access"
    finally:
        structlog.reset_defaults()


def test_a_logger_of_your_own_gets_the_fields() -> None:
    with structlog.testing.capture_logs() as logs:
        assert AccessLog(logger=structlog.get_logger("mine")).log(**request(), trace_id=TRACE)
    (entry,) = logs
    assert entry["event"] == "access" and entry["trace_id"] == TRACE
    assert entry["duration_ms"] == 1.235


def test_ids_come_from_the_log_context_when_not_given() -> None:
    out = io.StringIO()
    token = bind(TRACE, "00f067aa0ba902b7")
    try:
        AccessLog(stream=out).log(**request())
    finally:
        unbind(token)
    AccessLog(stream=out).log(**request())
    first, second = lines(out)
    assert (first["trace_id"], first["span_id"]) == (TRACE, "00f067aa0ba902b7")
    assert second["trace_id"] is None


def test_sampling_by_trace_id_is_the_otel_ratio_rule() -> None:
    """Kept exactly when the lower 64 bits are below sample * 2**64: every service (and an
    OpenTelemetry TraceIdRatioBased sampler at the same ratio) decides alike."""
    assert sampled(0.5, "f" * 16 + "0" * 15 + "1")
    assert not sampled(0.5, "0" * 16 + "8" + "0" * 15)
    assert sampled(0.5, "0" * 16 + "7" + "f" * 15)
    rng = random.Random(3)
    ids = [f"{rng.getrandbits(128):032x}" for _ in range(4000)]
    first = [sampled(0.3, i) for i in ids]
    assert first == [sampled(0.3, i) for i in ids]
    assert 0.26 < sum(first) / len(ids) < 0.34
    assert all(sampled(1.0, i) for i in ids) and not any(sampled(0.0, i) for i in ids)
    assert isinstance(sampled(0.5, "not-hex-at-all"), bool)  # any string still decides


def test_a_traces_lines_are_kept_or_dropped_together() -> None:
    inbound, outbound = io.StringIO(), io.StringIO()
    a, b = AccessLog(0.2, stream=inbound), AccessLog(0.2, stream=outbound)
    rng = random.Random(5)
    for _ in range(500):
        trace = f"{rng.getrandbits(128):032x}"
        assert a.log(**request(), trace_id=trace) == b.log(
            **request(direction="outbound"), trace_id=trace
        )
    assert [x["trace_id"] for x in lines(inbound)] == [x["trace_id"] for x in lines(outbound)]


def test_errors_and_flagged_requests_are_always_logged() -> None:
    out = io.StringIO()
    log = AccessLog(0.0, stream=out)
    assert not log.log(**request(), trace_id=TRACE)
    assert not log.log(**request(status=404))
    assert log.log(**request(status=503), trace_id=TRACE)
    assert log.log(**request(status=403, flags="DENIED"))
    assert log.log(**request(status=200, flags="RETRIED"))
    assert [x["status"] for x in lines(out)] == [503, 403, 200]


def test_without_a_trace_the_choice_is_random() -> None:
    random.seed(11)
    log = AccessLog(0.5, stream=io.StringIO())
    kept = sum(log.log(**request()) for _ in range(2000))
    assert 850 < kept < 1150


@pytest.mark.parametrize("sample", [-0.1, 1.5, math.nan])
def test_sample_must_be_a_fraction(sample: float) -> None:
    with pytest.raises(ValueError, match="sample"):
        AccessLog(sample)


def test_lines_from_many_threads_never_interleave() -> None:
    out = io.StringIO()
    log = AccessLog(stream=out)

    def work(n: int) -> None:
        for i in range(500):
            log.log(**request(path=f"/t{n}/{i}" + "x" * 200))

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(lines(out)) == 4000


_json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)


@given(st.dictionaries(st.text(), _json_scalars | st.lists(_json_scalars, max_size=3)))
def test_the_renderer_agrees_with_the_json_module(event: dict[str, Any]) -> None:
    line = render_json_line(None, "info", event)
    assert "\n" not in line and line.isascii()
    assert json.loads(line) == event


def test_the_renderer_survives_odd_values() -> None:
    line = json.loads(
        render_json_line(None, "info", {"inf": math.inf, "nan": math.nan, "obj": object, "b": b"x"})
    )
    assert line["inf"] is None and line["nan"] is None
    assert "class" in line["obj"] and line["b"] == "b'x'"


def test_buffered_lines_wait_for_the_flush_interval() -> None:
    out = io.StringIO()
    log = AccessLog(stream=out, flush_interval=0.3)
    started = time.monotonic()
    for path in ("/a", "/b"):
        assert log.log(**request(path=path))
    assert out.getvalue() == ""  # one write for both, later
    while out.getvalue() == "" and time.monotonic() - started < 5:
        time.sleep(0.01)
    assert time.monotonic() - started >= 0.25
    assert [line["path"] for line in lines(out)] == ["/a", "/b"]


def test_a_full_buffer_is_written_at_once_and_exit_writes_the_rest() -> None:
    out = io.StringIO()
    log = AccessLog(stream=out, flush_interval=60)
    for number in range(MAX_BUFFERED_LINES + 3):
        log.log(**request(path=f"/{number}"))
    assert len(lines(out)) == MAX_BUFFERED_LINES
    flush_access_logs()  # what the Mesh's close and the exit hook do
    assert [line["path"] for line in lines(out)] == [f"/{n}" for n in range(MAX_BUFFERED_LINES + 3)]


def test_buffered_lines_from_many_threads_are_all_written_whole() -> None:
    out = io.StringIO()
    log = AccessLog(stream=out, flush_interval=0.05)

    def write(thread: int) -> None:
        for number in range(300):
            log.log(**request(path=f"/{thread}/{number}"))

    threads = [threading.Thread(target=write, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    flush_access_logs()
    assert sorted(line["path"] for line in lines(out)) == sorted(
        f"/{t}/{n}" for t in range(4) for n in range(300)
    )


_names = st.text(max_size=12)


@given(
    st.sampled_from(["inbound", "outbound"]),
    _names,
    st.text(max_size=30),
    st.none() | _names,
    st.integers(0, 599),
    st.sampled_from(["-", "DENIED", "FAULT_ABORT,RETRIED"]),
    st.floats(0, 1e6),
    st.integers(0, 10**9),
    st.none() | _names,
    st.none() | _names,
    st.none() | _names,
    st.none() | st.text(max_size=20),
)
def test_the_mesh_entry_writes_what_log_writes(
    direction: str,
    method: str,
    path: str,
    route: str | None,
    status: int,
    flags: str,
    duration_ms: float,
    size: int,
    caller: str | None,
    destination: str | None,
    upstream: str | None,
    request_id: str | None,
) -> None:
    """`entry` (positional, hex ids unescaped, names' JSON remembered) and `log` agree."""
    by_entry, by_log = io.StringIO(), io.StringIO()
    span = "00f067aa0ba902b7"
    common = (direction, method, path, route, status, flags, duration_ms, size, size + 1)
    names = (caller, destination, upstream)
    for _ in range(2):  # the second time from the remembered JSON
        AccessLog(stream=by_entry).entry(*common, *names, TRACE, span, request_id)
    AccessLog(stream=by_log).log(
        **dict(zip(_ENTRY_ORDER[:9], common, strict=True)),
        caller=caller,
        destination=destination,
        upstream=upstream,
        trace_id=TRACE,
        span_id=span,
        request_id=request_id,
    )
    first, second = lines(by_entry)
    (expected,) = lines(by_log)
    assert first | {"ts": None} == second | {"ts": None} == expected | {"ts": None}
    assert by_entry.getvalue().isascii()


def test_the_entry_writes_a_request_id_that_is_not_the_trace_id_escaped() -> None:
    out = io.StringIO()
    log = AccessLog(stream=out)
    log.entry(*request().values(), None, TRACE, "00f067aa0ba902b7", 'r-"1"\n')
    log.entry(*request().values(), None, None, None, None)
    with_id, without = lines(out)
    assert with_id["request_id"] == 'r-"1"\n' and with_id["trace_id"] == TRACE
    assert without["trace_id"] is None and without["span_id"] is None
    assert without["request_id"] is None


def test_the_remembered_json_of_edges_and_outcomes_is_bounded() -> None:
    out = io.StringIO()
    log = AccessLog(stream=out)
    for number in range(access_log._MAX_KNOWN_PARTS + 50):
        log.entry(*request(caller=f"caller-{number}").values(), None, None, None, None)
    assert len(access_log._KNOWN_PARTS) <= access_log._MAX_KNOWN_PARTS
    assert lines(out)[-1]["caller"] == f"caller-{access_log._MAX_KNOWN_PARTS + 49}"


def test_the_entry_goes_through_a_logger_of_your_own() -> None:
    seen: list[dict[str, Any]] = []

    class Collect:
        def info(self, event: str, **fields: Any) -> None:
            seen.append({"event": event, **fields})

    AccessLog(logger=Collect()).entry(
        *request().values(), "10.0.0.5:8001", TRACE, "00f067aa0ba902b7", None
    )
    (fields,) = seen
    assert fields["upstream"] == "10.0.0.5:8001" and fields["trace_id"] == TRACE
    assert fields["span_id"] == "00f067aa0ba902b7" and fields["request_id"] is None


def test_the_timestamp_follows_the_clock_across_milliseconds_and_seconds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = access_log._Clock()
    base = 1_767_225_599_998  # 2025-12-31T23:59:59.998Z, in milliseconds
    stamps = {}
    for millis in (base, base, base + 1, base + 2, base + 2, base + 1003):
        monkeypatch.setattr(time, "time_ns", lambda m=millis: m * 1_000_000 + 123_456)
        stamps[millis] = clock.now()
    assert stamps == {
        base: "2025-12-31T23:59:59.998Z",
        base + 1: "2025-12-31T23:59:59.999Z",
        base + 2: "2026-01-01T00:00:00.000Z",
        base + 1003: "2026-01-01T00:00:01.001Z",
    }
