"""Every metric the mesh exports, defined once (names follow Prometheus conventions).

Counters are declared without their ``_total`` suffix, which prometheus_client adds on
exposition: ``mesh_requests`` is scraped as ``mesh_requests_total``. The request metrics use
Istio's label set (DESIGN §6); :class:`RequestMetrics` is the hot-path recorder for them. The
other metrics each have a small function (``count_retry``, ``set_ejected_endpoints``...), so
callers never touch label order. The reference is docs/observability.md.

Gauges declare a ``multiprocess_mode`` so that under ``PROMETHEUS_MULTIPROC_DIR`` (several
gunicorn/uvicorn workers) the aggregate means something: see
:mod:`mesh_middleware.telemetry.exposition`.
"""

from __future__ import annotations

import atexit
import math
import os
import threading
import weakref
from bisect import bisect_left, bisect_right
from collections import Counter as Tally
from collections import deque
from collections.abc import Callable, Iterable
from itertools import groupby, repeat, starmap
from operator import itemgetter
from typing import Any, Final

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from mesh_middleware.telemetry.flush_timer import FlushTimer, Handle

__all__ = [
    "ALL_FLAGS",
    "AUTHORIZATION_DECISIONS",
    "AUTHORIZATION_DENIALS",
    "BUDGET",
    "BYTE_BUCKETS",
    "CERTIFICATE_EXPIRY",
    "CERTIFICATE_RENEWALS",
    "CIRCUIT_OPEN",
    "CLIENT_GONE",
    "CONNECT_FAILURE",
    "DEADLINE",
    "DENIED",
    "EJECTED_PANIC",
    "FAULTS_INJECTED",
    "FAULT_ABORT",
    "FAULT_DELAY",
    "INVALID_PATH",
    "LABEL_OVERFLOW",
    "LATENCY_BUCKETS",
    "MAX_LABEL_SETS",
    "MAX_OVERFLOW_SETS",
    "METRICS",
    "NO_FLAGS",
    "NO_HEALTHY",
    "OUTBOUND_CIRCUIT_OPEN",
    "OUTBOUND_EJECTED_ENDPOINTS",
    "OUTBOUND_EJECTIONS",
    "OUTBOUND_MIRROR_DROPPED",
    "OUTBOUND_RETRIES",
    "OUTBOUND_RETRY_BUDGET_EXHAUSTED",
    "OVERFLOW",
    "POLICY_RELOADS",
    "REGISTRY_CALLS",
    "REGISTRY_CONNECTED",
    "REGISTRY_STALE_SECONDS",
    "REQUESTS",
    "REQUEST_BYTES",
    "REQUEST_DURATION",
    "REQUEST_LABELS",
    "RESET",
    "RESPONSE_BYTES",
    "RETRIED",
    "SPANS_DROPPED",
    "SPAN_EXPORT_ERRORS",
    "STANDARD_METHODS",
    "TIMEOUT",
    "UNAUTH",
    "RequestMetrics",
    "count_budget_exhausted",
    "count_circuit_open",
    "count_decision",
    "count_denial",
    "count_ejection",
    "count_fault",
    "count_mirror_dropped",
    "count_registry_call",
    "count_reload",
    "count_retry",
    "exposed_names",
    "join_flags",
    "method_label",
    "note_decision",
    "set_ejected_endpoints",
    "set_registry_state",
]

# --- buckets and labels -----------------------------------------------------------------------

# Not Final: mypyc would inline it and then not find it set when the families are made.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
)
"""Request duration buckets in seconds: OpenTelemetry's HTTP semconv defaults (DESIGN §6)."""

BYTE_BUCKETS: tuple[float, ...] = (100.0, 1_000.0, 10_000.0, 100_000.0, 1_000_000.0, 10_000_000.0)
"""Body size buckets in bytes: decades from 100 B to 10 MB (Istio's size buckets, trimmed).

Six finite buckets keep each label set at 9 series per size histogram; a decade is as fine as
a size distribution needs for "which routes move large bodies"."""

REQUEST_LABELS: Final = (
    "reporter",
    "source_service",
    "destination_service",
    "destination_version",
    "route",
    "method",
    "response_code",
    "response_flags",
)
"""Istio's request label set, trimmed (DESIGN §6)."""

STANDARD_METHODS: Final = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)
"""Methods kept as they are in the ``method`` label; any other method is ``OTHER``."""

_METHOD_LABEL: Final = {m: m for m in STANDARD_METHODS}

MAX_LABEL_SETS: Final = 10_000
"""Distinct request label sets one :class:`RequestMetrics` records before it overflows."""

OVERFLOW: Final = "overflow"
"""The ``route`` value (and, past a second cap, every free-form label) of overflowed records."""

MAX_OVERFLOW_SETS: Final = 1_000
"""Overflowed label sets one :class:`RequestMetrics` keeps apart before collapsing the rest."""

# --- response flags (the ``response_flags`` label and the access log's ``flags``) -------------
# A short, comma-joined set like Envoy's %RESPONSE_FLAGS%, always in ALL_FLAGS order.

NO_FLAGS: Final = "-"
"""Nothing out of the ordinary happened."""
DENIED: Final = "DENIED"
"""Inbound authorization refused the request (403), or would have in audit mode."""
UNAUTH: Final = "UNAUTH"
"""No valid mesh identity where one is required, or an invalid one (401)."""
INVALID_PATH: Final = "INVALID_PATH"
"""The path failed normalization (400 before authorization)."""
FAULT_ABORT: Final = "FAULT_ABORT"
"""A fault's abort answered instead of the app."""
FAULT_DELAY: Final = "FAULT_DELAY"
"""A fault's delay held the request first."""
DEADLINE: Final = "DEADLINE"
"""The caller's deadline had passed on arrival (504), or ran out during an outbound call."""
TIMEOUT: Final = "TIMEOUT"
"""An outbound call (or its last try) timed out waiting for the destination."""
RETRIED: Final = "RETRIED"
"""An outbound call took more than one try (whatever its final outcome)."""
BUDGET: Final = "BUDGET"
"""A retry was wanted but the retry budget refused it."""
NO_HEALTHY: Final = "NO_HEALTHY"
"""No instance of the destination (or of the chosen subset) was available."""
EJECTED_PANIC: Final = "EJECTED_PANIC"
"""Every instance was ejected, so the balancer picked among ejected ones (panic routing)."""
CIRCUIT_OPEN: Final = "CIRCUIT_OPEN"
"""The destination's concurrency limit (max_concurrent) refused the call (503)."""
CONNECT_FAILURE: Final = "CONNECT_FAILURE"
"""The outbound connection could not be made."""
RESET: Final = "RESET"
"""The connection broke after the request was sent (reset, refused stream)."""
CLIENT_GONE: Final = "CLIENT_GONE"
"""The caller went away (or cancelled) before the answer was complete."""

ALL_FLAGS: Final = (
    UNAUTH,
    DENIED,
    INVALID_PATH,
    FAULT_DELAY,
    FAULT_ABORT,
    DEADLINE,
    TIMEOUT,
    NO_HEALTHY,
    EJECTED_PANIC,
    CIRCUIT_OPEN,
    CONNECT_FAILURE,
    RESET,
    RETRIED,
    BUDGET,
    CLIENT_GONE,
)
"""Every response flag, in the order :func:`join_flags` writes them."""

_FLAG_ORDER: Final = {flag: i for i, flag in enumerate(ALL_FLAGS)}


def join_flags(flags: Iterable[str]) -> str:
    """The label value for a set of flags: ``-`` for none, else comma-joined in a fixed order.

    Unknown strings are dropped, so the label's values stay a bounded set."""
    known = {flag for flag in flags if flag in _FLAG_ORDER}
    if not known:
        return NO_FLAGS
    return ",".join(sorted(known, key=_FLAG_ORDER.__getitem__))


def method_label(method: str) -> str:
    """The ``method`` label: a standard method as is, anything else ``OTHER``."""
    return _METHOD_LABEL.get(method, "OTHER")


# --- request metrics (Istio's standard metrics) ------------------------------------------------


class _RequestFamilies:
    """The four request metrics and the overflow counter, registered in one registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        # Registered before the metrics, so every collection (a scrape, get_sample_value) first
        # folds the requests counted since the last one into them.
        registry.register(_Flusher())
        self.requests = Counter(
            "mesh_requests",
            "Requests handled (reporter=destination) or sent (reporter=source).",
            REQUEST_LABELS,
            registry=registry,
        )
        self.duration = Histogram(
            "mesh_request_duration_seconds",
            "Request duration in seconds, from the first byte in to the last byte out.",
            REQUEST_LABELS,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.request_bytes = Histogram(
            "mesh_request_bytes",
            "Request body size in bytes.",
            REQUEST_LABELS,
            buckets=BYTE_BUCKETS,
            registry=registry,
        )
        self.response_bytes = Histogram(
            "mesh_response_bytes",
            "Response body size in bytes.",
            REQUEST_LABELS,
            buckets=BYTE_BUCKETS,
            registry=registry,
        )
        self.overflow = Counter(
            "mesh_metrics_label_overflow",
            "Requests recorded under route=overflow because too many distinct label sets were "
            f"seen (more than {MAX_LABEL_SETS} per reporter).",
            ["reporter"],
            registry=registry,
        )


class _Flusher:
    """A collector that yields nothing and folds pending tallies into the request metrics."""

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> list[Any]:
        flush_pending()
        return []


_RECORDERS: weakref.WeakSet[Handle[RequestMetrics]] = weakref.WeakSet()
_FLUSH_SECONDS = 1.0
_MAX_NOTED_REQUESTS = 256  # requests noted before they are tallied without waiting


def flush_pending() -> None:
    """Fold every recorder's pending tallies into the metrics (scrapes do it by themselves;
    with several worker processes each worker also does it at least once a second)."""
    for handle in list(_RECORDERS):
        handle.owner.flush()
    _DECISIONS.flush()


# A worker leaving (gunicorn's graceful exit runs atexit) folds in what it counted last.
atexit.register(flush_pending)


def _after_fork_in_child() -> None:
    # A forked worker starts with nothing pending and no timer (threads do not survive fork).
    for handle in list(_RECORDERS):
        recorder = handle.owner
        recorder._lock = threading.Lock()
        recorder._noted = deque()
        recorder._timer.forget()
    _DECISIONS.forget()


os.register_at_fork(after_in_child=_after_fork_in_child)

_DEFAULT_FAMILIES = _RequestFamilies(REGISTRY)
_FAMILIES: weakref.WeakKeyDictionary[CollectorRegistry, _RequestFamilies] = (
    weakref.WeakKeyDictionary({REGISTRY: _DEFAULT_FAMILIES})
)

REQUESTS: Final = _DEFAULT_FAMILIES.requests
REQUEST_DURATION: Final = _DEFAULT_FAMILIES.duration
REQUEST_BYTES: Final = _DEFAULT_FAMILIES.request_bytes
RESPONSE_BYTES: Final = _DEFAULT_FAMILIES.response_bytes
LABEL_OVERFLOW: Final = _DEFAULT_FAMILIES.overflow


def _families(registry: CollectorRegistry | None) -> _RequestFamilies:
    if registry is None:
        return _DEFAULT_FAMILIES
    families = _FAMILIES.get(registry)
    if families is None:
        families = _FAMILIES[registry] = _RequestFamilies(registry)
    return families


_LATENCY_BOUNDS: Final = [*LATENCY_BUCKETS, math.inf]
_BYTE_BOUNDS: Final = [*BYTE_BUCKETS, math.inf]


_LabelKey = tuple[str, str, str, str, str, int, str]
_LABELS = itemgetter(0)


def _histogram_tally(bounds: list[float], amounts: tuple[float, ...]) -> tuple[float, list[int]]:
    """The sum of ``amounts`` and how many fall in each bucket (``le`` each bound, as
    ``observe`` counts them); negative and NaN amounts count as 0."""
    total = sum(amounts)
    if not (total >= 0 and min(amounts) >= 0):  # NaN fails both comparisons
        amounts = tuple(amount if amount >= 0 else 0 for amount in amounts)
        total = sum(amounts)
    ordered = sorted(amounts)
    counts = []
    below = 0
    for bound in bounds:
        upto = bisect_right(ordered, bound)
        counts.append(upto - below)
        below = upto
    return total, counts


def _bulk_observer(histogram: Histogram) -> Callable[[float, list[int]], None]:
    """Adds a tally (the sum, and a count per bucket) to ``histogram`` in one go.

    Uses the histogram's own value objects, so single- and multi-process storage see exactly
    what as many ``observe`` calls would write; falls back to replaying ``observe`` at each
    bucket's bound should a future prometheus_client lay its histogram out differently.
    """
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if (
        isinstance(bounds, list)
        and isinstance(buckets, list)
        and len(bounds) == len(buckets)
        and all(hasattr(b, "inc") for b in buckets)
        and hasattr(total, "inc")
    ):
        incs = [b.inc for b in buckets]
        add_total = total.inc  # type: ignore[union-attr]

        def add(amount: float, counts: list[int]) -> None:
            add_total(amount)
            for index, n in enumerate(counts):
                if n:
                    incs[index](n)

        return add

    def replay(amount: float, counts: list[int]) -> None:
        # Every value at its bucket's bound (the sum is then approximate; this only serves an
        # unknown prometheus_client layout).
        for bound, n in zip(
            _LATENCY_BOUNDS if len(counts) > 7 else _BYTE_BOUNDS, counts, strict=True
        ):
            for _ in range(n):
                histogram.observe(bound if bound != math.inf else amount)

    return replay


def _observer(histogram: Histogram) -> Callable[[float], None]:
    """``histogram.observe`` without its per-bucket loop: one bisect and two increments.

    prometheus_client's ``observe`` scans the buckets in Python and checks exemplars; this
    does the same two value increments (sum and one bucket) through the same value objects,
    so single- and multi-process storage both see exactly what ``observe`` would write. When
    a future prometheus_client lays its histogram out differently, fall back to ``observe``.
    """
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if (
        not isinstance(bounds, list)
        or not isinstance(buckets, list)
        or len(bounds) != len(buckets)
        or not bounds
        or bounds[-1] != math.inf
        or not all(hasattr(b, "inc") for b in buckets)
        or not hasattr(total, "inc")
    ):
        return histogram.observe
    bound_list: list[float] = list(bounds)
    incs = [b.inc for b in buckets]
    add_total = total.inc  # type: ignore[union-attr]

    def observe(amount: float) -> None:
        add_total(amount)
        incs[bisect_left(bound_list, amount)](1)

    return observe


def _incrementer(counter: Counter) -> Callable[[float], None]:
    """``counter.inc`` without its checks (the amount is always 1): the value's own ``inc``."""
    value = getattr(counter, "_value", None)
    inc = getattr(value, "inc", None)
    return inc if callable(inc) else counter.inc


_Children = tuple[
    Callable[[float], None],
    Callable[[float, list[int]], None],
    Callable[[float, list[int]], None],
    Callable[[float, list[int]], None],
]


class RequestMetrics:
    """Records requests into the four request metrics for one reporter.

    ``reporter`` is ``"destination"`` for the inbound middleware and ``"source"`` for the
    outbound clients (Istio's meaning). A record is one append; requests are folded into the
    metrics in batches (256, within a second, at each scrape and at exit), once per label set
    through label children cached per label tuple. Past ``max_label_sets`` distinct tuples a
    new tuple is recorded with ``route="overflow"`` and counted in
    ``mesh_metrics_label_overflow``; past ``max_overflow_sets`` overflowed tuples every
    free-form label of a new one is ``overflow``. Safe to call from any thread.
    """

    __slots__ = (
        "_children",
        "_families",
        "_handle",
        "_lock",
        "_max",
        "_max_overflow",
        "_noted",
        "_overflow",
        "_overflow_count",
        "_timer",
        "reporter",
    )

    def __init__(
        self,
        reporter: str,
        registry: CollectorRegistry | None = None,
        *,
        max_label_sets: int = MAX_LABEL_SETS,
        max_overflow_sets: int = MAX_OVERFLOW_SETS,
    ) -> None:
        if reporter not in ("destination", "source"):
            raise ValueError(f"reporter must be 'destination' or 'source', not {reporter!r}")
        self.reporter = reporter
        self._families = _families(registry)
        self._max = max_label_sets
        self._max_overflow = max_overflow_sets
        self._children: dict[_LabelKey, _Children] = {}
        self._overflow: dict[_LabelKey, _Children] = {}
        self._overflow_count = self._families.overflow.labels(reporter).inc
        self._noted: deque[tuple[_LabelKey, float, int | float, int | float]] = deque()
        self._lock = threading.Lock()
        self._timer = FlushTimer(_FLUSH_SECONDS)
        self._handle = Handle(self)
        _RECORDERS.add(self._handle)

    def record(
        self,
        source: str,
        destination: str,
        version: str,
        route: str,
        method: str,
        status: int,
        flags: str,
        seconds: float,
        request_bytes: int,
        response_bytes: int,
    ) -> None:
        """Count one request and observe its duration and body sizes.

        ``status`` 0 means no response (connection failure, or the caller went away first);
        ``flags`` is a :func:`join_flags` value (``-`` for none); negative or NaN amounts
        count as 0."""
        # One atomic append per request; requests are tallied in batches (flush), which costs
        # a fraction of tallying each under a lock as it comes.
        noted = self._noted
        noted.append(
            (
                (source, destination, version, route, method, status, flags),
                seconds,
                request_bytes,
                response_bytes,
            )
        )
        if len(noted) >= _MAX_NOTED_REQUESTS:
            self.flush()
        elif not self._timer.armed:
            # Folded in a second from now even if no other request comes and nobody scrapes
            # this process (another worker may serve the scrape, reading this one's files).
            self._timer.arm(self.flush)

    def flush(self) -> None:
        """Fold the requests recorded since the last flush into the metrics."""
        with self._lock:
            noted = self._noted
            # Requests noted meanwhile wait; starmap calls popleft in C, not a Python loop.
            taken = list(starmap(noted.popleft, repeat((), len(noted))))
        if not taken:
            return
        # Grouped by labels and split into columns by C code (sort, groupby, zip): Python
        # code runs per distinct label set, not per request.
        try:
            taken.sort(key=_LABELS)
        except TypeError:  # a caller broke the types (None for a str): still group them
            taken.sort(key=lambda request: repr(request[0]))
        method_label = _METHOD_LABEL.get
        for labels, requests in groupby(taken, _LABELS):
            _, durations, sizes_in, sizes_out = zip(*requests, strict=True)
            source, destination, version, route, method, status, flags = labels
            key = (
                source,
                destination,
                version,
                route,
                method_label(method, "OTHER"),
                status,
                flags,
            )
            children = self._children.get(key)
            if children is None:
                children = self._miss(key)
            counter, duration, request_size, response_size = children
            counter(len(durations))
            duration(*_histogram_tally(_LATENCY_BOUNDS, durations))
            request_size(*_histogram_tally(_BYTE_BOUNDS, sizes_in))
            response_size(*_histogram_tally(_BYTE_BOUNDS, sizes_out))

    def _miss(self, key: _LabelKey) -> _Children:
        if len(self._children) < self._max:
            made = self._children[key] = self._make(key)
            return made
        self._overflow_count()
        source, destination, version, _, method, status, flags = key
        key = (source, destination, version, OVERFLOW, method, status, flags)
        children: _Children | None = self._overflow.get(key)
        if children is None:
            if len(self._overflow) >= self._max_overflow:
                # Even the overflow sets are too many: keep only what is bounded by nature.
                key = (OVERFLOW, OVERFLOW, OVERFLOW, OVERFLOW, method, status, OVERFLOW)
                children = self._overflow.get(key)
            if children is None:
                children = self._overflow[key] = self._make(key)
        return children

    def _make(self, key: _LabelKey) -> _Children:
        source, destination, version, route, method, status, flags = key
        labels = (self.reporter, source, destination, version, route, method, str(status), flags)
        families = self._families
        return (
            _incrementer(families.requests.labels(*labels)),
            _bulk_observer(families.duration.labels(*labels)),
            _bulk_observer(families.request_bytes.labels(*labels)),
            _bulk_observer(families.response_bytes.labels(*labels)),
        )


# --- the mesh's own metrics -------------------------------------------------------------------

POLICY_RELOADS = Counter(
    "mesh_policy_reloads",
    "Policy file reloads, by result (success, failure).",
    ["service", "result"],
)

AUTHORIZATION_DENIALS = Counter(
    "mesh_authorization_denials",
    "Requests denied by authorization; mode=audit counts would-be denials that were let through.",
    ["service", "rule", "mode"],
)

AUTHORIZATION_DECISIONS = Counter(
    "mesh_authorization_decisions",
    "Authorization decisions by rule (empty: the default) and action (allow, deny); "
    "mode=audit counts denials that audit mode let through.",
    ["service", "rule", "action", "mode"],
)

FAULTS_INJECTED = Counter(
    "mesh_faults_injected",
    "Faults injected into inbound requests, by fault and kind (delay, abort).",
    ["service", "fault", "kind"],
)

REGISTRY_CONNECTED = Gauge(
    "mesh_registry_connected",
    "1 while the last call to the registry succeeded, 0 while it is unreachable "
    "(several workers: the lowest of the live ones).",
    ["service"],
    multiprocess_mode="livemin",
)

REGISTRY_STALE_SECONDS = Gauge(
    "mesh_registry_stale_seconds",
    "Seconds since the registry last answered, while it is unreachable (0 when connected; "
    "several workers: the highest of the live ones).",
    ["service"],
    multiprocess_mode="livemax",
)

REGISTRY_CALLS = Counter(
    "mesh_registry_client_calls",
    "Calls from this process to the registry, by operation and result (ok, refused, unavailable).",
    ["service", "operation", "result"],
)

CERTIFICATE_EXPIRY = Gauge(
    "mesh_certificate_expiry_timestamp_seconds",
    "When this instance's mesh certificate expires (unix time; renewed at half life).",
    ["service"],
    multiprocess_mode="livemin",
)

CERTIFICATE_RENEWALS = Counter(
    "mesh_certificate_renewals",
    "Certificates asked of the mesh CA, by result (ok, refused, unavailable).",
    ["service", "result"],
)

OUTBOUND_RETRIES = Counter(
    "mesh_outbound_retries",
    "Retries sent by the outbound clients, by the reason of the try they replace "
    "(connect-failure, reset, timeout, a status code...).",
    ["source_service", "destination_service", "reason"],
)

OUTBOUND_RETRY_BUDGET_EXHAUSTED = Counter(
    "mesh_outbound_retry_budget_exhausted",
    "Retries that were wanted but refused by the retry budget.",
    ["source_service", "destination_service"],
)

OUTBOUND_EJECTIONS = Counter(
    "mesh_outbound_ejections",
    "Instances ejected by outlier detection.",
    ["destination_service"],
)

OUTBOUND_EJECTED_ENDPOINTS = Gauge(
    "mesh_outbound_ejected_endpoints",
    "Instances of the destination ejected right now (the breaker state; several workers: the "
    "highest of the live ones, since each worker keeps its own outlier state).",
    ["destination_service"],
    multiprocess_mode="livemax",
)

OUTBOUND_CIRCUIT_OPEN = Counter(
    "mesh_outbound_circuit_open",
    "Calls refused because the destination's concurrency limit (max_concurrent) was reached.",
    ["destination_service"],
)

OUTBOUND_MIRROR_DROPPED = Counter(
    "mesh_outbound_mirror_dropped",
    "Mirrored (shadow) requests dropped because the process-wide cap on them was reached.",
)

SPANS_DROPPED = Counter(
    "mesh_spans_dropped",
    "Spans dropped because the export queue was full (the exporter is slower than requests).",
)

SPAN_EXPORT_ERRORS = Counter(
    "mesh_span_export_errors",
    "Spans whose export raised (the collector refused them or could not be reached).",
)

METRICS: Final[tuple[Counter | Gauge | Histogram, ...]] = (
    REQUESTS,
    REQUEST_DURATION,
    REQUEST_BYTES,
    RESPONSE_BYTES,
    LABEL_OVERFLOW,
    POLICY_RELOADS,
    AUTHORIZATION_DENIALS,
    AUTHORIZATION_DECISIONS,
    FAULTS_INJECTED,
    REGISTRY_CONNECTED,
    REGISTRY_STALE_SECONDS,
    REGISTRY_CALLS,
    OUTBOUND_RETRIES,
    OUTBOUND_RETRY_BUDGET_EXHAUSTED,
    OUTBOUND_EJECTIONS,
    OUTBOUND_EJECTED_ENDPOINTS,
    OUTBOUND_CIRCUIT_OPEN,
    OUTBOUND_MIRROR_DROPPED,
    SPANS_DROPPED,
    SPAN_EXPORT_ERRORS,
)
"""Every metric of the data plane (the registry service keeps its own, in its own registry)."""

_SUFFIXES: Final = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
}


def exposed_names() -> frozenset[str]:
    """Every sample name the data plane's metrics can expose (``mesh_requests_total``...)."""
    names: set[str] = set()
    for metric in METRICS:
        for family in metric.describe():
            names.update(family.name + suffix for suffix in _SUFFIXES[family.type])
    return frozenset(names)


class _LabelCache:
    """``metric.labels(*values)`` children kept in a dict; bounded, then plain ``labels``."""

    __slots__ = ("_children", "_metric")

    _CAP = 2_000

    def __init__(self, metric: Any) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            child = self._metric.labels(*values)
            if len(self._children) < self._CAP:
                self._children[values] = child
        return child


_decisions = _LabelCache(AUTHORIZATION_DECISIONS)
_retries = _LabelCache(OUTBOUND_RETRIES)


def set_registry_state(service: str, connected: bool, stale_seconds: float) -> None:
    REGISTRY_CONNECTED.labels(service).set(1 if connected else 0)
    REGISTRY_STALE_SECONDS.labels(service).set(stale_seconds)


def count_registry_call(service: str, operation: str, result: str) -> None:
    REGISTRY_CALLS.labels(service, operation, result).inc()


def count_reload(service: str, ok: bool) -> None:
    POLICY_RELOADS.labels(service, "success" if ok else "failure").inc()


def count_denial(service: str, rule: str | None, *, audit: bool) -> None:
    AUTHORIZATION_DENIALS.labels(service, rule or "", "audit" if audit else "enforce").inc()


def count_decision(service: str, rule: str | None, *, allowed: bool, audit: bool) -> None:
    """Count one authorization decision (``rule`` None: decided by the default)."""
    _decisions(
        service, rule or "", "allow" if allowed else "deny", "audit" if audit else "enforce"
    ).inc()


class _DecisionTally:
    """Authorization decisions noted per request (one atomic append), counted in batches.

    Folded into ``mesh_authorization_decisions_total`` with the request tallies (within a
    second, at each scrape, at exit) and whenever :data:`_MAX_NOTED` wait.
    """

    __slots__ = ("_lock", "_noted")

    def __init__(self) -> None:
        self._noted: deque[tuple[str, str, str, str]] = deque()
        self._lock = threading.Lock()

    def note(self, key: tuple[str, str, str, str]) -> None:
        noted = self._noted
        noted.append(key)
        if len(noted) >= _MAX_NOTED:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            noted = self._noted
            # Taken one by one (an append meanwhile waits), all in C: starmap calls popleft.
            counts = Tally(starmap(noted.popleft, repeat((), len(noted))))
        for key, count in counts.items():
            _decisions(*key).inc(count)

    def forget(self) -> None:
        self._noted.clear()
        self._lock = threading.Lock()


_MAX_NOTED = 4096
_DECISIONS = _DecisionTally()

note_decision: Callable[[tuple[str, str, str, str]], None] = _DECISIONS.note
"""Count one authorization decision, batched: ``labels`` are service, rule (empty for a
default), action (allow, deny: what the rule says) and mode (enforce; audit when audit mode
let a deny through). The tally's own method: one frame less on every request."""


def count_fault(service: str, fault: str, delayed: bool, abort_status: int | None) -> None:
    if delayed:
        FAULTS_INJECTED.labels(service, fault, "delay").inc()
    if abort_status is not None:
        FAULTS_INJECTED.labels(service, fault, "abort").inc()


def count_retry(source_service: str, destination_service: str, reason: str) -> None:
    """Count one retry; ``reason`` is why the try it replaces failed (keep the set small)."""
    _retries(source_service, destination_service, reason).inc()


def count_budget_exhausted(source_service: str, destination_service: str) -> None:
    OUTBOUND_RETRY_BUDGET_EXHAUSTED.labels(source_service, destination_service).inc()


def count_ejection(destination_service: str) -> None:
    OUTBOUND_EJECTIONS.labels(destination_service).inc()


def set_ejected_endpoints(destination_service: str, ejected: int) -> None:
    OUTBOUND_EJECTED_ENDPOINTS.labels(destination_service).set(ejected)


def count_circuit_open(destination_service: str) -> None:
    OUTBOUND_CIRCUIT_OPEN.labels(destination_service).inc()


def count_mirror_dropped() -> None:
    OUTBOUND_MIRROR_DROPPED.inc()
