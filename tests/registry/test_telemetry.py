"""The registry's telemetry: rolling windows and golden metrics (in process, on a clock the test
moves), and `/v1/telemetry/*` of a real `mesh registry` process: merging, windows, quantiles,
auth, malformed bodies and caps."""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from mesh_middleware.registry.telemetry import (
    MAX_EDGES,
    MAX_NAMES,
    Telemetry,
    TelemetryReport,
    histogram_quantile,
)
from mesh_middleware.telemetry.reports import EdgeReporter
from mesh_middleware.telemetry.wire import LATENCY_BUCKETS
from tests.registry.support import (
    Registry,
    bearer,
    create_join_token,
    register,
    start_registry,
)

REPORTS = "/v1/telemetry/reports"


class Clock:
    def __init__(self, now: float = 10_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def report(
    reporter: str,
    requests: list[tuple[str, str, int, float]],
    *,
    age: float = 0.0,
    instance: str | None = None,
) -> dict[str, Any]:
    """A report body built by the real reporter from (source, destination, status, seconds)."""
    edges = EdgeReporter(lambda body: None, service=reporter, instance=instance)
    for source, destination, status, seconds in requests:
        edges.record(source, destination, status, seconds)
    body = edges.flush()
    assert body is not None
    return {**body, "age": age}


def many(source: str, destination: str, n: int, status: int = 200, seconds: float = 0.02) -> Any:
    return [(source, destination, status, seconds)] * n


def _by(rows: list[dict[str, Any]], key: str, value: str) -> dict[str, Any]:
    [row] = [r for r in rows if r[key] == value]
    return row


def _edge(answer: dict[str, Any], source: str, destination: str) -> dict[str, Any]:
    [edge] = [
        e for e in answer["edges"] if (e["source"], e["destination"]) == (source, destination)
    ]
    return edge


# -- the rolling windows, in process -------------------------------------------------------------


def test_histogram_quantile_interpolates_as_prometheus_does() -> None:
    """Linear inside the bucket the rank falls in, 0 as the first lower bound, the last finite
    bound for the unbounded bucket, None when empty (Prometheus's histogram_quantile)."""
    counts = [0] * (len(LATENCY_BUCKETS) + 1)
    assert histogram_quantile(0.5, counts) is None
    counts[6] = 100  # (0.1, 0.25]
    assert histogram_quantile(0.5, counts) == pytest.approx(0.175)
    assert histogram_quantile(0.99, counts) == pytest.approx(0.1 + 0.15 * 0.99)
    counts[0] = 100  # (0, 0.005]
    assert histogram_quantile(0.25, counts) == pytest.approx(0.0025)
    assert histogram_quantile(0.5, counts) == pytest.approx(0.005)  # the rank ends bucket 0
    counts[-1] = 800  # beyond 10 s
    assert histogram_quantile(0.99, counts) == 10.0


def test_windows_expire_bucket_by_bucket_and_memory_is_released() -> None:
    """A report counts in a window while its 10-second bucket is inside it, and is dropped
    (with its edge and names) once older than the retention."""
    clock = Clock(10_000.0)  # the start of a bucket
    telemetry = Telemetry(clock=clock)
    body = report("orders", many("orders", "inventory", 60))
    telemetry.merge(TelemetryReport.model_validate(body))
    clock.now += 59.9
    _, nodes, edges = telemetry.topology(60, [])
    assert _by(edges, "source", "orders")["requests"] == 60
    clock.now += 0.1  # the report's bucket leaves the 60-second window
    _, nodes, edges = telemetry.topology(60, [])
    assert (edges, nodes) == ([], [])  # unregistered and quiet: not listed
    _, _, edges = telemetry.topology(300, [])
    assert _by(edges, "source", "orders")["requests"] == 60
    assert (telemetry.edge_count, telemetry.name_count) == (1, 2)
    clock.now += 300
    _, nodes, edges = telemetry.topology(300, [])
    assert (edges, nodes) == ([], [])
    assert (telemetry.edge_count, telemetry.name_count) == (0, 0)


def test_rates_divide_by_the_time_covered() -> None:
    """The rate is requests over the seconds the window's buckets cover up to now; right after
    the registry started, over its uptime (at least one bucket)."""
    clock = Clock(10_005.0)
    telemetry = Telemetry(clock=clock)
    telemetry.merge(TelemetryReport.model_validate(report("a", many("a", "b", 100))))
    covered, services = telemetry.services(60, [])
    assert covered == 10.0  # up 0 s: one bucket
    assert _by(services, "service", "b")["rps"] == 10.0
    clock.now += 40
    covered, services = telemetry.services(60, [])
    assert covered == 40.0  # up 40 s, less than the window
    assert _by(services, "service", "b")["rps"] == 2.5
    clock.now += 100
    covered, _ = telemetry.services(60, [])
    assert 50.0 <= covered <= 60.0  # five whole buckets and the current one's part


def _acting(reporter: str, wall: float = 1_800_000_000.0) -> dict[str, Any]:
    """A report of inventory's with a denial, faults and retries, built by the real reporter."""
    edges = EdgeReporter(lambda body: None, service=reporter, wall_clock=lambda: wall)
    edges.record("gateway", "inventory", 403, 0.001)
    edges.record("orders", "inventory", 503, 0.001)
    edges.denied("gateway", "POST", "/reserve", 403, "only-orders-reserve", 26, "denied")
    edges.faulted("orders", "inventory", abort=True)
    edges.retried("inventory", "payments")
    body = edges.flush()
    assert body is not None
    return body


def test_faults_retries_and_denials_are_kept_for_the_dashboard() -> None:
    """Faults and retries add up per edge and window; denials are kept newest first, within
    the window asked for, in a bounded ring."""
    clock = Clock(10_000.0)
    telemetry = Telemetry(clock=clock, max_denials=3)
    for _ in range(2):
        telemetry.merge(TelemetryReport.model_validate(_acting("inventory")))
    # orders' own view of the edge wins for its golden metrics; the faults are inventory's.
    telemetry.merge(
        TelemetryReport.model_validate(report("orders", many("orders", "inventory", 4)))
    )
    _, _, edges = telemetry.topology(60, [])
    faulted = _by([e for e in edges if e["destination"] == "inventory"], "source", "orders")
    assert (faulted["reporter"], faulted["requests"]) == ("source", 4)
    assert (faulted["faults"], faulted["retries"]) == ({"abort": 2, "delay": 0}, 0)
    assert _by(edges, "destination", "payments")["retries"] == 2
    [denial, _] = telemetry.denials(60)
    assert denial == {
        "at": 1_800_000_000.0,
        "source": "gateway",
        "destination": "inventory",
        "method": "POST",
        "path": "/reserve",
        "status": 403,
        "rule": "only-orders-reserve",
        "line": 26,
        "reason": "denied",
    }
    clock.now += 30
    for wall in (1.0, 2.0):
        telemetry.merge(TelemetryReport.model_validate(_acting("inventory", wall)))
    assert [d["at"] for d in telemetry.denials(300)] == [2.0, 1.0, 1_800_000_000.0]  # ring of 3
    assert len(telemetry.denials(300, limit=2)) == 2
    assert [d["at"] for d in telemetry.denials(20)] == [2.0, 1.0]  # received in the last 20 s


def test_series_give_one_point_per_bucket_over_the_retention() -> None:
    clock = Clock(10_000.0)
    telemetry = Telemetry(clock=clock)
    telemetry.merge(
        TelemetryReport.model_validate(report("a", many("a", "b", 20) + many("a", "b", 5, 503)))
    )
    clock.now += 25  # two buckets later, halfway through the third
    telemetry.merge(TelemetryReport.model_validate(report("a", many("a", "b", 10, 200, 0.3))))
    series = telemetry.series(wall_now=1_800_000_025.0)[("a", "b")]
    points = len(series["rps"])
    assert points == 30 and series["step"] == 10.0
    assert series["start"] == 1_800_000_025.0 - 295  # the oldest bucket's start, 29.5 ago
    assert series["rps"][-3:] == [2.5, 0.0, 2.0]  # 25 in 10 s, none, 10 in the 5 s so far
    assert series["success_rate"][-3:] == [0.8, None, 1.0]
    assert series["p99"][-2] is None and series["p99"][-1] > 0.25
    assert series["rps"][: points - 3] == [0.0] * (points - 3)
    # A late report into a whole bucket already drawn: its point is computed again.
    late = report("a", many("a", "b", 10, 503), age=20)
    telemetry.merge(TelemetryReport.model_validate(late))
    again = telemetry.series(wall_now=1_800_000_025.0)[("a", "b")]
    assert again["rps"][-3:] == [3.5, 0.0, 2.0]
    assert again["success_rate"][-3] == pytest.approx(20 / 35)
    clock.now += 310  # every bucket leaves the retention, and its point with it
    assert telemetry.series(wall_now=1_800_000_335.0) == {}
    assert telemetry._points == {}


def test_an_edge_reported_from_both_sides_is_not_counted_twice() -> None:
    """orders reports its calls to inventory, inventory reports the same calls served: the
    service's figures are inventory's own view, the edge's the caller's, never the sum."""
    telemetry = Telemetry(clock=Clock())
    outbound = many("orders", "inventory", 10, 200) + many("orders", "inventory", 2, 0)
    inbound = many("orders", "inventory", 10, 200) + many("anonymous", "inventory", 5, 503)
    for reporter, requests in (("orders", outbound), ("inventory", inbound)):
        telemetry.merge(TelemetryReport.model_validate(report(reporter, requests)))
    _, nodes, edges = telemetry.topology(60, [])
    inventory = _by(nodes, "service", "inventory")
    assert (inventory["requests"], inventory["reporter"]) == (15, "destination")
    assert inventory["success_rate"] == pytest.approx(10 / 15, abs=1e-6)
    edge = _edge({"edges": edges}, "orders", "inventory")
    assert (edge["requests"], edge["reporter"]) == (12, "source")
    assert edge["counts"] == {"2xx": 10, "error": 2}  # the failed connects only the caller saw
    assert _edge({"edges": edges}, "anonymous", "inventory")["reporter"] == "destination"
    assert {n["service"] for n in nodes} == {"orders", "inventory", "anonymous"}


def test_caps_bound_edges_and_names() -> None:
    """Past the caps, new edges are dropped (counted); known edges keep counting; once their
    buckets age out there is room again."""
    clock = Clock()
    telemetry = Telemetry(clock=clock, max_edges=3, max_names=4)

    def merge(reporter: str, *destinations: str) -> tuple[int, int]:
        body = report(reporter, [(reporter, d, 200, 0.01) for d in destinations])
        merged = telemetry.merge(TelemetryReport.model_validate(body))
        return merged.accepted, merged.dropped

    assert merge("a", "b", "c", "d") == (3, 0)  # four names, three edges
    assert merge("a", "e") == (0, 1)  # a fifth name
    assert merge("b", "a") == (0, 1)  # a fourth edge, with known names
    assert merge("a", "b") == (1, 0)  # a known edge
    assert (telemetry.edge_count, telemetry.name_count) == (3, 4)
    clock.now += 320
    assert merge("a", "e") == (1, 0)
    assert (telemetry.edge_count, telemetry.name_count) == (1, 2)


# -- a real registry -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """One registry (not in dev mode) for the tests that do not depend on a fresh state."""
    with start_registry(tmp_path_factory.mktemp("telemetry") / "data") as running:
        yield running


def _post(
    client: httpx.Client, registry: Registry, body: Any, token: str | None = None
) -> httpx.Response:
    headers = bearer(token) if token else registry.admin()
    return client.post(f"{registry.url}{REPORTS}", json=body, headers=headers)


def _get(client: httpx.Client, registry: Registry, what: str, window: str = "60s") -> Any:
    response = client.get(f"{registry.url}/v1/telemetry/{what}", params={"window": window})
    assert response.status_code == 200, response.text
    return response.json()


def _refused(response: httpx.Response, status: int, reason: str = "") -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    answer = response.json()
    assert set(answer) == {"error", "reason"}
    assert reason in answer["reason"]


def _metric(client: httpx.Client, registry: Registry, sample: str) -> float:
    text = client.get(f"{registry.url}/metrics").text
    match = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_reports_from_two_instances_and_both_sides_merge(
    shared: Registry, client: httpx.Client
) -> None:
    """Two instances of m-orders report their calls, m-inventory reports what it served: the
    edge sums both callers' reports, the service is what it served itself, and the rate is the
    requests over the seconds covered."""
    i1 = many("m-orders", "m-inventory", 30) + many("m-orders", "m-inventory", 10, 503)
    i2 = many("m-orders", "m-inventory", 20)
    served = many("m-orders", "m-inventory", 50) + many("m-orders", "m-inventory", 10, 503)
    served += many("anonymous", "m-inventory", 40, 200, 0.3)
    for reporter, requests, instance in (
        ("m-orders", i1, "o-1"),
        ("m-orders", i2, "o-2"),
        ("m-inventory", served, "inv-1"),
    ):
        answer = _post(client, shared, report(reporter, requests, instance=instance))
        assert answer.status_code == 202, answer.text
        assert answer.json() == {"accepted": len({(s, d) for s, d, *_ in requests}), "dropped": 0,
                                 "stale": False}  # fmt: skip
    topology = _get(client, shared, "topology")
    edge = _edge(topology, "m-orders", "m-inventory")
    assert (edge["requests"], edge["reporter"]) == (60, "source")
    assert edge["success_rate"] == pytest.approx(50 / 60, abs=1e-6)
    assert edge["rps"] == pytest.approx(60 / topology["covered_seconds"], abs=0.001)
    services = _get(client, shared, "services")
    inventory = _by(services["services"], "service", "m-inventory")
    assert (inventory["requests"], inventory["counts"]) == (100, {"2xx": 90, "5xx": 10})
    assert inventory["success_rate"] == 0.9
    assert inventory["latency"]["p99"] > 0.25  # the anonymous callers' 300 ms
    assert "anonymous" not in {s["service"] for s in services["services"]}
    assert services["window_seconds"] == 60.0


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_report_is_filed_at_the_time_it_describes(shared: Registry, client: httpx.Client) -> None:
    """`age` files a late report (sent after an outage) under its own time: in the 5-minute
    window, not the last minute; older than the retention it is accepted and ignored."""
    before = _metric(client, shared, 'mesh_registry_telemetry_reports_total{result="stale"}')
    late = _post(client, shared, report("w-late", many("w-late", "w-dest", 7), age=120))
    assert late.json() == {"accepted": 1, "dropped": 0, "stale": False}
    stale = _post(client, shared, report("w-stale", many("w-stale", "w-dest", 5), age=400))
    assert stale.status_code == 202
    assert stale.json() == {"accepted": 0, "dropped": 0, "stale": True}
    assert "w-late" not in {e["source"] for e in _get(client, shared, "topology")["edges"]}
    five = _get(client, shared, "topology", "5m")
    assert _edge(five, "w-late", "w-dest")["requests"] == 7
    assert "w-stale" not in {e["source"] for e in five["edges"]}
    after = _metric(client, shared, 'mesh_registry_telemetry_reports_total{result="stale"}')
    assert after - before == 1


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_quantiles_match_a_known_distribution_within_a_bucket(
    shared: Registry, client: httpx.Client
) -> None:
    """Latencies drawn from a log-normal distribution: each reported p50/p95/p99 lies in the
    bucket of the true quantile of the samples."""
    rng = random.Random(5)
    samples = [rng.lognormvariate(math.log(0.04), 0.9) for _ in range(5000)]
    requests = [("q-client", "q-server", 200, s) for s in samples]
    assert _post(client, shared, report("q-client", requests)).status_code == 202
    latency = _edge(_get(client, shared, "topology"), "q-client", "q-server")["latency"]
    ordered = sorted(samples)
    bounds = (0.0, *LATENCY_BUCKETS)
    for name, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
        true = ordered[math.ceil(q * len(ordered)) - 1]
        i = next(i for i, upper in enumerate(LATENCY_BUCKETS) if true <= upper)
        assert bounds[i] <= latency[name] <= bounds[i + 1], (name, true, latency[name])


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_auth_a_service_reports_only_its_own_edges(shared: Registry, client: httpx.Client) -> None:
    """A join token reports for its own service only, and only edges that service is part
    of; no credential or an unknown one is a 401; the admin may report for any service."""
    token = create_join_token(client, shared, "auth-a")
    own = report("auth-a", many("auth-a", "auth-c", 3))
    other = report("auth-b", many("auth-b", "auth-c", 3))
    before = _metric(client, shared, 'mesh_registry_telemetry_reports_total{result="rejected"}')
    assert _post(client, shared, own, token).status_code == 202
    _refused(client.post(f"{shared.url}{REPORTS}", json=own), 401, "join token")
    _refused(_post(client, shared, own, "mjt_unknown"), 401, "unknown")
    _refused(_post(client, shared, other, token), 403, "'auth-a', not 'auth-b'")
    forged = {**own, "edges": other["edges"]}
    _refused(_post(client, shared, forged, token), 400, "source or the destination")
    assert _post(client, shared, other).status_code == 202  # the admin token
    after = _metric(client, shared, 'mesh_registry_telemetry_reports_total{result="rejected"}')
    assert after - before == 4
    # Reading telemetry needs no credential, as reading the catalog does not.
    assert client.get(f"{shared.url}/v1/telemetry/services").status_code == 200


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_dev_mode_takes_reports_without_a_credential(
    dev_registry: Registry, client: httpx.Client
) -> None:
    body = report("dev-a", many("dev-a", "dev-b", 2))
    answer = client.post(f"{dev_registry.url}{REPORTS}", json=body)
    assert answer.status_code == 202, answer.text


def _malformed() -> list[tuple[str, Any, str]]:
    good = report("bad-a", many("bad-a", "bad-b", 2))
    edge = good["edges"][0]

    def with_edge(**changes: Any) -> dict[str, Any]:
        return {**good, "edges": [{**edge, **changes}]}

    latency = edge["latency"]
    return [
        ("not an object", [1, 2], "valid dictionary"),
        ("no edges", {k: v for k, v in good.items() if k != "edges"}, "edges"),
        ("extra field", {**good, "route": "/x"}, "route"),
        ("bad reporter", {**good, "reporter": "Bad_Name"}, "reporter"),
        ("bad name", with_edge(destination="a b"), "destination"),
        ("unknown class", with_edge(counts={"6xx": 2}), "counts"),
        ("negative count", with_edge(counts={"2xx": -2}), "counts"),
        ("counts disagree", with_edge(counts={"2xx": 3}), "disagree"),
        ("other buckets", with_edge(latency={**latency, "buckets": [0.1, 1.0]}), "buckets"),
        ("short counts", with_edge(latency={**latency, "counts": [2]}), "counts"),
        ("string count", with_edge(counts={"2xx": "2"}), "counts"),
        ("negative age", {**good, "age": -1}, "age"),
        ("too many edges", {**good, "edges": [edge] * 1001}, "edges"),
    ]


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_malformed_reports_are_400_json(shared: Registry, client: httpx.Client) -> None:
    """Every malformed body is a 400 with {"error", "reason"} naming what is wrong; a body over
    2 MiB is a 413; invalid JSON (NaN included) a 400; a bad window a 400."""
    for what, body, reason in _malformed():
        response = _post(client, shared, body)
        assert response.status_code == 400, (what, response.text)
        _refused(response, 400, reason)
    good = report("bad-a", many("bad-a", "bad-b", 2))
    text = json.dumps(good).replace('"sum": 0.04', '"sum": NaN')
    assert "NaN" in text
    headers = {**shared.admin(), "content-type": "application/json"}
    _refused(client.post(f"{shared.url}{REPORTS}", content=text, headers=headers), 400)
    _refused(client.post(f"{shared.url}{REPORTS}", content=b"{", headers=headers), 400, "JSON")
    huge = b'{"pad": "' + b"x" * (2 * 1024 * 1024) + b'"}'
    _refused(client.post(f"{shared.url}{REPORTS}", content=huge, headers=headers), 413)
    for window in ("abc", "0s", "10m", "-5s", "1e9"):
        response = client.get(f"{shared.url}/v1/telemetry/topology", params={"window": window})
        _refused(response, 400, "window")


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_caps_bound_what_the_registry_holds(dev_registry: Registry, client: httpx.Client) -> None:
    """Three services report 1997 destinations each, 2000 names in all: the registry keeps
    MAX_EDGES edges, drops (and counts) the rest, and says so in each answer."""
    assert (MAX_EDGES, MAX_NAMES) == (5000, 2000)
    dropped = 0
    for reporter in ("cap-a", "cap-b", "cap-c"):
        for chunk in (range(0, 1000), range(1000, 1997)):
            body = report(reporter, [(reporter, f"cap-d{n}", 200, 0.01) for n in chunk])
            response = client.post(f"{dev_registry.url}{REPORTS}", json=body)
            assert response.status_code == 202, response.text
            dropped += response.json()["dropped"]
    assert dropped == 3 * 1997 - MAX_EDGES
    # A new name does not fit either, even on an edge of a known reporter.
    body = report("cap-a", [("cap-a", "cap-new", 200, 0.01)])
    assert client.post(f"{dev_registry.url}{REPORTS}", json=body).json()["dropped"] == 1
    assert _metric(client, dev_registry, "mesh_registry_telemetry_edges") == MAX_EDGES
    assert _metric(client, dev_registry, "mesh_registry_telemetry_edges_dropped_total") == (
        dropped + 1
    )
    assert len(_get(client, dev_registry, "topology")["edges"]) == MAX_EDGES


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_nodes_say_whether_a_service_is_registered_and_healthy(
    shared: Registry, client: httpx.Client
) -> None:
    """Topology nodes carry the catalog's view: registered, instances, healthy ones."""
    token = create_join_token(client, shared, "node-b")
    assert register(client, shared, "node-b", "b-1", token).status_code == 200
    assert register(client, shared, "node-b", "b-2", token, port=8002).status_code == 200
    assert _post(client, shared, report("node-a", many("node-a", "node-b", 4))).status_code == 202
    nodes = _get(client, shared, "topology")["nodes"]
    b, a = _by(nodes, "service", "node-b"), _by(nodes, "service", "node-a")
    assert (b["registered"], b["instances"], b["healthy_instances"], b["healthy"]) == (
        True,
        2,
        2,
        True,
    )
    assert (a["registered"], a["instances"], a["healthy"]) == (False, 0, False)
    assert b["requests"] == 4  # what its callers saw: node-b reports nothing itself
    assert b["reporter"] == "source"
