"""Access logs: one JSON line per request, sampled per trace, cheap enough for every request.

The line is rendered without the app's structlog configuration: a fixed template of the
standard fields (extras rendered by :func:`render_json_line`, a structlog renderer), so it is
JSON whatever the app configured, and costs a few microseconds: the fields arrive complete with
each call, so a bound logger's context machinery would only add cost. Pass ``logger=`` to send
the fields through a structlog logger of your own (and its processors) instead.

Lines are written one at a time, or with ``flush_interval`` (the middlewares use the policy's,
1 s by default) buffered: written together once 256 wait, ``flush_interval`` after the first,
when the Mesh closes and at exit, as Envoy buffers its file access logs. A write per line is a
system call per request, which costs more than the rest of the line.

Sampling keeps a fraction ``sample`` of ordinary requests. With a trace id the choice is a
function of the id alone, the rule of OpenTelemetry's ``TraceIdRatioBased`` sampler (the lower
64 bits of the id below ``sample * 2**64``): every service of a trace keeps or drops its lines
together, and a trace sampled by a tracer at the same ratio has its access lines too. Without a
trace id the choice is random. Server errors (5xx) and requests with response flags are always
logged.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import random
import sys
import threading
import time
import weakref
import zlib
from collections import deque
from itertools import repeat, starmap
from json.encoder import encode_basestring_ascii as _quote
from typing import Any, Protocol, TextIO

from mesh_middleware.telemetry.flush_timer import FlushTimer, Handle
from mesh_middleware.telemetry.log_context import current_log_context
from mesh_middleware.telemetry.metrics import NO_FLAGS

__all__ = [
    "FIELDS",
    "MAX_BUFFERED_LINES",
    "AccessLog",
    "flush_access_logs",
    "render_json_line",
    "sampled",
]

FIELDS = (
    "ts",
    "level",
    "logger",
    "event",
    "direction",
    "method",
    "route",
    "status",
    "flags",
    "caller",
    "destination",
    "upstream",
    "path",
    "duration_ms",
    "request_bytes",
    "response_bytes",
    "trace_id",
    "span_id",
    "request_id",
)
"""Every line's keys, in order (fields passed as extras follow them)."""

_TRACE_ID_LIMIT = 1 << 64
_HUGE = 1e15  # a duration beyond this (or NaN) is no number worth writing
_THOUSANDTHS = tuple(f".{n:03d}" for n in range(1000))

MAX_BUFFERED_LINES = 256
"""Buffered lines that are written at once, without waiting for the flush interval."""


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
_FixedFields = tuple[str, str, str | None, int, str, str | None, str | None, str | None]
_KNOWN_PARTS: dict[_FixedFields, str] = {}
_MAX_KNOWN_PARTS = 4096


_Q = '"'


def _inside_quotes(value: str) -> str:
    """``value`` as it appears between the quotes of a JSON string."""
    return value if value.isalnum() and value.isascii() else _quote(value)[1:-1]


def _fixed_part(key: _FixedFields) -> str:
    """The JSON of a line's fields from ``level`` to ``upstream``, remembered (up to a bound)
    for the next line that has the same."""
    direction, method, route, status, flags, caller, destination, upstream = key
    fixed = (
        f'"level":"info","logger":"mesh.access","event":"access","direction":{_quote(direction)},'
        f'"method":{_quote(method)},"route":{_or_null(route)},"status":{status},'
        f'"flags":{_quote(flags)},"caller":{_or_null(caller)},'
        f'"destination":{_or_null(destination)},"upstream":{_or_null(upstream)}'
    )
    if len(_KNOWN_PARTS) < _MAX_KNOWN_PARTS:
        _KNOWN_PARTS[key] = fixed
    return fixed


def _or_null(value: str | None) -> str:
    return "null" if value is None else _quote(value)


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


class _Clock:
    """ISO 8601 UTC timestamps with milliseconds: formatted once per millisecond, the seconds
    once per second (busy servers log several lines a millisecond)."""

    __slots__ = ("_millis", "_prefix", "_second", "_stamp")

    def __init__(self) -> None:
        self._millis = -1
        self._stamp = ""
        self._second = -1
        self._prefix = ""

    def now(self) -> str:
        millis = time.time_ns() // 1_000_000
        if millis == self._millis:
            return self._stamp
        second = millis // 1000
        if second != self._second:
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second))
            self._second = second
        stamp = self._stamp = self._prefix + _MILLIS[millis - second * 1000]
        self._millis = millis
        return stamp


_MILLIS = tuple(f"{n:03d}Z" for n in range(1000))


class _Sink:
    """Writes lines to a stream: each at once, or buffered (see the module's docstring)."""

    __slots__ = ("_handle", "_interval", "_lines", "_lock", "_stream", "_timer")

    def __init__(self, stream: TextIO, interval: float) -> None:
        self._stream = stream
        self._interval = interval
        # A deque: appending and popping are atomic, so a request never takes a lock to log.
        self._lines: deque[str] = deque()
        self._lock = threading.Lock()
        self._timer = FlushTimer(interval)
        self._handle = Handle(self)
        if interval > 0:
            _SINKS.add(self._handle)

    def write(self, line: str) -> None:
        if self._interval <= 0:
            with self._lock:
                self._stream.write(line + "\n")
                self._stream.flush()
            return
        lines = self._lines
        lines.append(line)
        if len(lines) >= MAX_BUFFERED_LINES:
            self.flush()
        elif not self._timer.armed:
            self._arm()

    def _arm(self) -> None:
        self._timer.arm(self.flush, self._pending)

    def _pending(self) -> bool:
        return bool(self._lines)

    def flush(self) -> None:
        with self._lock:
            lines = self._lines
            # Lines added meanwhile wait their turn; starmap calls popleft in C.
            taken = list(starmap(lines.popleft, repeat((), len(lines))))
            if not taken:
                return
            try:
                self._stream.write("\n".join(taken) + "\n")
                self._stream.flush()
            except (OSError, ValueError):  # the stream was closed (at exit, say): lines lost
                pass

    def forget(self) -> None:
        """In a forked child: the lines are the parent's to write, and no timer runs here."""
        self._lines.clear()
        self._timer.forget()
        self._lock = threading.Lock()


_SINKS: weakref.WeakSet[Handle[_Sink]] = weakref.WeakSet()


def flush_access_logs() -> None:
    """Write every buffered access line now (the Mesh calls it on close; it runs at exit)."""
    for handle in list(_SINKS):
        handle.owner.flush()


def _after_fork_in_child() -> None:
    for handle in list(_SINKS):
        handle.owner.forget()


atexit.register(flush_access_logs)
os.register_at_fork(after_in_child=_after_fork_in_child)


class AccessLog:
    """Writes access lines; one per process, shared by the inbound and outbound sides.

    ``sample`` is the fraction (0-1) of ordinary requests kept. ``stream`` is where the lines
    are written (default: ``sys.stderr`` as it is at construction), each at once or, with
    ``flush_interval`` seconds, buffered; ``logger`` replaces that with a structlog logger of
    your own, called as ``logger.info("access", **fields)``.
    """

    __slots__ = ("_clock", "_logger", "_sink", "sample")

    def __init__(
        self,
        sample: float = 1.0,
        logger: _Logger | None = None,
        *,
        stream: TextIO | None = None,
        flush_interval: float = 0.0,
    ) -> None:
        if not 0.0 <= sample <= 1.0:
            raise ValueError(f"sample must be between 0 and 1, got {sample!r}")
        self.sample = sample
        self._logger = logger
        self._sink = _Sink(stream if stream is not None else sys.stderr, flush_interval)
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
            context = current_log_context()
            if context is not None:
                trace_id, span_id = context
        if self._logger is None:
            # The line takes whole numbers, and ids as they sit between quotes; a logger of
            # your own gets the fields as they were given.
            status, request_bytes, response_bytes = (
                int(status),
                int(request_bytes),
                int(response_bytes),
            )
            trace_id = None if trace_id is None else _inside_quotes(trace_id)
            span_id = None if span_id is None else _inside_quotes(span_id)
        return self.entry(
            direction,
            method,
            path,
            route,
            status,
            flags,
            duration_ms,
            request_bytes,
            response_bytes,
            caller,
            destination,
            upstream,
            trace_id,
            span_id,
            request_id,
            extra,
        )

    def entry(
        self,
        direction: str,
        method: str,
        path: str,
        route: str | None,
        status: int,
        flags: str,
        duration_ms: float,
        request_bytes: int,
        response_bytes: int,
        caller: str | None,
        destination: str | None,
        upstream: str | None,
        trace_id: str | None,
        span_id: str | None,
        request_id: str | None,
        extra: dict[str, Any] | None = None,
    ) -> bool:
        """:meth:`log` for the mesh's own telemetry, which calls it for every request.

        Positional, and ``trace_id`` and ``span_id`` must be ``None`` or hex ids (a
        :class:`~mesh_middleware.telemetry.tracecontext.SpanContext`'s), written without
        escaping; ``request_id`` may be anything."""
        logger = self._logger
        if logger is not None:  # the fields go to a structlog logger of your own
            if status < 500 and flags == NO_FLAGS and not sampled(self.sample, trace_id):
                return False
            fields = dict(
                zip(
                    FIELDS[4:],
                    (
                        direction,
                        method,
                        route,
                        status,
                        flags,
                        caller,
                        destination,
                        upstream,
                        path.partition("?")[0],
                        round(duration_ms, 3),
                        request_bytes,
                        response_bytes,
                        trace_id,
                        span_id,
                        request_id,
                    ),
                    strict=True,
                )
            )
            logger.info("access", **fields, **(extra or {}))
            return True
        sample = self.sample
        if status < 500 and flags == NO_FLAGS and sample < 1.0 and not sampled(sample, trace_id):
            return False
        if "?" in path:
            path = path.partition("?")[0]
        if request_id is None:
            request_json = "null"
        elif request_id is trace_id:  # hex, or already escaped
            request_json = f'"{request_id}"'
        else:
            request_json = _quote(request_id)
        if 0.0 <= duration_ms < _HUGE:
            # Whole microseconds, written from a table: a float format spec costs 4 times as much.
            micros = int(duration_ms * 1000.0 + 0.5)
            duration = f"{micros // 1000}{_THOUSANDTHS[micros % 1000]}"
        else:
            duration = f"{duration_ms:.3f}" if -_HUGE < duration_ms < 0.0 else "null"
        # What identifies the edge and the outcome repeats from line to line: its JSON is
        # remembered as one piece, and only the rest is rendered per line.
        key = (direction, method, route, status, flags, caller, destination, upstream)
        fixed = _KNOWN_PARTS.get(key)
        if fixed is None:
            fixed = _fixed_part(key)
        line = (
            f'{{"ts":"{self._clock.now()}",{fixed},"path":{_quote(path)},"duration_ms":{duration},'
            f'"request_bytes":{request_bytes},"response_bytes":{response_bytes},'
            f'"trace_id":{"null" if trace_id is None else f"{_Q}{trace_id}{_Q}"},'
            f'"span_id":{"null" if span_id is None else f"{_Q}{span_id}{_Q}"},'
            f'"request_id":{request_json}'
            f"{',' + render_json_line(None, 'info', extra)[1:-1] if extra else ''}}}"
        )
        self._sink.write(line)
        return True
