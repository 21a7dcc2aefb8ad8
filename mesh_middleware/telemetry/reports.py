"""Per-edge telemetry reports: aggregated on the request path, sent to the registry in the
background (docs/registry-api.md, "Telemetry").

The request path calls :meth:`EdgeReporter.record` once per request and direction (outbound:
this service -> the destination; inbound: the caller -> this service, ``"anonymous"`` for a
caller without identity). It costs one dict lookup and a few increments under a lock held for
well under a microsecond; it never blocks on the network and never raises.

The background thread calls :meth:`EdgeReporter.tick` on each of its ticks: every ``interval``
seconds the aggregates are swapped out into a report, queued (at most ``max_pending``; the
oldest is dropped and counted when full) and sent with ``send``. A report that could not be
sent (the registry is down) stays queued for the next attempt; one the registry refused (4xx)
is dropped and counted, since sending it again would not help::

    reporter = EdgeReporter(lambda body: registry_client.report(body), service="orders")
    reporter.record("orders", "inventory", 200, 0.012)   # per request
    reporter.tick()                                      # per background tick
    reporter.tick(force=True)                            # at shutdown: send what is left

Requests the mesh refused, faults it injected and retries it made are rarer and are reported
beside the edges (:meth:`EdgeReporter.denied`, :meth:`EdgeReporter.faulted`,
:meth:`EdgeReporter.retried`): the newest ``MAX_REPORT_DENIALS`` denials of a window, and per
edge the counts of aborts, delays and retries. The registry's dashboard shows them.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from bisect import bisect_left
from collections import deque
from collections.abc import Callable
from typing import Any

import structlog
from prometheus_client import Counter

from mesh_middleware.runtime.registry_client import RegistryRefused
from mesh_middleware.telemetry.wire import (
    ANONYMOUS,
    EDGE_NAME,
    LATENCY_BUCKETS,
    MAX_DENIAL_PATH,
    MAX_DENIAL_REASON,
    MAX_REPORT_DENIALS,
    MAX_REPORT_EDGES,
    STATUS_CLASSES,
)

__all__ = [
    "ANONYMOUS",
    "EDGES_DROPPED",
    "LATENCY_BUCKETS",
    "MAX_REPORT_EDGES",
    "REPORTS_DROPPED",
    "STATUS_CLASSES",
    "EdgeReporter",
]

log = structlog.get_logger("mesh.telemetry")

REPORTS_DROPPED = Counter(
    "mesh_telemetry_reports_dropped",
    "Telemetry reports dropped: the queue was full (registry unreachable) or the registry refused.",
    ["service"],
)
EDGES_DROPPED = Counter(
    "mesh_telemetry_edges_dropped",
    "Recorded requests left out of telemetry reports: their edge did not fit under max_edges, "
    "or named no valid service or host.",
    ["service"],
)

# One aggregate is a flat list: [1xx, 2xx, 3xx, 4xx, 5xx, error, bucket 0 .. bucket 14, sum].
_N_CLASSES = len(STATUS_CLASSES)
_N_BUCKETS = len(LATENCY_BUCKETS) + 1  # the last counts requests slower than the last bound
_SUM = _N_CLASSES + _N_BUCKETS
_ERROR = _N_CLASSES - 1
# status // 100 -> index of its class; anything outside 100..599 is an "error" (no answer).
_CLASS_OF = (_ERROR, 0, 1, 2, 3, 4)
_MAX_SECONDS = 3600.0
# Per edge, what the mesh itself did: [aborts injected, delays injected, retries].
_ABORT, _DELAY, _RETRY = 0, 1, 2


class EdgeReporter:
    """Aggregates requests per (source, destination) edge and sends them as reports."""

    def __init__(
        self,
        send: Callable[[dict[str, Any]], None],
        *,
        service: str,
        interval: float = 10.0,
        max_edges: int = 1000,
        max_pending: int = 6,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        instance: str | None = None,
    ) -> None:
        if not 1 <= max_edges <= MAX_REPORT_EDGES:
            raise ValueError(f"max_edges must be between 1 and {MAX_REPORT_EDGES}")
        if max_pending < 1:
            raise ValueError("max_pending must be at least 1")
        if interval <= 0:
            raise ValueError("interval must be positive")
        self.send = send
        self.service = service
        self.instance = instance
        self.interval = interval
        self.max_edges = max_edges
        self.max_pending = max_pending
        self._clock = clock
        self._wall_clock = wall_clock
        self.dropped_reports = 0
        self.dropped_edges = 0
        self._reports_dropped = REPORTS_DROPPED.labels(service)
        self._edges_dropped = EDGES_DROPPED.labels(service)
        self._lock = threading.Lock()  # the aggregates, and their swap
        self._sending = threading.Lock()  # the queue, and one tick at a time
        self._edges: dict[tuple[str, str], list[Any]] = {}
        self._actions: dict[tuple[str, str], list[int]] = {}
        self._denials: deque[dict[str, Any]] = deque(maxlen=MAX_REPORT_DENIALS)
        self._window_started = clock()
        self._window_started_wall = wall_clock()
        # Queued reports with the monotonic time their window ended (to send their age).
        self._pending: deque[tuple[float, dict[str, Any]]] = deque()
        self._next_send = 0.0
        self._refusals: set[str] = set()
        ref = weakref.ref(self)

        def reset_in_child() -> None:
            # A forked worker reports its own requests only; the parent reports what it saw.
            reporter = ref()
            if reporter is not None:
                reporter._lock = threading.Lock()
                reporter._sending = threading.Lock()
                reporter._edges = {}
                reporter._actions = {}
                reporter._denials = deque(maxlen=MAX_REPORT_DENIALS)
                reporter._pending = deque()
                reporter._window_started = reporter._clock()
                reporter._window_started_wall = reporter._wall_clock()

        os.register_at_fork(after_in_child=reset_in_child)

    # -- the request path --------------------------------------------------------------------

    def record(self, source: str, destination: str, status: int, seconds: float) -> None:
        """Count one request on the edge ``source -> destination``: its status class (status 0,
        or anything outside 100..599, is an ``error``: no answer) and its latency."""
        try:
            if not 0.0 <= seconds <= _MAX_SECONDS:  # also NaN
                seconds = _MAX_SECONDS if seconds > _MAX_SECONDS else 0.0
            cls = _CLASS_OF[status // 100] if 100 <= status < 600 else _ERROR
            bucket = _N_CLASSES + bisect_left(LATENCY_BUCKETS, seconds)
            key = (source, destination)
            with self._lock:
                edge = self._edges.get(key)
                if edge is None:
                    if len(self._edges) >= self.max_edges:
                        self.dropped_edges += 1
                        self._edges_dropped.inc()
                        return
                    edge = self._edges[key] = [0] * _SUM + [0.0]
                edge[cls] += 1
                edge[bucket] += 1
                edge[_SUM] += seconds
        except Exception:  # never let telemetry break a request
            pass

    def denied(
        self,
        source: str,
        method: str,
        path: str,
        status: int,
        rule: str | None,
        line: int | None,
        reason: str,
    ) -> None:
        """Remember one request this service refused (``source``: the caller, or
        ``"anonymous"``); the newest :data:`MAX_REPORT_DENIALS` of a window are reported."""
        try:
            denial = {
                "at": round(self._wall_clock(), 3),
                "source": source,
                "method": method[:16],
                "path": path[:MAX_DENIAL_PATH],
                "status": status,
                "rule": rule,
                "line": line,
                "reason": reason[:MAX_DENIAL_REASON],
            }
            with self._lock:
                self._denials.append(denial)
        except Exception:  # never let telemetry break a request
            pass

    def faulted(self, source: str, destination: str, *, abort: bool) -> None:
        """Count a fault injected on the edge: an abort, or else a delay."""
        self._count_action(source, destination, _ABORT if abort else _DELAY)

    def retried(self, source: str, destination: str) -> None:
        """Count a retry the source made on the edge."""
        self._count_action(source, destination, _RETRY)

    def _count_action(self, source: str, destination: str, index: int) -> None:
        try:
            key = (source, destination)
            with self._lock:
                counts = self._actions.get(key)
                if counts is None:
                    if len(self._actions) >= self.max_edges:
                        return
                    counts = self._actions[key] = [0, 0, 0]
                counts[index] += 1
        except Exception:  # never let telemetry break a request
            pass

    # -- the background ----------------------------------------------------------------------

    def flush(self) -> dict[str, Any] | None:
        """Swap the aggregates out and return them as a report (``None`` if nothing happened)."""
        now, wall = self._clock(), self._wall_clock()
        with self._lock:
            edges, self._edges = self._edges, {}
            actions, self._actions = self._actions, {}
            denials, self._denials = self._denials, deque(maxlen=MAX_REPORT_DENIALS)
            started, started_wall = self._window_started, self._window_started_wall
            self._window_started, self._window_started_wall = now, wall
        out: list[dict[str, Any]] = []
        left_out = 0
        for key in actions.keys() - edges.keys():  # the request itself ended in the next window
            if len(edges) >= self.max_edges:
                break
            edges[key] = [0] * _SUM + [0.0]
        for (source, destination), edge in edges.items():
            valid = (source == self.service or destination == self.service) and (
                EDGE_NAME.match(source) is not None and EDGE_NAME.match(destination) is not None
            )
            if not valid:
                left_out += sum(edge[:_N_CLASSES])
                continue
            entry: dict[str, Any] = {
                "source": source,
                "destination": destination,
                "counts": {name: edge[i] for i, name in enumerate(STATUS_CLASSES) if edge[i]},
                "latency": {
                    "buckets": list(LATENCY_BUCKETS),
                    "counts": edge[_N_CLASSES:_SUM],
                    "sum": round(edge[_SUM], 6),
                },
            }
            counts = actions.get((source, destination))
            if counts is not None:
                if counts[_ABORT] or counts[_DELAY]:
                    entry["faults"] = {"abort": counts[_ABORT], "delay": counts[_DELAY]}
                if counts[_RETRY]:
                    entry["retries"] = counts[_RETRY]
            out.append(entry)
        if left_out:
            self.dropped_edges += left_out
            self._edges_dropped.inc(left_out)
        reported = [d for d in denials if EDGE_NAME.match(d["source"]) is not None]
        if not out and not reported:
            return None
        report: dict[str, Any] = {
            "reporter": self.service,
            "instance": self.instance,
            "window_start": round(started_wall, 3),
            "window_seconds": round(max(now - started, 0.0), 3),
            "edges": out,
        }
        if reported:
            report["denials"] = reported
        return report

    def tick(self, *, force: bool = False) -> None:
        """Flush when ``interval`` has passed (or ``force``), then send what is queued, oldest
        first, stopping at the first failure. After a failure the next attempt waits for the
        next flush (or ``force``): a registry that is down is tried once per interval."""
        try:
            with self._sending:
                now = self._clock()
                if force or now - self._window_started >= self.interval:
                    report = self.flush()
                    if report is not None:
                        self._enqueue(now, report)
                    self._next_send = 0.0
                if self._pending and (force or now >= self._next_send):
                    self._send_pending()
        except Exception:  # a bug here must not stop the background thread's other work
            log.exception("telemetry_tick_failed", service=self.service)

    @property
    def pending(self) -> int:
        """Reports waiting to be sent."""
        return len(self._pending)

    @property
    def edges(self) -> int:
        """Edges aggregated in the current window."""
        return len(self._edges)

    def _enqueue(self, ended: float, report: dict[str, Any]) -> None:
        while len(self._pending) >= self.max_pending:
            self._pending.popleft()
            self._drop_report()
        self._pending.append((ended, report))

    def _drop_report(self) -> None:
        self.dropped_reports += 1
        self._reports_dropped.inc()

    def _send_pending(self) -> None:
        while self._pending:
            ended, report = self._pending[0]
            body = {**report, "age": round(max(self._clock() - ended, 0.0), 3)}
            try:
                self.send(body)
            except RegistryRefused as exc:
                self._pending.popleft()
                self._drop_report()
                if exc.reason not in self._refusals and len(self._refusals) < 100:
                    self._refusals.add(exc.reason)
                    log.error("telemetry_refused", service=self.service, reason=str(exc))
                continue
            except Exception:
                self._next_send = self._clock() + self.interval
                return
            self._pending.popleft()
