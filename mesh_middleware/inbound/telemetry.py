"""What the inbound middlewares record per request: a span, metrics, an edge report, a log line.

Framework-neutral: the ASGI and WSGI adapters call :meth:`InboundTelemetry.begin` when a
request arrives and :meth:`InboundTelemetry.end` once its answer is sent. Settings come from
the policy's ``telemetry:`` section and are compiled once per policy object.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Sequence
from contextvars import Token
from dataclasses import dataclass

from mesh_middleware.inbound.engine import Admission
from mesh_middleware.policy.compiled import CompiledPolicy
from mesh_middleware.runtime.context import SpanHolder, current_trace
from mesh_middleware.telemetry import metrics
from mesh_middleware.telemetry.access_log import AccessLog
from mesh_middleware.telemetry.reports import EdgeReporter
from mesh_middleware.telemetry.spans import Span, exporting, start_span
from mesh_middleware.telemetry.tracecontext import SpanContext, child_of, incoming, server_span

__all__ = ["InboundTelemetry", "RequestRecord"]

ANONYMOUS = "anonymous"
_request_metrics = metrics.RequestMetrics("destination")


@dataclass(slots=True)
class _Settings:
    policy: CompiledPolicy
    metrics: bool
    metrics_path: str | None
    access_log: AccessLog | None
    sample: float
    version: str


class RequestRecord:
    """One request in flight: when it began, its span, and the trace it continues.

    Made when the request arrives (:meth:`InboundTelemetry.begin`), it becomes the current
    trace at once, and a server span starts when spans are exported. It is what
    :data:`~mesh_middleware.runtime.context.current_trace` holds while the request is served
    (until :meth:`InboundTelemetry.leave`). The span's context is worked out on first use
    (:attr:`context`): parsing the ``traceparent`` and drawing a span id cost more than the
    rest of the telemetry, and most requests never need them (no outbound call, no log line,
    no span exporter).
    """

    __slots__ = (
        "_context",
        "_request_id",
        "_telemetry",
        "_traceparent",
        "_tracestate",
        "span",
        "started",
        "token",
    )

    def __init__(
        self,
        telemetry: InboundTelemetry,
        traceparent: str | bytes | None,
        tracestate: Sequence[str | bytes],
        request_id: str | bytes | None,
        method: str,
    ) -> None:
        self._telemetry = telemetry
        self._traceparent = traceparent
        self._tracestate = tracestate
        self._request_id = request_id
        self._context: SpanContext | None = None
        self.span: Span | None = None
        self.started = time.perf_counter()
        self.token: Token[SpanHolder | None] = current_trace.set(self)
        if exporting():
            self.start_span(method)

    @property
    def context(self) -> SpanContext:
        """The request's span: a child of the caller's, or the root of a new trace."""
        context = self._context
        if context is not None:
            return context
        with _resolving:  # threads sharing the request's context must all see one span id
            context = self._context
            if context is None:
                traceparent = self._traceparent
                if traceparent is not None:
                    context = server_span(traceparent, self._tracestate)
                if context is None:
                    context = child_of(None, sampled=self._sample_new_trace())
                self._context = context
        return context

    def _parent(self) -> tuple[SpanContext | None, bool]:
        traceparent = self._traceparent
        parent = incoming(traceparent, self._tracestate) if traceparent is not None else None
        if parent is not None:
            return parent, True
        return None, self._sample_new_trace()

    def _sample_new_trace(self) -> bool:
        rate = self._telemetry.settings().sample
        return rate >= 1.0 or (rate > 0.0 and int.from_bytes(os.urandom(2)) < rate * 65536)

    def start_span(self, method: str) -> None:
        """Record a server span for this request (there is an exporter to send it to)."""
        parent, sampled = self._parent()
        span = self.span = start_span(method, "server", parent, sampled=sampled)
        self._context = span.context

    @property
    def request_id(self) -> str:
        """The caller's ``x-request-id``, or else the trace id."""
        request_id = self._request_id
        if isinstance(request_id, bytes):
            request_id = request_id.decode("latin-1")
        return request_id or self.context.trace_id


_resolving = threading.Lock()


class InboundTelemetry:
    """Spans, metrics, edge reports and access logs for one Mesh's inbound requests."""

    def __init__(
        self,
        state: Callable[[], tuple[CompiledPolicy, str]],
        reporter: Callable[[], EdgeReporter | None],
    ) -> None:
        self._state = state
        self._reporter = reporter
        self._settings: _Settings | None = None

    def settings(self) -> _Settings:
        """The policy's telemetry settings, compiled once per policy object."""
        policy = self._state()[0]
        found = self._settings
        if found is not None and found.policy is policy:
            return found
        telemetry = policy.loaded.policy.telemetry
        log = telemetry.access_log
        found = self._settings = _Settings(
            policy=policy,
            metrics=telemetry.metrics.enabled,
            metrics_path=telemetry.metrics.path if telemetry.metrics.enabled else None,
            access_log=(
                AccessLog(log.sample, flush_interval=log.flush_interval) if log.enabled else None
            ),
            sample=telemetry.tracing.sample,
            version=policy.loaded.policy.version or "unknown",
        )
        return found

    def begin(
        self,
        traceparent: str | bytes | None,
        tracestate: Sequence[str | bytes],
        request_id: str | bytes | None,
        method: str,
    ) -> RequestRecord:
        """A request arrived: make its record (and so its trace) current."""
        return RequestRecord(self, traceparent, tracestate, request_id, method)

    @staticmethod
    def leave(record: RequestRecord) -> None:
        """The app has returned: the request's trace is no longer current."""
        current_trace.reset(record.token)

    def end(
        self,
        record: RequestRecord,
        settings: _Settings,
        caller: str | None,
        method: str,
        path: str,
        route: str,
        status: int,
        flags: str,
        request_bytes: int,
        response_bytes: int,
    ) -> None:
        """The answer was sent (``status`` 0: none was): record it everywhere it is due.

        ``settings`` are those the request began with (:meth:`settings`); the arguments are
        positional, as this runs for every request."""
        seconds = time.perf_counter() - record.started
        policy = settings.policy
        source = caller or ANONYMOUS
        if settings.metrics:
            _request_metrics.record(
                source,
                policy.service,
                settings.version,
                route,
                method,
                status,
                flags,
                seconds,
                request_bytes,
                response_bytes,
            )
        reporter = self._reporter()
        if reporter is not None:
            reporter.record(source, policy.service, status, seconds)
        span = record.span
        if span is not None:
            span.end(status or None)
        log = settings.access_log
        if log is not None:
            context = record.context
            trace_id = context.trace_id
            request_id = record._request_id
            log.entry(
                "inbound",
                method,
                path,
                route,
                status,
                flags,
                seconds * 1000,
                request_bytes,
                response_bytes,
                source,
                policy.service,
                None,
                trace_id,
                context.span_id,
                (request_id.decode("latin-1") if isinstance(request_id, bytes) else request_id)
                if request_id
                else trace_id,
            )

    def judged(self, admission: Admission, method: str, path: str) -> None:
        """The engine refused the request or injected a fault into it: tell the registry
        (its dashboard lists denials with their rule, and counts faults per edge). Called
        only then, never for a request that simply goes through."""
        reporter = self._reporter()
        if reporter is None:
            return
        service = self._state()[0].service
        caller = admission.caller
        source = caller.service if caller is not None else ANONYMOUS
        status = admission.status
        aborted = status is not None and admission.fault is not None
        if admission.delay:
            reporter.faulted(source, service, abort=False)
        if aborted:
            reporter.faulted(source, service, abort=True)
        elif status is not None and 400 <= status < 500:
            decision = admission.decision
            if decision is not None:
                rule, line, reason = decision.rule, decision.line, decision.reason
            else:
                rule, line, reason = None, None, _reason(admission.body)
            reporter.denied(source, method, path, status, rule, line, reason)


def _reason(body: bytes) -> str:
    try:
        reason = json.loads(body).get("reason")
    except (ValueError, AttributeError):
        return ""
    return reason if isinstance(reason, str) else ""


def admission_flags(admission: Admission) -> str:
    """The response flags of a request the inbound engine judged."""
    status = admission.status
    found: list[str] = []
    if admission.delay:
        found.append(metrics.FAULT_DELAY)
    if status is not None:
        if admission.fault is not None:
            found.append(metrics.FAULT_ABORT)
        elif status == 401:
            found.append(metrics.UNAUTH)
        elif status == 403:
            found.append(metrics.DENIED)
        elif status == 400:
            found.append(metrics.INVALID_PATH)
    return metrics.join_flags(found) if found else metrics.NO_FLAGS
