"""Access logs: one JSON line per request, sampled per trace, cheap enough for every request.

The line is rendered without the app's structlog configuration: a fixed template of the
standard fields (extras rendered by :func:`render_json_line`, a structlog renderer) written by
``structlog.WriteLogger`` (one write and flush per line, under its lock), so it is JSON
whatever the app configured, and costs a few microseconds: the fields arrive complete with
each call, so a bound logger's context machinery would only add cost. Pass ``logger=`` to send
the fields through a structlog logger of your own (and its processors) instead.

Sampling keeps a fraction ``sample`` of ordinary requests. With a trace id the choice is a
function of the id alone, the rule of OpenTelemetry's ``TraceIdRatioBased`` sampler (the lower
64 bits of the id below ``sample * 2**64``): every service of a trace keeps or drops its lines
together, and a trace sampled by a tracer at the same ratio has its access lines too. Without a
trace id the choice is random. Server errors (5xx) and requests with response flags are always
logged.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
import zlib
from json.encoder import encode_basestring_ascii as _quote
from typing import Any, Protocol, TextIO

import structlog

from mesh_middleware.telemetry.log_context import current_log_context
from mesh_middleware.telemetry.metrics import NO_FLAGS

__all__ = ["FIELDS", "AccessLog", "render_json_line", "sampled"]

FIELDS = (
    "ts",
    "level",
    "logger",
    "event",
    "direction",
    "method",
    "path",
    "route",
    "status",
    "flags",
    "duration_ms",
    "request_bytes",
    "response_bytes",
    "caller",
    "destination",
    "upstream",
    "trace_id",
    "span_id",
    "request_id",
)
"""Every line's keys, in order (fields passed as extras follow them)."""

_TRACE_ID_LIMIT = 1 << 64


class _Logger(Protocol):
    def info(self, event: str, **fields: Any) -> Any: ...


def sampled(sample: float, trace_id: str | None) -> bool:
    """Whether an ordinary request is kept at ratio ``sample`` (see the module's docstring)."""
    if sample >= 1.0:
        return True
    if sample <= 0.0:
        return False
    if trace_id:
        bound = round(sample * _TRACE_ID_LIMIT)
        try:
            return int(trace_id[-16:], 16) < bound
        except ValueError:
            return zlib.crc32(trace_id.encode("utf-8", "replace")) < sample * (1 << 32)
    return random.random() < sample


def _float(value: float) -> str:
    return repr(value) if math.isfinite(value) else "null"


def _other(value: Any) -> str:
    return json.dumps(value, default=str, ensure_ascii=True)


_ENCODERS: dict[type, Any] = {
    str: _quote,
    int: int.__repr__,
    float: _float,
    type(None): lambda _: "null",
    bool: lambda value: "true" if value else "false",
}
_encoder = _ENCODERS.get
_KEYS: dict[str, str] = {}


def _json_value(value: Any) -> str:
    """One JSON value: by type, strings by the json module's C encoder (ASCII output)."""
    result: str = _encoder(type(value), _other)(value)
    return result


def render_json_line(_logger: Any, _method: str, event_dict: dict[str, Any]) -> str:
    """A structlog renderer: the event as one line of ASCII JSON, keys in the dict's order.

    Each value is encoded by its type (strings by the json module's C encoder); anything
    not a str, int, float, bool or None goes through ``json.dumps`` with ``default=str``.
    Non-finite floats become null."""
    parts = []
    for key, value in event_dict.items():
        prefix = _KEYS.get(key)
        if prefix is None:
            prefix = _quote(str(key)) + ":"
            if len(_KEYS) < 1000:
                _KEYS[key] = prefix
        parts.append(prefix + _encoder(type(value), _other)(value))
    return "{" + ",".join(parts) + "}"


_LINE = (
    '{"ts":"%s","level":"info","logger":"mesh.access","event":"access","direction":%s,'
    '"method":%s,"path":%s,"route":%s,"status":%s,"flags":%s,"duration_ms":%s,'
    '"request_bytes":%s,"response_bytes":%s,"caller":%s,"destination":%s,"upstream":%s,'
    '"trace_id":%s,"span_id":%s,"request_id":%s%s}'
)
"""The line of :data:`FIELDS`, filled in by :meth:`AccessLog.log` without building a dict."""


class _Clock:
    """ISO 8601 UTC timestamps with milliseconds, formatting the seconds once per second."""

    __slots__ = ("_cached",)

    def __init__(self) -> None:
        self._cached = (-1, "")

    def now(self) -> str:
        now = time.time()
        second = int(now)
        cached_second, prefix = self._cached
        if second != cached_second:
            prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._cached = (second, prefix)
        return f"{prefix}.{int((now - second) * 1000):03d}Z"


class AccessLog:
    """Writes access lines; one per process, shared by the inbound and outbound sides.

    ``sample`` is the fraction (0-1) of ordinary requests kept. ``stream`` is where the private
    JSON chain writes (default: ``sys.stderr`` as it is at construction); ``logger`` replaces
    that chain with a structlog logger of your own, called as ``logger.info("access", **fields)``.
    """

    __slots__ = ("_clock", "_logger", "_sink", "sample")

    def __init__(
        self, sample: float = 1.0, logger: _Logger | None = None, *, stream: TextIO | None = None
    ) -> None:
        if not 0.0 <= sample <= 1.0:
            raise ValueError(f"sample must be between 0 and 1, got {sample!r}")
        self.sample = sample
        self._logger = logger
        self._sink = structlog.WriteLogger(stream if stream is not None else sys.stderr)
        self._clock = _Clock()

    def log(
        self,
        *,
        direction: str,
        method: str,
        path: str,
        route: str | None,
        status: int,
        flags: str = NO_FLAGS,
        duration_ms: float,
        request_bytes: int,
        response_bytes: int,
        caller: str | None,
        destination: str | None,
        upstream: str | None = None,
        trace_id: str | None = None,
        span_id: str | None = None,
        request_id: str | None = None,
        **extra: Any,
    ) -> bool:
        """Write one request's line unless sampling drops it; ``True`` when written.

        ``direction`` is ``inbound`` or ``outbound``; ``path`` is the normalised path (a query,
        if one is left, is cut off); ``caller`` the source service; ``upstream`` the instance
        address an outbound call went to. Without ``trace_id`` the ids of the request's log
        context (:mod:`mesh_middleware.telemetry.log_context`) are used when there is one.
        Extra keyword fields are added after the standard ones."""
        if trace_id is None:
            context = current_log_context.get()
            if context is not None:
                trace_id, span_id = context
        if status < 500 and flags == NO_FLAGS and not sampled(self.sample, trace_id):
            return False
        if "?" in path:
            path = path.partition("?")[0]
        if self._logger is not None:
            self._logger.info(
                "access",
                direction=direction,
                method=method,
                path=path,
                route=route,
                status=status,
                flags=flags,
                duration_ms=round(duration_ms, 3),
                request_bytes=request_bytes,
                response_bytes=response_bytes,
                caller=caller,
                destination=destination,
                upstream=upstream,
                trace_id=trace_id,
                span_id=span_id,
                request_id=request_id,
                **extra,
            )
            return True
        v = _json_value
        self._sink.msg(
            _LINE
            % (
                self._clock.now(),
                v(direction),
                v(method),
                v(path),
                v(route),
                v(status),
                v(flags),
                v(round(duration_ms, 3)),
                v(request_bytes),
                v(response_bytes),
                v(caller),
                v(destination),
                v(upstream),
                v(trace_id),
                v(span_id),
                v(request_id),
                "," + render_json_line(None, "info", extra)[1:-1] if extra else "",
            )
        )
        return True
