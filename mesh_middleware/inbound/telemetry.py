"""What the inbound middlewares record per request: a span, metrics, an edge report, a log line.

Framework-neutral: the ASGI and WSGI adapters call :meth:`InboundTelemetry.begin` when a
request arrives and :meth:`InboundTelemetry.end` once its answer is sent. Settings come from
the policy's ``telemetry:`` section and are compiled once per policy object.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from contextvars import Token
from dataclasses import dataclass

from mesh_middleware.inbound.engine import Admission
from mesh_middleware.policy.compiled import CompiledPolicy
from mesh_middleware.runtime.context import current_span
from mesh_middleware.telemetry import metrics
from mesh_middleware.telemetry.access_log import AccessLog
from mesh_middleware.telemetry.log_context import current_log_context
from mesh_middleware.telemetry.reports import EdgeReporter
from mesh_middleware.telemetry.spans import Span, exporting, start_span
from mesh_middleware.telemetry.tracecontext import SpanContext, child_of, incoming

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


@dataclass(slots=True)
class RequestRecord:
    """One request in flight: its span, when it began, and the context tokens to restore."""

    span: Span | None
    context: SpanContext
    started: float
    request_id: str
    span_token: Token[SpanContext | None]
    log_token: Token[tuple[str, str] | None]


class InboundTelemetry:
    """Spans, metrics, edge reports and access logs for one Mesh's inbound requests."""

    def __init__(
        self,
        policy: Callable[[], CompiledPolicy],
        reporter: Callable[[], EdgeReporter | None],
    ) -> None:
        self._policy = policy
        self._reporter = reporter
        self._settings: _Settings | None = None

    def settings(self) -> _Settings:
        """The policy's telemetry settings, compiled once per policy object."""
        policy = self._policy()
        found = self._settings
        if found is not None and found.policy is policy:
            return found
        telemetry = policy.loaded.policy.telemetry
        log = telemetry.access_log
        found = self._settings = _Settings(
            policy=policy,
            metrics=telemetry.metrics.enabled,
            metrics_path=telemetry.metrics.path if telemetry.metrics.enabled else None,
            access_log=AccessLog(log.sample) if log.enabled else None,
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
        """A request arrived: continue its trace (or start one) and make it current."""
        parent = incoming(traceparent, tracestate) if traceparent is not None else None
        sampled = True
        if parent is None:
            rate = self.settings().sample
            sampled = rate >= 1.0 or (rate > 0.0 and int.from_bytes(os.urandom(2)) < rate * 65536)
        span: Span | None = None
        if exporting():
            span = start_span(method, "server", parent, sampled=sampled)
            context = span.context
        else:  # nothing would read the span: its ids are all that is needed
            context = child_of(parent, sampled=sampled)
        if isinstance(request_id, bytes):
            request_id = request_id.decode("latin-1")
        return RequestRecord(
            span,
            context,
            time.perf_counter(),
            request_id or context.trace_id,
            current_span.set(context),
            current_log_context.set((context.trace_id, context.span_id)),
        )

    @staticmethod
    def leave(record: RequestRecord) -> None:
        """The app has returned: the request's span and log ids are no longer current."""
        current_log_context.reset(record.log_token)
        current_span.reset(record.span_token)

    def end(
        self,
        record: RequestRecord,
        *,
        caller: str | None,
        method: str,
        path: str,
        route: str,
        status: int,
        flags: str,
        request_bytes: int,
        response_bytes: int,
    ) -> None:
        """The answer was sent (``status`` 0: none was): record it everywhere it is due."""
        seconds = time.perf_counter() - record.started
        settings = self.settings()
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
            log.log(
                direction="inbound",
                method=method,
                path=path,
                route=route,
                status=status,
                flags=flags,
                duration_ms=seconds * 1000,
                request_bytes=request_bytes,
                response_bytes=response_bytes,
                caller=source,
                destination=policy.service,
                trace_id=context.trace_id,
                span_id=context.span_id,
                request_id=record.request_id,
            )


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
