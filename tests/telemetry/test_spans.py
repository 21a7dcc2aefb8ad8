"""Spans and their export: cheap without an exporter, never blocking or raising with one."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
from prometheus_client import REGISTRY

from mesh_middleware.telemetry import spans
from mesh_middleware.telemetry.spans import Span, start_span
from mesh_middleware.telemetry.tracecontext import SpanContext, child_of

PARENT = SpanContext("12345678901234567890123456789012", "1234567890123456", 1, "foo=1")


@pytest.fixture(autouse=True)
def no_exporter() -> Iterator[None]:
    spans.set_exporter(None)
    yield
    spans.set_exporter(None, timeout=1)


class Collect:
    """An exporter that records spans, optionally held up until released."""

    def __init__(self, *, blocked: bool = False) -> None:
        self.spans: list[Span] = []
        self.release = threading.Event()
        if not blocked:
            self.release.set()

    def __call__(self, span: Span) -> None:
        self.release.wait(10)
        self.spans.append(span)


def test_a_server_span_continues_the_callers_trace() -> None:
    before = time.time_ns()
    span = start_span("GET /items", "server", PARENT, attributes={"http.request.method": "GET"})
    assert span.context.trace_id == PARENT.trace_id
    assert span.context.span_id != PARENT.span_id
    assert span.context.tracestate == "foo=1"
    assert span.parent_span_id == PARENT.span_id
    assert span.kind == "server"
    assert before <= span.start_ns <= time.time_ns()
    assert span.end_ns is None
    assert span.attributes == {"http.request.method": "GET"}


def test_a_root_span_starts_a_trace() -> None:
    span = start_span("GET /", "client", None, sampled=False)
    assert span.parent_span_id is None
    assert not span.context.sampled
    assert span.context.random


def test_end_records_once() -> None:
    span = start_span("call", "client", PARENT)
    span.end(503, error="upstream reset")
    first_end = span.end_ns
    assert first_end is not None and first_end >= span.start_ns
    span.end(200)
    assert (span.end_ns, span.status_code, span.error) == (first_end, 503, "upstream reset")


@pytest.mark.parametrize(
    ("kind", "status", "error", "failed"),
    [
        ("server", 200, None, False),
        ("server", 404, None, False),
        ("server", 500, None, True),
        ("server", None, None, True),
        ("client", 404, None, True),
        ("client", 302, None, False),
        ("client", 200, "cancelled", True),
    ],
)
def test_failed_follows_the_opentelemetry_http_rules(
    kind: spans.SpanKind, status: int | None, error: str | None, failed: bool
) -> None:
    span = start_span("x", kind, PARENT)
    span.end(status, error=error)
    assert span.failed is failed


def test_ended_sampled_spans_reach_the_exporter_in_order() -> None:
    collect = Collect()
    spans.set_exporter(collect)
    made = [start_span(f"s{i}", "server", PARENT) for i in range(50)]
    for span in made:
        span.end(200)
    assert spans.flush(5)
    assert collect.spans == made


def test_unsampled_spans_are_not_exported() -> None:
    collect = Collect()
    spans.set_exporter(collect)
    start_span("quiet", "server", SpanContext(PARENT.trace_id, PARENT.span_id, 0)).end(200)
    start_span("loud", "server", PARENT).end(200)
    assert spans.flush(5)
    assert [span.name for span in collect.spans] == ["loud"]


def test_a_failing_exporter_never_reaches_the_caller_and_export_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen: list[str] = []

    def flaky(span: Span) -> None:
        if span.name.startswith("bad"):
            raise RuntimeError("collector down")
        seen.append(span.name)

    errors_before = spans.export_errors()
    counted_before = REGISTRY.get_sample_value("mesh_span_export_errors_total") or 0.0
    spans.set_exporter(flaky)
    for name in ("bad1", "good1", "bad2", "good2"):
        start_span(name, "client", PARENT).end(200)
    assert spans.flush(5)
    assert seen == ["good1", "good2"]
    assert spans.export_errors() - errors_before == 2
    assert REGISTRY.get_sample_value("mesh_span_export_errors_total") == counted_before + 2
    assert sum("span exporter failed" in r.message for r in caplog.records) <= 1


def test_a_stuck_exporter_never_blocks_and_overflow_is_dropped_and_counted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(spans, "MAX_QUEUED_SPANS", 10)
    collect = Collect(blocked=True)
    spans.set_exporter(collect)
    dropped_before = spans.dropped_spans()
    counted_before = REGISTRY.get_sample_value("mesh_spans_dropped_total") or 0.0
    started = time.perf_counter()
    for i in range(100):
        start_span(f"s{i}", "server", PARENT).end(200)
    assert time.perf_counter() - started < 0.5
    # The first span may already be with the exporter; at most 10 wait; the rest are dropped.
    dropped = spans.dropped_spans() - dropped_before
    assert 89 <= dropped <= 90
    assert REGISTRY.get_sample_value("mesh_spans_dropped_total") == counted_before + dropped
    collect.release.set()
    assert spans.flush(5)
    assert len(collect.spans) == 100 - dropped


def test_replacing_the_exporter_hands_queued_spans_to_the_old_one() -> None:
    old, new = Collect(blocked=True), Collect()
    spans.set_exporter(old)
    start_span("early", "server", PARENT).end(200)
    threading.Timer(0.1, old.release.set).start()
    spans.set_exporter(new)
    start_span("late", "server", PARENT).end(200)
    assert spans.flush(5)
    assert [s.name for s in old.spans] == ["early"]
    assert [s.name for s in new.spans] == ["late"]


def test_removing_the_exporter_stops_its_thread() -> None:
    spans.set_exporter(Collect())
    start_span("s", "server", PARENT).end(200)
    assert spans.flush(5)
    assert any(t.name == "mesh-span-exporter" for t in threading.enumerate())
    spans.set_exporter(None)
    assert not any(t.name == "mesh-span-exporter" for t in threading.enumerate())
    assert spans.flush(0.1)


def test_flush_without_spans_returns_at_once() -> None:
    spans.set_exporter(Collect())
    assert spans.flush(0)


def test_ending_a_span_without_exporter_is_cheap() -> None:
    parent = child_of(None)
    made = [start_span("s", "server", parent) for _ in range(20_000)]
    started = time.perf_counter()
    for span in made:
        span.end(200)
    per_span = (time.perf_counter() - started) / len(made)
    assert per_span < 20e-6  # typically about 0.3 us; the bound only catches accidents


FORK_SCRIPT = """
import os
from mesh_middleware.telemetry import spans
from mesh_middleware.telemetry.spans import start_span
from mesh_middleware.telemetry.tracecontext import child_of

read_end, write_end = os.pipe()
spans.set_exporter(lambda span: os.write(write_end, span.name.encode() + b"\\n"))
start_span("parent-before-fork", "server", child_of(None)).end(200)
assert spans.flush(5)
pid = os.fork()
if pid == 0:
    start_span("child", "server", child_of(None)).end(200)
    os._exit(0 if spans.flush(5) else 1)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0
os.close(write_end)
lines = os.read(read_end, 1000).decode().split()
assert lines == ["parent-before-fork", "child"], lines
"""


def test_a_forked_worker_exports_its_own_spans() -> None:
    # In a fresh interpreter: forking this multi-threaded test process is unsafe.
    subprocess.run([sys.executable, "-c", FORK_SCRIPT], check=True, timeout=60)
