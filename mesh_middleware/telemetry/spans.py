"""Spans: one per request served (``server``) and per call made (``client``), and their export.

Ending a span only records its end unless an exporter is set with :func:`set_exporter`. Then
each sampled span that ends is put on a bounded queue that a background thread drains into the
exporter, so a slow or failing exporter never delays or breaks a request: when the queue is
full the span is dropped and counted (:func:`dropped_spans`), and an exporter's exceptions are
counted (:func:`export_errors`) and logged once.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from mesh_middleware.telemetry import metrics
from mesh_middleware.telemetry.tracecontext import FLAG_SAMPLED, SpanContext, child_of

__all__ = [
    "AttributeValue",
    "Exporter",
    "Span",
    "SpanKind",
    "dropped_spans",
    "export_errors",
    "flush",
    "set_exporter",
    "start_span",
]

log = logging.getLogger(__name__)

SpanKind = Literal["server", "client"]
AttributeValue = str | bool | int | float
Exporter = Callable[["Span"], None]

MAX_QUEUED_SPANS = 2048
"""Spans waiting for the exporter; more are dropped (the OpenTelemetry SDK's default size)."""


@dataclass(slots=True, eq=False)
class Span:
    """One operation: a request served (``server``) or a call made (``client``).

    ``context`` is this span's own place in the trace (its ``span_id`` is the one sent
    downstream); ``parent_span_id`` is the caller's, ``None`` for the root of a trace. Times are
    ``time.time_ns()``; ``end_ns`` is ``None`` until :meth:`end`. ``status_code`` is the HTTP
    status of the answer (``None`` if there was none); ``error`` says why a span failed.
    """

    name: str
    kind: SpanKind
    context: SpanContext
    parent_span_id: str | None
    start_ns: int
    end_ns: int | None = None
    status_code: int | None = None
    error: str | None = None
    attributes: dict[str, AttributeValue] = field(default_factory=dict)

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        """Record one attribute (OpenTelemetry semantic-convention names are best)."""
        self.attributes[key] = value

    def end(self, status_code: int | None = None, *, error: str | None = None) -> None:
        """Record the end, the HTTP status and any error; hand the span to the exporter.

        Only the first call counts. Never raises and never blocks.
        """
        if self.end_ns is not None:
            return
        self.end_ns = time.time_ns()
        self.status_code = status_code
        self.error = error
        pipeline = _pipeline
        if pipeline is not None and self.context.flags & FLAG_SAMPLED:
            pipeline.put(self)

    @property
    def failed(self) -> bool:
        """Whether the span ended in error, by OpenTelemetry's HTTP rules.

        An error, no answer, or a 5xx; for a client span a 4xx as well (the server did not
        fail on a 4xx, the call did).
        """
        code = self.status_code
        if self.error is not None or code is None:
            return True
        return code >= 500 or (self.kind == "client" and code >= 400)


def start_span(
    name: str,
    kind: SpanKind,
    parent: SpanContext | None,
    *,
    attributes: Mapping[str, AttributeValue] | None = None,
    sampled: bool = True,
) -> Span:
    """Start a span under ``parent`` (``None``: the root of a new trace, ``sampled`` or not)."""
    return Span(
        name,
        kind,
        child_of(parent, sampled=sampled),
        None if parent is None else parent.span_id,
        time.time_ns(),
        attributes=dict(attributes) if attributes else {},
    )


class _Pipeline:
    """A bounded queue of ended spans and the daemon thread that feeds them to the exporter."""

    def __init__(self, exporter: Exporter) -> None:
        self.exporter = exporter
        self.stopping = False
        self.dropped = 0
        self.errors = 0
        self.after_fork()

    def after_fork(self) -> None:
        # Also the child's reset after fork(): threads do not survive it, and the spans queued
        # in the parent are the parent's to export. The child starts a thread on its first span.
        self.queue: deque[Span | threading.Event] = deque()
        self.wake = threading.Event()
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None

    def put(self, span: Span) -> None:
        # len() then append() may let a few spans past the limit under races, and the counter
        # may miss a drop: the bound only has to keep memory finite, so no lock per request.
        if len(self.queue) >= MAX_QUEUED_SPANS:
            self.dropped += 1
            metrics.SPANS_DROPPED.inc()
            return
        self.queue.append(span)
        if self.thread is None:
            self._start()
        if not self.wake.is_set():
            self.wake.set()

    def _start(self) -> None:
        with self.lock:
            if self.thread is None and not self.stopping:
                self.thread = threading.Thread(
                    target=self._run, name="mesh-span-exporter", daemon=True
                )
                self.thread.start()

    def _run(self) -> None:
        queue = self.queue
        while True:
            self.wake.wait()
            # Cleared before draining: a span put after this sets it again, so none waits.
            self.wake.clear()
            while queue:
                item = queue.popleft()
                if isinstance(item, threading.Event):
                    item.set()
                    continue
                try:
                    self.exporter(item)
                except Exception:
                    self.errors += 1
                    metrics.SPAN_EXPORT_ERRORS.inc()
                    if self.errors == 1:
                        log.exception("span exporter failed; further failures are only counted")
            if self.stopping:
                return

    def flush(self, timeout: float) -> bool:
        if self.thread is None and not self.queue:
            return True
        # A marker behind the queued spans: set once every span before it was exported.
        done = threading.Event()
        self.queue.append(done)
        if self.thread is None:
            self._start()
        self.wake.set()
        return done.wait(timeout)

    def stop(self, timeout: float) -> None:
        self.flush(timeout)
        with self.lock:
            self.stopping = True
            thread = self.thread
        self.wake.set()
        if thread is not None:
            thread.join(timeout)


_pipeline: _Pipeline | None = None
_dropped_before = 0
_errors_before = 0


def exporting() -> bool:
    """Whether ended spans go anywhere (an exporter is set); without one only ids matter."""
    return _pipeline is not None


def set_exporter(exporter: Exporter | None, *, timeout: float = 5.0) -> None:
    """Send each sampled span that ends to ``exporter`` (on a background thread), or stop.

    Replacing or removing an exporter first hands the spans already queued to the old one,
    waiting at most ``timeout`` seconds.
    """
    global _pipeline, _dropped_before, _errors_before
    old = _pipeline
    _pipeline = _Pipeline(exporter) if exporter is not None else None
    if old is not None:
        old.stop(timeout)
        _dropped_before += old.dropped
        _errors_before += old.errors


def flush(timeout: float = 5.0) -> bool:
    """Wait until every queued span has been exported; ``False`` if ``timeout`` passed first."""
    pipeline = _pipeline
    return True if pipeline is None else pipeline.flush(timeout)


def dropped_spans() -> int:
    """Spans dropped because the export queue was full, since the process started."""
    pipeline = _pipeline
    return _dropped_before + (pipeline.dropped if pipeline is not None else 0)


def export_errors() -> int:
    """Spans whose export raised, since the process started."""
    pipeline = _pipeline
    return _errors_before + (pipeline.errors if pipeline is not None else 0)


def _after_fork_in_child() -> None:
    if _pipeline is not None:
        _pipeline.after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
