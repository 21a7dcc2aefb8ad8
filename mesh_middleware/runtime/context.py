"""What flows from an inbound request to the outbound calls made while serving it.

The inbound middlewares put the caller's deadline, the request's span and its verified end user
in context variables; the
outbound clients read them, so a call made inside a handler never outlives its caller's
deadline (gRPC's deadline propagation) and continues its trace (W3C trace context). Context
variables follow the request into threads that anyio and Starlette start for sync handlers.
"""

from __future__ import annotations

import re
import time
from contextvars import ContextVar, Token
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from mypy_extensions import mypyc_attr

from mesh_middleware.telemetry.tracecontext import SpanContext

if TYPE_CHECKING:
    from mesh_middleware.identity.end_user import EndUser

__all__ = [
    "Deadline",
    "SpanHolder",
    "current_deadline",
    "current_span",
    "current_trace",
    "current_user",
    "deadline_from_header",
    "set_current_span",
]

_MAX_DEADLINE_MS = 24 * 3600 * 1000
_MILLIS = re.compile(r"^[ \t]*[0-9]{1,12}[ \t]*$", re.ASCII)


@mypyc_attr(native_class=False)  # public: a native class would lose its docstring
@dataclass(frozen=True, slots=True)
class Deadline:
    """The moment (``time.monotonic()``) by which the caller stops waiting."""

    at: float

    def remaining(self) -> float:
        """Seconds left; 0.0 once it has passed."""
        return max(self.at - time.monotonic(), 0.0)

    @property
    def expired(self) -> bool:
        """Whether the caller has stopped waiting."""
        return time.monotonic() >= self.at


def deadline_from_header(value: str | bytes | None) -> Deadline | None:
    """The deadline a caller sent as milliseconds left; ``None`` if absent or malformed.

    The value is relative so the two machines' clocks need not agree; the time the request
    spent on the wire is not subtracted, as in gRPC's ``grpc-timeout``.
    """
    if value is None:
        return None
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    if _MILLIS.match(text) is None:
        return None
    millis = min(int(text), _MAX_DEADLINE_MS)
    return Deadline(time.monotonic() + millis / 1000)


current_deadline: ContextVar[Deadline | None] = ContextVar("mesh_deadline", default=None)
"""The deadline of the inbound request being served, if its caller sent one."""


class SpanHolder(Protocol):
    """Holds a span's context, possibly worked out only when first asked for."""

    @property
    def context(self) -> SpanContext:
        """The span's context (the same object every time)."""
        ...


class _Given:
    __slots__ = ("context",)

    def __init__(self, context: SpanContext) -> None:
        self.context = context


current_trace: ContextVar[SpanHolder | None] = ContextVar("mesh_trace", default=None)
"""What holds the span of the inbound request being served (the middlewares set it).

The holder parses the request's ``traceparent`` and draws the span's id only when something
asks: most requests never make an outbound call or write a log line that needs them."""


def current_span() -> SpanContext | None:
    """The span of the request being served: outbound calls made for it are its children."""
    holder = current_trace.get()
    return None if holder is None else holder.context


def set_current_span(context: SpanContext | None) -> Token[SpanHolder | None]:
    """Make ``context`` the current span; ``current_trace.reset(token)`` restores the last."""
    return current_trace.set(None if context is None else _Given(context))


current_user: ContextVar[EndUser | None] = ContextVar("mesh_current_user", default=None)
"""The verified end user of the request being served (set only when there is one)."""
