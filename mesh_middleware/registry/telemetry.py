"""The registry's telemetry: edge reports merged into rolling windows, golden metrics out.

Reports (docs/registry-api.md, "Telemetry") are filed into 10-second buckets by the time
they describe on the registry's own clock (arrival minus the report's ``age``), kept for 5
minutes, and never stored: after a restart the picture is rebuilt from the next reports.

An edge ``A -> B`` can be reported twice: by A (its outbound view, ``reporter: "source"``) and
by B (its inbound view, ``reporter: "destination"``). The two are kept apart, never added:
a service's golden metrics come from what it reported itself as a destination (what it served),
else from what its callers saw; an edge's from its source's view (which includes the requests
that never reached the destination), else from its destination's.

Reports also carry what the mesh did on an edge (faults injected, retries) and the requests
their reporter refused (denials, with the rule that decided): counts ride in the edges'
buckets; the newest ``MAX_DENIALS`` denials are kept in a ring, for the dashboard.

Memory is bounded: at most ``max_edges`` (source, destination, reporter) keys and ``max_names``
distinct names; buckets older than the retention are dropped, and an edge without buckets with
them. Reports that would go past a cap lose the edges that do not fit (counted).
"""

from __future__ import annotations

import math
import operator
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from prometheus_client import Counter, Gauge
from pydantic import BaseModel, ConfigDict, Field, model_validator

from mesh_middleware.identity.spiffe import SERVICE_NAME_PATTERN
from mesh_middleware.registry import metrics
from mesh_middleware.registry.models import INSTANCE_ID
from mesh_middleware.telemetry.wire import (
    ANONYMOUS,
    EDGE_NAME_PATTERN,
    LATENCY_BUCKETS,
    MAX_DENIAL_PATH,
    MAX_DENIAL_REASON,
    MAX_REPORT_DENIALS,
    MAX_REPORT_EDGES,
    STATUS_CLASSES,
)

__all__ = [
    "BUCKET_SECONDS",
    "MAX_DENIALS",
    "MAX_EDGES",
    "MAX_NAMES",
    "MAX_REPORT_BYTES",
    "MAX_WINDOW_SECONDS",
    "RETENTION_SECONDS",
    "Denial",
    "EdgeReport",
    "LatencyHistogram",
    "Merged",
    "Telemetry",
    "TelemetryReport",
    "histogram_quantile",
]

BUCKET_SECONDS = 10.0
RETENTION_SECONDS = 300.0
MAX_WINDOW_SECONDS = RETENTION_SECONDS
MAX_EDGES = 5000
MAX_NAMES = 2000
MAX_DENIALS = 200
MAX_REPORT_BYTES = 2 * 1024 * 1024
_MAX_COUNT = 10**12
_MAX_AGE = 86400.0

REPORTS = Counter(
    "mesh_registry_telemetry_reports",
    "Telemetry reports by result: accepted, rejected (refused with a 4xx), stale (older than "
    "the retention, accepted and ignored).",
    ["result"],
    registry=metrics.REGISTRY,
)
EDGES_DROPPED = Counter(
    "mesh_registry_telemetry_edges_dropped",
    "Edges of accepted reports left out because the edge or name caps were reached.",
    registry=metrics.REGISTRY,
)
EDGES = Gauge(
    "mesh_registry_telemetry_edges",
    "Edges (source, destination, reporter side) held in the rolling windows.",
    registry=metrics.REGISTRY,
)

# -- the report body ---------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


_Count = Annotated[int, Field(ge=0, le=_MAX_COUNT)]
_EdgeName = Annotated[str, Field(pattern=EDGE_NAME_PATTERN)]
_StatusClass = Literal["1xx", "2xx", "3xx", "4xx", "5xx", "error"]


class LatencyHistogram(_Body):
    """Requests per latency bucket (not cumulative) and the sum of their latencies (seconds)."""

    buckets: Annotated[
        list[float], Field(description="Upper bounds; must be DESIGN section 6's, in order.")
    ]
    counts: Annotated[
        list[_Count],
        Field(
            min_length=len(LATENCY_BUCKETS) + 1,
            max_length=len(LATENCY_BUCKETS) + 1,
            description="One count per bound, then the requests slower than the last bound.",
        ),
    ]
    sum: Annotated[float, Field(ge=0, le=1e15)]

    @model_validator(mode="after")
    def _standard(self) -> LatencyHistogram:
        if tuple(self.buckets) != LATENCY_BUCKETS:
            raise ValueError(f"buckets must be {list(LATENCY_BUCKETS)}")
        return self


class Faults(_Body):
    """Faults the destination's policy injected on the edge."""

    abort: _Count = 0
    delay: _Count = 0


class EdgeReport(_Body):
    """The requests of one edge ``source -> destination`` during the report's window."""

    source: _EdgeName
    destination: _EdgeName
    counts: Annotated[dict[_StatusClass, _Count], Field(max_length=len(STATUS_CLASSES))]
    latency: LatencyHistogram
    faults: Faults | None = None
    retries: Annotated[_Count, Field(description="Retries the source made on the edge.")] = 0

    @model_validator(mode="after")
    def _consistent(self) -> EdgeReport:
        if sum(self.counts.values()) != sum(self.latency.counts):
            raise ValueError("the status counts and the latency counts disagree")
        return self


class Denial(_Body):
    """One request the reporter refused (401, 403 or 400), and what decided it."""

    at: Annotated[float, Field(ge=0, le=1e11, description="When, on the reporter's clock.")]
    source: _EdgeName
    method: Annotated[str, Field(pattern=r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,16}$")]
    path: Annotated[str, Field(min_length=1, max_length=MAX_DENIAL_PATH)]
    status: Annotated[int, Field(ge=400, le=499)]
    rule: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    line: Annotated[int, Field(ge=1, le=10**7)] | None = None
    reason: Annotated[str, Field(max_length=MAX_DENIAL_REASON)] = ""


class TelemetryReport(_Body):
    """One process's edges over one window (``POST /v1/telemetry/reports``)."""

    reporter: Annotated[str, Field(pattern=SERVICE_NAME_PATTERN)]
    instance: Annotated[str, Field(pattern=INSTANCE_ID.pattern)] | None = None
    window_start: Annotated[float, Field(ge=0, le=1e11)]
    window_seconds: Annotated[float, Field(ge=0, le=_MAX_AGE)]
    age: Annotated[
        float,
        Field(ge=0, le=_MAX_AGE, description="Seconds since the window ended, when sent."),
    ] = 0.0
    edges: Annotated[list[EdgeReport], Field(max_length=MAX_REPORT_EDGES)]
    denials: Annotated[list[Denial], Field(max_length=MAX_REPORT_DENIALS)] = []

    @model_validator(mode="after")
    def _own_edges(self) -> TelemetryReport:
        for i, edge in enumerate(self.edges):
            if self.reporter not in (edge.source, edge.destination):
                raise ValueError(
                    f"edges.{i}: {self.reporter!r} may only report edges it is the source or "
                    "the destination of"
                )
        return self


# -- the rolling windows -----------------------------------------------------------------------

# One aggregate is a flat list: [1xx, 2xx, 3xx, 4xx, 5xx, error, bucket 0 .. bucket 14, sum,
# aborts, delays, retries].
_N_CLASSES = len(STATUS_CLASSES)
_N_BUCKETS = len(LATENCY_BUCKETS) + 1
_SUM = _N_CLASSES + _N_BUCKETS
_ABORTS, _DELAYS, _RETRIES = _SUM + 1, _SUM + 2, _SUM + 3
_FAILED = (STATUS_CLASSES.index("5xx"), STATUS_CLASSES.index("error"))
_QUANTILES = (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))

_Key = tuple[str, str, str]  # source, destination, "source" | "destination"
_Point = tuple[float, float | None, float | None, float | None]  # rps, success, p50, p99
_NO_POINT: _Point = (0.0, None, None, None)


@dataclass(frozen=True, slots=True)
class Merged:
    """What became of a report."""

    accepted: int
    dropped: int
    stale: bool


class Telemetry:
    """Rolling windows of edge aggregates, with caps on edges and names."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        bucket_seconds: float = BUCKET_SECONDS,
        retention: float = RETENTION_SECONDS,
        max_edges: int = MAX_EDGES,
        max_names: int = MAX_NAMES,
        max_denials: int = MAX_DENIALS,
    ) -> None:
        self._clock = clock
        self.bucket_seconds = bucket_seconds
        self.retention = retention
        self.max_edges = max_edges
        self.max_names = max_names
        self._slots_kept = math.ceil(retention / bucket_seconds)
        self._started = clock()
        self._edges: dict[_Key, dict[int, list[Any]]] = {}
        self._names: dict[str, int] = {}  # name -> edges naming it
        self._pruned_at = self._slot(self._started)
        # The series' points of whole buckets, computed once: a bucket a report adds to
        # loses its point, one the retention drops loses it too.
        self._points: dict[tuple[_Key, int], _Point] = {}
        # (registry time received, destination, denial), newest last.
        self._denials: deque[tuple[float, str, Denial]] = deque(maxlen=max_denials)

    def _slot(self, at: float) -> int:
        return math.floor(at / self.bucket_seconds)

    @property
    def edge_count(self) -> int:
        return len(self._edges)

    @property
    def name_count(self) -> int:
        return len(self._names)

    # -- writing -----------------------------------------------------------------------------

    def merge(self, report: TelemetryReport) -> Merged:
        """Add a report's edges to the bucket of the time it describes."""
        now = self._clock()
        self._prune(now)
        at = now - report.age
        if at <= now - self.retention:
            REPORTS.labels("stale").inc()
            return Merged(0, 0, True)
        slot = self._slot(at)
        accepted = dropped = 0
        for edge in report.edges:
            side = "source" if edge.source == report.reporter else "destination"
            key = (edge.source, edge.destination, side)
            slots = self._edges.get(key)
            if slots is None:
                if not self._room_for(key):
                    dropped += 1
                    continue
                slots = self._edges[key] = {}
                for name in {edge.source, edge.destination}:
                    self._names[name] = self._names.get(name, 0) + 1
            agg = slots.get(slot)
            if agg is None:
                agg = slots[slot] = _empty()
            for name, count in edge.counts.items():
                agg[STATUS_CLASSES.index(name)] += count
            for i, count in enumerate(edge.latency.counts):
                agg[_N_CLASSES + i] += count
            agg[_SUM] += edge.latency.sum
            if edge.faults is not None:
                agg[_ABORTS] += edge.faults.abort
                agg[_DELAYS] += edge.faults.delay
            agg[_RETRIES] += edge.retries
            self._points.pop((key, slot), None)
            accepted += 1
        for denial in sorted(report.denials, key=operator.attrgetter("at")):
            self._denials.append((at, report.reporter, denial))
        if dropped:
            EDGES_DROPPED.inc(dropped)
        EDGES.set(len(self._edges))
        REPORTS.labels("accepted").inc()
        return Merged(accepted, dropped, False)

    def _room_for(self, key: _Key) -> bool:
        if len(self._edges) >= self.max_edges:
            return False
        new = {key[0], key[1]} - self._names.keys()
        return len(self._names) + len(new) <= self.max_names

    def expire(self) -> None:
        """Drop the buckets older than the retention (the maintenance loop calls this)."""
        self._prune(self._clock())

    def _prune(self, now: float) -> None:
        current = self._slot(now)
        if current == self._pruned_at:
            return
        self._pruned_at = current
        oldest = current - self._slots_kept
        for key in list(self._edges):
            slots = self._edges[key]
            for slot in [s for s in slots if s < oldest]:
                del slots[slot]
            if not slots:
                del self._edges[key]
                for name in {key[0], key[1]}:
                    left = self._names[name] - 1
                    if left:
                        self._names[name] = left
                    else:
                        del self._names[name]
        if self._points:
            self._points = {k: v for k, v in self._points.items() if k[1] >= oldest}
        EDGES.set(len(self._edges))

    # -- reading -----------------------------------------------------------------------------

    def _window(self, now: float, window: float) -> tuple[int, float]:
        """The first bucket a window includes (the current one is included, partly filled),
        and the seconds those buckets cover: from the first one's start (or the registry's
        start, if later) to now, at least one bucket."""
        current = self._slot(now)
        slots = max(1, min(math.ceil(window / self.bucket_seconds), self._slots_kept))
        first = current - slots + 1
        since = max(first * self.bucket_seconds, self._started)
        return first, max(now - since, min(self.bucket_seconds, window))

    def _totals(self, first: int) -> dict[_Key, list[Any]]:
        out: dict[_Key, list[Any]] = {}
        for key, slots in self._edges.items():
            total: list[Any] | None = None
            for slot, agg in slots.items():
                if slot >= first:
                    if total is None:
                        total = _empty()
                    _add(total, agg)
            if total is not None:
                out[key] = total
        return out

    def denials(self, window: float, limit: int = 50) -> list[dict[str, Any]]:
        """The newest denials received in the last ``window`` seconds, newest first."""
        since = self._clock() - window
        out: list[dict[str, Any]] = []
        for received, destination, denial in reversed(self._denials):
            if received < since or len(out) >= limit:
                break
            out.append({**denial.model_dump(), "destination": destination})
        return out

    def series(self, wall_now: float) -> dict[tuple[str, str], dict[str, Any]]:
        """Per edge, over the retention, one point per bucket (oldest first): requests/s,
        success rate, p50 and p99 (``None`` where there were no requests). ``start`` is the
        first bucket's start on the wall clock ``wall_now`` reads now."""
        now = self._clock()
        self._prune(now)
        current = self._slot(now)
        first = current - self._slots_kept + 1
        start = round(wall_now - (now - first * self.bucket_seconds), 3)
        out: dict[tuple[str, str], dict[str, Any]] = {}
        for key, slots in self._edges.items():
            source, destination, side = key
            # The source's view when there is one, as for the edges' golden metrics.
            if side == "destination" and (source, destination, "source") in self._edges:
                continue
            rps: list[float] = []
            success: list[float | None] = []
            p50: list[float | None] = []
            p99: list[float | None] = []
            for slot in range(first, current + 1):
                agg = slots.get(slot)
                if agg is None:
                    point: _Point = _NO_POINT
                elif slot == current:  # still filling: never kept
                    point = _point(agg, max(now - slot * self.bucket_seconds, 1.0))
                else:
                    found = self._points.get((key, slot))
                    if found is None:
                        found = self._points[(key, slot)] = _point(agg, self.bucket_seconds)
                    point = found
                rps.append(point[0])
                success.append(point[1])
                p50.append(point[2])
                p99.append(point[3])
            out[(source, destination)] = {
                "start": start,
                "step": self.bucket_seconds,
                "rps": rps,
                "success_rate": success,
                "p50": p50,
                "p99": p99,
            }
        return out

    def services(
        self, window: float, catalog: Sequence[dict[str, Any]]
    ) -> tuple[float, list[dict[str, Any]]]:
        """The seconds covered, and per service (registered, or named by an edge in the
        window, except ``anonymous``) its golden metrics and instances."""
        span, _, nodes = self._view(window, catalog)
        return span, [n for n in nodes if n["service"] != ANONYMOUS]

    def topology(
        self, window: float, catalog: Sequence[dict[str, Any]]
    ) -> tuple[float, list[dict[str, Any]], list[dict[str, Any]]]:
        """The seconds covered, the nodes (every service, ``anonymous`` included when it
        called), and the edges with their golden metrics."""
        span, edges, nodes = self._view(window, catalog)
        return span, nodes, edges

    def _view(
        self, window: float, catalog: Sequence[dict[str, Any]]
    ) -> tuple[float, list[dict[str, Any]], list[dict[str, Any]]]:
        now = self._clock()
        self._prune(now)
        first, span = self._window(now, window)
        totals = self._totals(first)
        edges: list[dict[str, Any]] = []
        served: dict[str, list[Any]] = {}  # destination -> what it reported serving
        seen: dict[str, list[Any]] = {}  # destination -> what its callers saw
        names: set[str] = set()
        for (source, destination, side), agg in totals.items():
            names.update((source, destination))
            by_destination = served if side == "destination" else seen
            _add(by_destination.setdefault(destination, _empty()), agg)
        pairs = sorted({(s, d) for s, d, _ in totals})
        for source, destination in pairs:
            side = "source" if (source, destination, "source") in totals else "destination"
            agg = totals[(source, destination, side)]
            golden = _golden(agg, span, side)
            # Each side knows what it did itself: the destination its faults, the source its
            # retries.
            served_view = totals.get((source, destination, "destination"))
            if served_view is not None:
                golden["faults"] = {"abort": served_view[_ABORTS], "delay": served_view[_DELAYS]}
            edges.append({"source": source, "destination": destination, **golden})
        registered = {str(s["name"]): s for s in catalog}
        nodes: list[dict[str, Any]] = []
        for name in sorted(names | registered.keys()):
            entry = registered.get(name)
            instances = int(entry["instances"]) if entry else 0
            healthy = int(entry["healthy"]) if entry else 0
            if name in served:
                golden = _golden(served[name], span, "destination")
            elif name in seen:
                golden = _golden(seen[name], span, "source")
            else:
                golden = _golden(_empty(), span, None)
            nodes.append(
                {
                    "service": name,
                    "registered": entry is not None,
                    "instances": instances,
                    "healthy_instances": healthy,
                    "healthy": healthy > 0,
                    **golden,
                }
            )
        return round(span, 3), edges, nodes


def _empty() -> list[Any]:
    return [0] * _SUM + [0.0, 0, 0, 0]


def _add(total: list[Any], agg: Sequence[Any]) -> None:
    total[:] = map(operator.add, total, agg)


def _point(agg: Sequence[Any], seconds: float) -> _Point:
    requests = sum(agg[:_N_CLASSES])
    if not requests:
        return _NO_POINT
    failed = sum(agg[i] for i in _FAILED)
    histogram = agg[_N_CLASSES:_SUM]
    p50 = histogram_quantile(0.5, histogram)
    p99 = histogram_quantile(0.99, histogram)
    return (
        round(requests / seconds, 3),
        round((requests - failed) / requests, 6),
        None if p50 is None else round(p50, 6),
        None if p99 is None else round(p99, 6),
    )


def _golden(agg: Sequence[Any], span: float, reporter: str | None) -> dict[str, Any]:
    requests = sum(agg[:_N_CLASSES])
    failed = sum(agg[i] for i in _FAILED)
    histogram = agg[_N_CLASSES:_SUM]
    latency = {}
    for name, q in _QUANTILES:
        value = histogram_quantile(q, histogram)
        latency[name] = None if value is None else round(value, 6)
    return {
        "requests": requests,
        "rps": round(requests / span, 3) if span > 0 else 0.0,
        "success_rate": round((requests - failed) / requests, 6) if requests else None,
        "counts": {name: agg[i] for i, name in enumerate(STATUS_CLASSES) if agg[i]},
        "latency": latency,
        "latency_sum": round(agg[_SUM], 6),
        "faults": {"abort": agg[_ABORTS], "delay": agg[_DELAYS]},
        "retries": agg[_RETRIES],
        "reporter": reporter,
    }


def histogram_quantile(
    q: float, counts: Sequence[int], bounds: Iterable[float] = LATENCY_BUCKETS
) -> float | None:
    """The ``q``-quantile of a histogram (per-bucket counts, the last one unbounded), as
    Prometheus's ``histogram_quantile`` computes it: linear interpolation inside the bucket
    where the rank falls, 0 as the first bucket's lower bound, and the last finite bound when
    the rank falls in the unbounded bucket. ``None`` for an empty histogram."""
    uppers = list(bounds)
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    cumulative = 0
    for i, upper in enumerate(uppers):
        count = counts[i]
        if cumulative + count >= rank and count > 0:
            lower = uppers[i - 1] if i > 0 else 0.0
            return lower + (upper - lower) * ((rank - cumulative) / count)
        cumulative += count
    return uppers[-1]
