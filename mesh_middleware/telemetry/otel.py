"""Export the mesh's spans over OTLP, when the optional ``otel`` extra is installed.

``pip install mesh-middleware[otel]`` brings ``opentelemetry-sdk`` and
``opentelemetry-exporter-otlp-proto-http``. Nothing here imports them until
:func:`enable_otlp` or :func:`enable_exporter` is called, so the rest of the mesh never pays
for OpenTelemetry. The mesh keeps its own spans (see :mod:`.spans`); each ended span is turned
into the SDK's ``ReadableSpan``, with the mesh's own trace and span ids, on the span exporter
thread, and the SDK's ``BatchSpanProcessor`` batches and sends them.
"""

from __future__ import annotations

import atexit
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from mesh_middleware._version import __version__
from mesh_middleware.telemetry import spans
from mesh_middleware.telemetry.tracecontext import FLAG_RANDOM, FLAG_SAMPLED

if TYPE_CHECKING:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

__all__ = ["disable", "enable_exporter", "enable_otlp", "flush", "to_readable_span"]

log = logging.getLogger(__name__)

_lock = threading.Lock()
_processor: BatchSpanProcessor | None = None
_warned_missing = False
_atexit_registered = False


def enable_otlp(
    endpoint: str | None = None,
    *,
    service_name: str,
    headers: dict[str, str] | None = None,
    timeout: float | None = None,
) -> bool:
    """Export every sampled span to an OTLP/HTTP (protobuf) endpoint; ``False`` without the extra.

    ``endpoint`` is the full traces URL (``http://collector:4318/v1/traces``); ``None`` takes
    the standard ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_ENDPOINT``
    variables, else ``http://localhost:4318/v1/traces``. ``service_name`` becomes the resource's
    ``service.name`` (``OTEL_RESOURCE_ATTRIBUTES`` adds to it). Calling it again replaces the
    previous exporter. When the packages are missing it logs a warning once and returns False.
    """
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError:
        _warn_missing()
        return False
    return enable_exporter(
        OTLPSpanExporter(endpoint=endpoint, headers=headers, timeout=timeout),
        service_name=service_name,
    )


def enable_exporter(exporter: SpanExporter, *, service_name: str) -> bool:
    """Export every sampled span through any OpenTelemetry SDK ``SpanExporter``, in batches.

    For exporters other than OTLP/HTTP (gRPC, console, in-memory in tests). ``False`` (and a
    warning, once) when ``opentelemetry-sdk`` is not installed.
    """
    global _processor, _atexit_registered
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope
    except ImportError:
        _warn_missing()
        return False
    resource = Resource.create({"service.name": service_name})
    scope = InstrumentationScope("mesh_middleware", __version__)
    processor = BatchSpanProcessor(exporter)

    def export(span: spans.Span) -> None:
        processor.on_end(to_readable_span(span, resource, scope))

    with _lock:
        old, _processor = _processor, processor
        spans.set_exporter(export)
        if not _atexit_registered:
            atexit.register(disable)
            _atexit_registered = True
    if old is not None:
        _shut_down(old)
    return True


def flush(timeout: float = 10.0) -> bool:
    """Send every span ended so far now; ``False`` if that did not finish within ``timeout``."""
    if not spans.flush(timeout):
        return False
    processor = _processor
    return True if processor is None else processor.force_flush(int(timeout * 1000))


def disable(timeout: float = 10.0) -> None:
    """Send what is queued (waiting at most ``timeout`` seconds), then stop exporting."""
    global _processor
    with _lock:
        processor, _processor = _processor, None
        if processor is not None:
            spans.set_exporter(None, timeout=timeout)
    if processor is not None:
        _shut_down(processor)


def to_readable_span(
    span: spans.Span, resource: Resource, scope: InstrumentationScope
) -> ReadableSpan:
    """The SDK's view of one of our spans, with the same ids, times, status and attributes.

    The status follows OpenTelemetry's HTTP conventions (:attr:`.spans.Span.failed`); the
    HTTP status becomes ``http.response.status_code`` and a failure's cause ``error.type``.
    """
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.trace import SpanContext, SpanKind, TraceFlags, TraceState
    from opentelemetry.trace.status import Status, StatusCode

    own = span.context
    flags = TraceFlags(own.flags & (FLAG_SAMPLED | FLAG_RANDOM))
    state = TraceState.from_header([own.tracestate]) if own.tracestate else None
    trace_id = int(own.trace_id, 16)
    context = SpanContext(trace_id, int(own.span_id, 16), False, flags, state)
    parent = None
    if span.parent_span_id is not None:
        # A server span's parent is the caller's span (remote); a client span's is ours.
        remote = span.kind == "server"
        parent = SpanContext(trace_id, int(span.parent_span_id, 16), remote, flags, state)
    attributes: dict[str, str | bool | int | float] = dict(span.attributes)
    if span.status_code is not None:
        attributes["http.response.status_code"] = span.status_code
    if span.failed:
        cause = span.error or (str(span.status_code) if span.status_code else "no_response")
        attributes.setdefault("error.type", cause)
        status = Status(StatusCode.ERROR, span.error)
    else:
        status = Status(StatusCode.UNSET)
    return ReadableSpan(
        name=span.name,
        context=context,
        parent=parent,
        resource=resource,
        attributes=attributes,
        kind=SpanKind.SERVER if span.kind == "server" else SpanKind.CLIENT,
        status=status,
        start_time=span.start_ns,
        end_time=span.end_ns,
        instrumentation_scope=scope,
    )


def _shut_down(processor: BatchSpanProcessor) -> None:
    # Sends what the processor holds, then stops its thread. (Typed through a variable: the
    # SDK leaves shutdown() unannotated.)
    shutdown: Callable[[], object] = processor.shutdown
    shutdown()


def _warn_missing() -> None:
    global _warned_missing
    if not _warned_missing:
        _warned_missing = True
        log.warning(
            "OTLP export is off: install mesh-middleware[otel] "
            "(opentelemetry-sdk, opentelemetry-exporter-otlp-proto-http)"
        )
