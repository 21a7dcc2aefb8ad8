"""Log correlation: the app's own log lines carry the trace and span of the request.

The inbound middlewares make the request's span current for as long as it is served
(:data:`mesh_middleware.runtime.context.current_trace`, a ``ContextVar``);
:func:`current_log_context` reads its ids. Two readers put them on log lines:

- structlog: add :func:`add_trace_context` to the processors (before the renderer);
- stdlib ``logging``: add a :class:`TraceContextFilter` to the handler and use
  ``%(trace_id)s`` / ``%(span_id)s`` in its format (both are ``""`` outside a request).

A ``ContextVar`` follows the request wherever its context goes: asyncio tasks, the threads
anyio and Starlette run sync endpoints in (they copy the context), and the request's own
thread under WSGI.
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from contextvars import Token
from typing import Any

from mesh_middleware.runtime.context import SpanHolder, current_trace, set_current_span
from mesh_middleware.telemetry.tracecontext import FLAG_SAMPLED, SpanContext

__all__ = ["TraceContextFilter", "add_trace_context", "bind", "current_log_context", "unbind"]


def current_log_context() -> tuple[str, str] | None:
    """``(trace_id, span_id)`` of the request being served here, or ``None``."""
    holder = current_trace.get()
    if holder is None:
        return None
    context = holder.context
    return context.trace_id, context.span_id


def bind(trace_id: str, span_id: str) -> Token[SpanHolder | None]:
    """Make a span with these ids current (work done outside a request, say, that continues a
    trace); keep the token for :func:`unbind`."""
    return set_current_span(SpanContext(trace_id, span_id, FLAG_SAMPLED))


def unbind(token: Token[SpanHolder | None]) -> None:
    """Restore the span :func:`bind` replaced."""
    current_trace.reset(token)


def add_trace_context(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: add ``trace_id`` and ``span_id`` of the current request.

    Keys the event already has are left alone; outside a request nothing is added."""
    context = current_log_context()
    if context is not None:
        event_dict.setdefault("trace_id", context[0])
        event_dict.setdefault("span_id", context[1])
    return event_dict


class TraceContextFilter(logging.Filter):
    """stdlib ``logging`` filter: sets ``record.trace_id`` and ``record.span_id``.

    Never filters anything out. Outside a request both are ``""``, so format strings that use
    them work for every record. Values a record already carries (``extra={"trace_id": ...}``)
    are kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = current_log_context()
        trace_id, span_id = context if context is not None else ("", "")
        if not hasattr(record, "trace_id"):
            record.trace_id = trace_id
        if not hasattr(record, "span_id"):
            record.span_id = span_id
        return True
