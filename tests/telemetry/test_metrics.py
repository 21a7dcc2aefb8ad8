"""The metrics module: request metrics (labels, buckets, caching, overflow) and the helpers."""

from __future__ import annotations

import json
import math
import random
import re
import threading
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram

from mesh_middleware.errors import PolicyError
from mesh_middleware.policy.loader import parse_policy
from mesh_middleware.policy.schema import policy_json_schema
from mesh_middleware.telemetry import metrics
from mesh_middleware.telemetry.metrics import RequestMetrics

DESIGN_LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10]
LABELS = {
    "reporter": "destination",
    "source_service": "orders",
    "destination_service": "inventory",
    "destination_version": "v1",
    "route": "/items/{id}",
    "method": "GET",
    "response_code": "200",
    "response_flags": "-",
}


def _record(rm: RequestMetrics, **changes: object) -> None:
    args: dict[str, object] = {
        "source": "orders",
        "destination": "inventory",
        "version": "v1",
        "route": "/items/{id}",
        "method": "GET",
        "status": 200,
        "flags": "-",
        "seconds": 0.02,
        "request_bytes": 0,
        "response_bytes": 512,
    }
    args.update(changes)
    rm.record(**args)  # type: ignore[arg-type]


def test_one_record_counts_and_observes_under_istios_labels() -> None:
    registry = CollectorRegistry()
    rm = RequestMetrics("destination", registry)
    _record(rm, seconds=0.02, request_bytes=50, response_bytes=512)
    value = registry.get_sample_value
    assert value("mesh_requests_total", LABELS) == 1
    assert value("mesh_request_duration_seconds_count", LABELS) == 1
    assert value("mesh_request_duration_seconds_sum", LABELS) == pytest.approx(0.02)
    assert value("mesh_request_duration_seconds_bucket", {**LABELS, "le": "0.01"}) == 0
    assert value("mesh_request_duration_seconds_bucket", {**LABELS, "le": "0.025"}) == 1
    assert value("mesh_request_bytes_bucket", {**LABELS, "le": "100.0"}) == 1
    assert value("mesh_response_bytes_bucket", {**LABELS, "le": "100.0"}) == 0
    assert value("mesh_response_bytes_bucket", {**LABELS, "le": "1000.0"}) == 1
    assert value("mesh_response_bytes_sum", LABELS) == 512


def test_buckets_and_labels_are_the_designs() -> None:
    assert list(metrics.LATENCY_BUCKETS) == DESIGN_LATENCY_BUCKETS
    assert tuple(LABELS) == metrics.REQUEST_LABELS
    registry = CollectorRegistry()
    _record(RequestMetrics("source", registry))
    bounds = [
        s.labels["le"]
        for family in registry.collect()
        if family.name == "mesh_request_duration_seconds"
        for s in family.samples
        if s.name.endswith("_bucket")
    ]
    assert bounds == [*(str(float(b)) for b in DESIGN_LATENCY_BUCKETS), "+Inf"]


def test_reporter_must_be_source_or_destination() -> None:
    with pytest.raises(ValueError, match="reporter"):
        RequestMetrics("inbound", CollectorRegistry())


def _samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "reporter"))): s.value
        for family in registry.collect()
        for s in family.samples
        if not s.name.endswith("_created") and "overflow" not in s.name
    }


def test_the_fast_observe_writes_exactly_what_histogram_observe_would() -> None:
    """The bisect shortcut agrees with prometheus_client, edges and odd values included."""
    amounts = [0.0, 0.005, 0.0050001, 0.1, 10.0, 10.5, 1e9, math.inf]
    amounts += [random.Random(7).uniform(0, 12) for _ in range(200)]
    fast_registry = CollectorRegistry()
    fast = RequestMetrics("destination", fast_registry)
    slow_registry = CollectorRegistry()
    slow = Histogram(
        "mesh_request_duration_seconds",
        "x",
        [n for n in metrics.REQUEST_LABELS if n != "reporter"],
        buckets=metrics.LATENCY_BUCKETS,
        registry=slow_registry,
    )
    for amount in amounts:
        _record(fast, seconds=amount)
        slow.labels(*(v for k, v in LABELS.items() if k != "reporter")).observe(amount)
    fast_samples = {
        key: value
        for key, value in _samples(fast_registry).items()
        if key[0].startswith("mesh_request_duration_seconds")
    }
    assert fast_samples == _samples(slow_registry)


def test_negative_and_nan_amounts_count_as_zero() -> None:
    registry = CollectorRegistry()
    rm = RequestMetrics("destination", registry)
    _record(rm, seconds=math.nan, request_bytes=-5, response_bytes=-1)
    _record(rm, seconds=-1.0)
    value = registry.get_sample_value
    assert value("mesh_request_duration_seconds_sum", LABELS) == 0
    assert value("mesh_request_duration_seconds_bucket", {**LABELS, "le": "0.005"}) == 2
    assert value("mesh_request_bytes_sum", LABELS) == 0


@pytest.mark.parametrize(
    ("method", "label"),
    [("GET", "GET"), ("PATCH", "PATCH"), ("PURGE", "OTHER"), ("get", "OTHER"), ("", "OTHER")],
)
def test_methods_outside_the_standard_set_are_other(method: str, label: str) -> None:
    registry = CollectorRegistry()
    _record(RequestMetrics("destination", registry), method=method)
    assert registry.get_sample_value("mesh_requests_total", {**LABELS, "method": label}) == 1
    assert metrics.method_label(method) == label


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["/a", "/b/{id}", "/c"]),
            st.sampled_from(["GET", "POST", "PURGE", "get"]),
            st.sampled_from([200, 404, 503]),
            st.floats(0, 20) | st.sampled_from([0.005, 0.1, 10.0, -1.0, math.nan]),
            st.integers(0, 20_000_000),
        ),
        max_size=60,
    )
)
def test_a_batch_of_interleaved_label_sets_counts_what_each_request_would(
    requests: list[tuple[str, str, int, float, int]],
) -> None:
    """One fold of many requests writes what prometheus_client's own `observe` and `inc`
    would for each request on its own (a label set's requests need not be adjacent)."""
    fast_registry, slow_registry = CollectorRegistry(), CollectorRegistry()
    fast = RequestMetrics("destination", fast_registry)
    names = [n for n in metrics.REQUEST_LABELS if n != "reporter"]
    slow_count = Counter("mesh_requests", "x", names, registry=slow_registry)
    slow_histograms = [
        Histogram(name, "x", names, buckets=buckets, registry=slow_registry)
        for name, buckets in (
            ("mesh_request_duration_seconds", metrics.LATENCY_BUCKETS),
            ("mesh_request_bytes", metrics.BYTE_BUCKETS),
            ("mesh_response_bytes", metrics.BYTE_BUCKETS),
        )
    ]
    for route, method, status, seconds, size in requests:
        _record(
            fast,
            route=route,
            method=method,
            status=status,
            seconds=seconds,
            request_bytes=size,
            response_bytes=size // 3,
        )
        labels = {
            **{k: v for k, v in LABELS.items() if k != "reporter"},
            "route": route,
            "method": metrics.method_label(method),
            "response_code": str(status),
        }
        slow_count.labels(**labels).inc()
        for histogram, amount in zip(slow_histograms, (seconds, size, size // 3), strict=True):
            histogram.labels(**labels).observe(amount if amount >= 0 else 0)
    fast_samples = _samples(fast_registry)
    slow_samples = _samples(slow_registry)
    assert fast_samples.keys() == slow_samples.keys()
    for key, value in slow_samples.items():
        assert fast_samples[key] == pytest.approx(value), key


def test_a_label_of_the_wrong_type_cannot_stop_a_batch_from_being_counted() -> None:
    """A caller passing None where a str belongs cannot stop the others from being counted.

    Compiled (mypyc), ``record`` refuses it at the call, as annotated; from source it is noted,
    and the batch falls back to sorting label sets by their repr."""
    registry = CollectorRegistry()
    rm = RequestMetrics("destination", registry)
    _record(rm)
    if metrics.__file__ is not None and metrics.__file__.endswith(tuple(EXTENSION_SUFFIXES)):
        with pytest.raises(TypeError):
            _record(rm, version=None)
    else:
        _record(rm, version=None)
    _record(rm)
    assert registry.get_sample_value("mesh_requests_total", LABELS) == 2


def test_label_sets_past_the_cap_go_to_route_overflow_and_are_counted() -> None:
    registry = CollectorRegistry()
    rm = RequestMetrics("destination", registry, max_label_sets=3)
    for i in range(3):
        _record(rm, route=f"/r{i}")
    _record(rm, route="/r0")  # known tuples keep their own series
    for i in range(3, 10):
        _record(rm, route=f"/r{i}")
    value = registry.get_sample_value
    assert value("mesh_requests_total", {**LABELS, "route": "/r0"}) == 2
    assert value("mesh_requests_total", {**LABELS, "route": "/r5"}) is None
    assert value("mesh_requests_total", {**LABELS, "route": "overflow"}) == 7
    assert value("mesh_metrics_label_overflow_total", {"reporter": "destination"}) == 7


def test_overflow_itself_is_bounded() -> None:
    """Unbounded sources past both caps collapse to one series per method and status."""
    registry = CollectorRegistry()
    rm = RequestMetrics("destination", registry, max_label_sets=1, max_overflow_sets=2)
    for i in range(50):
        _record(rm, source=f"caller-{i}", route=f"/r{i}")
    series = {
        tuple(sorted(s.labels.items()))
        for family in registry.collect()
        if family.name == "mesh_requests"
        for s in family.samples
        if s.name == "mesh_requests_total"
    }
    assert len(series) == 4  # the first tuple, two overflow tuples, one collapsed
    collapsed = {
        **LABELS,
        "source_service": "overflow",
        "destination_service": "overflow",
        "destination_version": "overflow",
        "route": "overflow",
        "response_flags": "overflow",
    }
    assert registry.get_sample_value("mesh_requests_total", collapsed) == 47


def test_records_from_many_threads_are_all_counted() -> None:
    registry = CollectorRegistry()
    rm = RequestMetrics("source", registry)

    def work(n: int) -> None:
        for i in range(2000):
            _record(rm, route=f"/r{i % 7}", status=200 + n % 2)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    total = sum(
        s.value
        for family in registry.collect()
        if family.name == "mesh_requests"
        for s in family.samples
        if s.name == "mesh_requests_total"
    )
    assert total == 16_000


def test_two_recorders_on_one_registry_share_its_metrics() -> None:
    registry = CollectorRegistry()
    _record(RequestMetrics("destination", registry))
    _record(RequestMetrics("source", registry))
    value = registry.get_sample_value
    assert value("mesh_requests_total", LABELS) == 1
    assert value("mesh_requests_total", {**LABELS, "reporter": "source"}) == 1


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ([], "-"),
        (["RETRIED"], "RETRIED"),
        (["BUDGET", "RETRIED", "RETRIED"], "RETRIED,BUDGET"),
        (["DENIED", "UNAUTH"], "UNAUTH,DENIED"),
        (["made-up", "FAULT_DELAY"], "FAULT_DELAY"),
        (["made-up"], "-"),
    ],
)
def test_flags_join_in_one_order_and_drop_unknown_ones(given: list[str], expected: str) -> None:
    assert metrics.join_flags(given) == expected


def test_every_flag_is_an_upper_case_word_and_listed_once() -> None:
    assert len(set(metrics.ALL_FLAGS)) == len(metrics.ALL_FLAGS)
    for flag in metrics.ALL_FLAGS:
        assert flag.replace("_", "").isalpha() and flag.isupper()


def _value(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def test_the_helpers_count_into_their_metrics() -> None:
    """Each helper moves its own series (the default registry, as the mesh uses it)."""
    checks = [
        (
            lambda: metrics.count_retry("shop", "inventory", "503"),
            "mesh_outbound_retries_total",
            {"source_service": "shop", "destination_service": "inventory", "reason": "503"},
        ),
        (
            lambda: metrics.count_budget_exhausted("shop", "inventory"),
            "mesh_outbound_retry_budget_exhausted_total",
            {"source_service": "shop", "destination_service": "inventory"},
        ),
        (
            lambda: metrics.count_ejection("inventory"),
            "mesh_outbound_ejections_total",
            {"destination_service": "inventory"},
        ),
        (
            lambda: metrics.count_circuit_open("inventory"),
            "mesh_outbound_circuit_open_total",
            {"destination_service": "inventory"},
        ),
        (metrics.count_mirror_dropped, "mesh_outbound_mirror_dropped_total", {}),
        (
            lambda: metrics.count_decision("shop", "r1", allowed=True, audit=False),
            "mesh_authorization_decisions_total",
            {"service": "shop", "rule": "r1", "action": "allow", "mode": "enforce"},
        ),
        (
            lambda: metrics.count_decision("shop", None, allowed=False, audit=True),
            "mesh_authorization_decisions_total",
            {"service": "shop", "rule": "", "action": "deny", "mode": "audit"},
        ),
        (
            lambda: metrics.count_denial("shop", "r2", audit=False),
            "mesh_authorization_denials_total",
            {"service": "shop", "rule": "r2", "mode": "enforce"},
        ),
        (
            lambda: metrics.count_fault("shop", "f", True, None),
            "mesh_faults_injected_total",
            {"service": "shop", "fault": "f", "kind": "delay"},
        ),
        (
            lambda: metrics.count_reload("shop", ok=False),
            "mesh_policy_reloads_total",
            {"service": "shop", "result": "failure"},
        ),
        (
            lambda: metrics.count_registry_call("shop", "watch", "ok"),
            "mesh_registry_client_calls_total",
            {"service": "shop", "operation": "watch", "result": "ok"},
        ),
    ]
    for call, name, labels in checks:
        before = _value(name, labels)
        call()
        call()
        assert _value(name, labels) == before + 2, name


def test_the_gauge_helpers_set_their_gauges() -> None:
    metrics.set_ejected_endpoints("inventory", 3)
    assert _value("mesh_outbound_ejected_endpoints", {"destination_service": "inventory"}) == 3
    metrics.set_ejected_endpoints("inventory", 0)
    assert _value("mesh_outbound_ejected_endpoints", {"destination_service": "inventory"}) == 0
    metrics.set_registry_state("shop", False, 12.5)
    assert _value("mesh_registry_connected", {"service": "shop"}) == 0
    assert _value("mesh_registry_stale_seconds", {"service": "shop"}) == 12.5


def test_every_gauge_says_how_workers_aggregate() -> None:
    """Under PROMETHEUS_MULTIPROC_DIR a gauge without a mode would be one series per pid."""
    for metric in metrics.METRICS:
        if metric._type == "gauge":
            assert metric._multiprocess_mode.startswith("live"), metric  # type: ignore[attr-defined]


def test_exposed_names_cover_every_sample_the_metrics_write() -> None:
    names = metrics.exposed_names()
    assert {
        "mesh_requests_total",
        "mesh_request_duration_seconds_bucket",
        "mesh_request_bytes_sum",
        "mesh_response_bytes_count",
        "mesh_outbound_ejected_endpoints",
        "mesh_authorization_decisions_total",
        "mesh_outbound_mirror_dropped_total",
    } <= names
    ours = {m._name for m in metrics.METRICS}
    metrics.count_mirror_dropped()
    written = {s.name for f in REGISTRY.collect() if f.name in ours for s in f.samples}
    assert "mesh_outbound_mirror_dropped_total" in written
    assert written <= names


# --- the Grafana dashboard queries only metrics that exist --------------------------------------

DASHBOARD = Path(__file__).resolve().parents[2] / "sample_apps" / "grafana" / "mesh-dashboard.json"


def dashboard_exprs() -> list[str]:
    model = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in model["panels"] for t in p.get("targets", [])]


def test_the_dashboard_is_a_grafana_model_on_a_prometheus_datasource_variable() -> None:
    model = json.loads(DASHBOARD.read_text())
    assert model["uid"] and model["title"] and isinstance(model["schemaVersion"], int)
    variables = {v["name"]: v for v in model["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in model["panels"]]
    assert len(ids) == len(set(ids))
    for panel in model["panels"]:
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        for target in panel.get("targets", []):
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    assert DASHBOARD.read_text().isascii()


def test_every_metric_the_dashboard_queries_exists() -> None:
    """So the dashboard and metrics.py never drift apart."""
    exprs = dashboard_exprs()
    queried = {name for expr in exprs for name in re.findall(r"\bmesh_[a-z_]+", expr)}
    assert queried - metrics.exposed_names() == set()
    wanted = {
        "mesh_requests_total",
        "mesh_request_duration_seconds_bucket",
        "mesh_outbound_retries_total",
        "mesh_outbound_ejections_total",
        "mesh_outbound_ejected_endpoints",
        "mesh_authorization_denials_total",
        "mesh_faults_injected_total",
    }
    assert wanted <= queried
    for label in re.findall(r"by \(([^)]*)\)", " ".join(exprs)):
        for name in (n.strip() for n in label.split(",")):
            assert name == "le" or any(name in m._labelnames for m in metrics.METRICS), name


# --- the policy file's telemetry section ------------------------------------------------------


def test_the_telemetry_section_defaults() -> None:
    telemetry = parse_policy("service: shop\n").policy.telemetry
    assert telemetry.metrics.enabled and telemetry.metrics.path == "/metrics"
    assert not telemetry.access_log.enabled and telemetry.access_log.sample == 1.0
    assert telemetry.access_log.flush_interval == 1.0
    assert telemetry.tracing.sample == 1.0 and telemetry.tracing.otlp_endpoint is None


def test_the_telemetry_section_reads_every_field() -> None:
    text = (
        "service: shop\n"
        "telemetry:\n"
        "  metrics: {enabled: false, path: /internal/metrics}\n"
        "  access_log: {enabled: true, sample: 0.25, flush_interval: 200ms}\n"
        "  tracing: {sample: 1, otlp_endpoint: 'http://127.0.0.1:4318/v1/traces'}\n"
    )
    telemetry = parse_policy(text).policy.telemetry
    assert not telemetry.metrics.enabled and telemetry.metrics.path == "/internal/metrics"
    assert telemetry.access_log.enabled and telemetry.access_log.sample == 0.25
    assert telemetry.access_log.flush_interval == 0.2
    assert telemetry.tracing.sample == 1.0
    assert telemetry.tracing.otlp_endpoint == "http://127.0.0.1:4318/v1/traces"
    assert "telemetry" in policy_json_schema()["properties"]


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("  access_log: {sample: 1.5}\n", "p.yaml:3: telemetry.access_log.sample"),
        ("  access_log: {sample: '0.5'}\n", "p.yaml:3: telemetry.access_log.sample"),
        ("  access_log: {flush_interval: 2m}\n", "p.yaml:3: telemetry.access_log.flush_interval"),
        ("  access_log: {flush_interval: 0s}\n", "telemetry.access_log.flush_interval"),
        ("  metrics: {path: metrics}\n", "plain path starting with '/'"),
        ("  metrics: {path: /metrics*}\n", "plain path"),
        ("  metrics: {path: /a//b}\n", "write it as '/a/b'"),
        ("  tracing: {otlp_endpoint: 'grpc://x'}\n", "telemetry.tracing.otlp_endpoint"),
        ("  logs: {}\n", "telemetry.logs"),
    ],
)
def test_the_telemetry_section_is_strict(yaml_text: str, expected: str) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy("service: shop\ntelemetry:\n" + yaml_text, "p.yaml")
    assert expected in str(caught.value)


def test_noted_requests_are_bounded_and_tallied_at_once_when_the_batch_is_full() -> None:
    registry = CollectorRegistry()
    rm = RequestMetrics("destination", registry)
    for _ in range(metrics._MAX_NOTED_REQUESTS - 1):
        _record(rm)
    assert len(rm._noted) == metrics._MAX_NOTED_REQUESTS - 1
    _record(rm)
    assert not rm._noted  # tallied by the request that filled the batch, not later
    _record(rm, seconds=math.nan, request_bytes=-5)
    assert registry.get_sample_value("mesh_requests_total", LABELS) == (
        metrics._MAX_NOTED_REQUESTS + 1
    )
