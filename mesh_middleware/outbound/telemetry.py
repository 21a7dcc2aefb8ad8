"""What the outbound clients record: a client span per try, and per call metrics, an edge
report and (when the policy asks) an access log line, as the source reports them."""

from __future__ import annotations

import time
from collections.abc import Callable

from mesh_middleware.outbound.call import Call, Refusal
from mesh_middleware.policy.compiled import CompiledPolicy
from mesh_middleware.resilience.retry_policy import Failure
from mesh_middleware.runtime.context import current_span
from mesh_middleware.telemetry import metrics
from mesh_middleware.telemetry.access_log import AccessLog
from mesh_middleware.telemetry.reports import EdgeReporter
from mesh_middleware.telemetry.spans import Span, start_span
from mesh_middleware.telemetry.tracecontext import SpanContext, child_of

__all__ = ["FLAG_OF_FAILURE", "FLAG_OF_REFUSAL", "OutboundTelemetry", "external_context"]

_request_metrics = metrics.RequestMetrics("source")

FLAG_OF_FAILURE = {
    Failure.CONNECT_FAILURE: metrics.CONNECT_FAILURE,
    Failure.RESET: metrics.RESET,
    Failure.REFUSED_STREAM: metrics.RESET,
    Failure.TIMEOUT: metrics.TIMEOUT,
}
"""The response flag of a try that failed without an answer."""

FLAG_OF_REFUSAL = {
    Refusal.NO_HEALTHY_INSTANCES: metrics.NO_HEALTHY,
    Refusal.CIRCUIT_OPEN: metrics.CIRCUIT_OPEN,
    Refusal.RETRY_BUDGET_EXHAUSTED: metrics.BUDGET,
    Refusal.DEADLINE_EXCEEDED: metrics.DEADLINE,
}
"""The response flag of a call the mesh ended itself."""


def external_context() -> SpanContext:
    """The trace context for a call to a host outside the mesh: a child of the current span."""
    return child_of(current_span())


class OutboundTelemetry:
    """Spans, metrics, edge reports and access lines for one Mesh's outbound calls."""

    def __init__(
        self,
        policy: Callable[[], CompiledPolicy],
        reporter: Callable[[], EdgeReporter | None],
    ) -> None:
        self._policy = policy
        self._reporter = reporter
        self._log: tuple[CompiledPolicy, AccessLog | None] | None = None

    def try_span(self, call: Call, method: str) -> Span:
        """A client span for the next try, under the current inbound span if there is one.

        Without one, the first try starts a trace and later tries are its children, so all
        the tries of one call are one trace.
        """
        parent = current_span()
        if parent is None and call.span is not None:
            parent = call.span.context
        return start_span(method, "client", parent)

    def retried(self, call: Call, reason: str) -> None:
        """Count a retry (``reason``: the status code or the failure's name)."""
        source, destination = self._policy().service, call.destination.service
        metrics.count_retry(source, destination, reason)
        reporter = self._reporter()
        if reporter is not None:
            reporter.retried(source, destination)

    def finished(
        self,
        call: Call,
        *,
        method: str,
        status: int,
        flags: list[str],
        version: str | None,
        upstream: str | None,
        span: Span | None,
        request_bytes: int,
        response_bytes: int,
        error: str | None = None,
    ) -> None:
        """The call is over (``status`` 0: no answer); ``flags`` says what the mesh did."""
        seconds = time.monotonic() - call.started
        policy = self._policy()
        source = policy.service
        destination = call.destination.service
        if call.attempt > 1:
            flags.append(metrics.RETRIED)
        joined = metrics.join_flags(flags)
        if span is not None:
            span.end(status or None, error=error)
        if policy.loaded.policy.telemetry.metrics.enabled:
            _request_metrics.record(
                source,
                destination,
                version or "unknown",
                call.choice.route,
                method,
                status,
                joined,
                seconds,
                request_bytes,
                response_bytes,
            )
        reporter = self._reporter()
        if reporter is not None:
            reporter.record(source, destination, status, seconds)
        log = self._access_log(policy)
        if log is not None:
            context = span.context if span is not None else None
            log.log(
                direction="outbound",
                method=method,
                path=call.path,
                route=call.choice.route,
                status=status,
                flags=joined,
                duration_ms=seconds * 1000,
                request_bytes=request_bytes,
                response_bytes=response_bytes,
                caller=source,
                destination=destination,
                upstream=upstream,
                trace_id=context.trace_id if context is not None else None,
                span_id=context.span_id if context is not None else None,
            )

    def _access_log(self, policy: CompiledPolicy) -> AccessLog | None:
        found = self._log
        if found is not None and found[0] is policy:
            return found[1]
        settings = policy.loaded.policy.telemetry.access_log
        log = (
            AccessLog(settings.sample, flush_interval=settings.flush_interval)
            if settings.enabled
            else None
        )
        self._log = (policy, log)
        return log
