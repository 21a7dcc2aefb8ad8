"""What flows from an inbound request to the outbound calls made while serving it.

The inbound middlewares put the caller's deadline and trace parent in context variables; the
outbound clients read them, so a call made inside a handler never outlives its caller's
deadline (gRPC's deadline propagation) and continues its trace (W3C trace context). Context
variables follow the request into threads that anyio and Starlette start for sync handlers.
"""

from __future__ import annotations

import os
import re
import time
from contextvars import ContextVar
from dataclasses import dataclass

__all__ = [
    "Deadline",
    "current_deadline",
    "current_traceparent",
    "deadline_from_header",
    "new_traceparent",
    "parse_traceparent",
]

_MAX_DEADLINE_MS = 24 * 3600 * 1000
_MILLIS = re.compile(r"^[ \t]*[0-9]{1,12}[ \t]*$", re.ASCII)


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

    def header_value(self) -> str:
        """Milliseconds left, as sent in ``x-mesh-deadline-ms`` (0 once passed)."""
        return str(int(self.remaining() * 1000))


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

current_traceparent: ContextVar[tuple[str, str] | None] = ContextVar(
    "mesh_traceparent", default=None
)
"""The (trace id, flags) of the inbound request being served, if it carried a trace."""

_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16


def parse_traceparent(value: str | bytes | None) -> tuple[str, str] | None:
    """(trace id, flags) from a W3C ``traceparent`` header; ``None`` if absent or invalid."""
    if value is None:
        return None
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    found = _TRACEPARENT.match(text.strip())
    if found is None or text.startswith("ff"):
        return None
    trace_id, span_id, flags = found.groups()
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    return trace_id, flags


def new_traceparent(parent: tuple[str, str] | None = None) -> str:
    """A ``traceparent`` for an outbound call: a child of ``parent``, or a new sampled trace."""
    span_id = os.urandom(8).hex()
    if parent is None:
        return f"00-{os.urandom(16).hex()}-{span_id}-01"
    return f"00-{parent[0]}-{span_id}-{parent[1]}"
