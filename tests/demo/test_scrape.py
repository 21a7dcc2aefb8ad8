"""The figures read back from metrics pages: retries and denials per edge, audit, faults,
shadows; and would-be denials in the apps' logs."""

from __future__ import annotations

from pathlib import Path

import httpx

from mesh_middleware.demo.scrape import (
    MetricsSnapshot,
    fetch_topology,
    parse_metrics,
    scrape,
    would_be_denials,
)


def _line(name: str, value: float, **labels: str) -> str:
    rendered = ",".join(f'{key}="{label}"' for key, label in labels.items())
    return f"{name}{{{rendered}}} {value}\n"


def _request(
    reporter: str, source: str, version: str, method: str, code: str, flags: str
) -> dict[str, str]:
    return {
        "reporter": reporter,
        "source_service": source,
        "destination_service": "gateway" if source == "anonymous" else "inventory",
        "destination_version": version,
        "method": method,
        "response_code": code,
        "response_flags": flags,
    }


RETRIES = "mesh_outbound_retries_total"
REQUESTS = "mesh_requests_total"
DENIALS = "mesh_authorization_denials_total"

GATEWAY = (
    "# HELP mesh_outbound_retries_total Retries sent.\n"
    "# TYPE mesh_outbound_retries_total counter\n"
    + _line(RETRIES, 2, source_service="gateway", destination_service="inventory", reason="reset")
    + "# TYPE mesh_requests_total counter\n"
    + _line(REQUESTS, 30, **_request("source", "gateway", "v2", "GET", "200", "-"))
    + _line(REQUESTS, 270, **_request("source", "gateway", "v1", "GET", "200", "-"))
    + _line(REQUESTS, 40, **_request("destination", "anonymous", "v1", "POST", "201", "DENIED"))
    + "# TYPE mesh_authorization_denials_total counter\n"
    + _line(DENIALS, 40, service="gateway", rule="no-anonymous-orders", mode="audit")
)

ORDERS = "# TYPE mesh_outbound_retries_total counter\n" + "".join(
    _line(RETRIES, n, source_service="orders", destination_service="payments", reason=reason)
    for reason, n in (("503", 7), ("reset", 1))
)

INVENTORY_V2 = (
    _line(REQUESTS, 92, **_request("destination", "gateway", "v2", "GET", "200", "-"))
    + _line(REQUESTS, 3, **_request("destination", "gateway", "v2", "POST", "403", "DENIED"))
    + _line(DENIALS, 3, service="inventory", rule="reserve-only-orders", mode="enforce")
)

PAYMENTS = _line(
    "mesh_faults_injected_total", 9, service="payments", fault="chaos-monkey", kind="abort"
)


def _snapshot() -> MetricsSnapshot:
    pages = {"gateway": GATEWAY, "orders": ORDERS, "inventory-v2": INVENTORY_V2}
    pages["payments-a"] = PAYMENTS
    pages["payments-b"] = PAYMENTS
    return MetricsSnapshot(pages={name: parse_metrics(text) for name, text in pages.items()})


def test_retries_are_summed_per_edge_by_reason() -> None:
    """Retries belong to the edge their source and destination labels name."""
    snapshot = _snapshot()
    assert snapshot.retries("orders", "payments") == {"503": 7, "reset": 1}
    assert sum(snapshot.retries("gateway", "inventory").values()) == 2
    assert not snapshot.retries("gateway", "orders")


def test_denials_split_enforced_from_audited_by_status() -> None:
    """A DENIED flag on a 403 is a denial; on any other status, audit mode let it through."""
    snapshot = _snapshot()
    assert snapshot.denials("gateway", "inventory") == (3, 0)
    assert snapshot.denials("anonymous", "gateway") == (0, 40)
    assert snapshot.denials("orders", "inventory") == (0, 0)


def test_rule_denials_and_faults_add_up_over_pages() -> None:
    """Counters of several processes (two payments instances) are added."""
    snapshot = _snapshot()
    assert snapshot.rule_denials(audit=True) == {("gateway", "no-anonymous-orders"): 40}
    assert snapshot.rule_denials(audit=False) == {("inventory", "reserve-only-orders"): 3}
    assert snapshot.faults("payments") == {("chaos-monkey", "abort"): 18}
    assert snapshot.faults("inventory") == {}


def test_shadows_are_what_v2_served_beyond_what_the_gateway_recorded() -> None:
    """92 GETs served by v2 to the gateway, 30 of them calls it recorded: 62 shadows."""
    assert _snapshot().shadows("gateway", "inventory", "v2") == 62
    assert MetricsSnapshot().shadows("gateway", "inventory", "v2") is None


def test_scrape_notes_failed_pages_and_keeps_the_others() -> None:
    """A page that fails is an error entry, not an exception."""

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "good":
            return httpx.Response(200, text=ORDERS)
        return httpx.Response(500, text="boom")

    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        snapshot = scrape(client, {"orders": "http://good/metrics", "gateway": "http://bad/"})
    assert set(snapshot.pages) == {"orders"}
    assert "HTTPStatusError" in snapshot.errors["gateway"]


def test_fetch_topology_returns_none_for_anything_but_a_topology() -> None:
    """A refused or malformed answer is None; a topology is returned as it came."""
    answers = iter([httpx.Response(200, json={"edges": []}), httpx.Response(200, json=[1])])

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.params["window"] == "20s"
        return next(answers, httpx.Response(503))

    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        assert fetch_topology(client, "http://registry", "20s") == {"edges": []}
        assert fetch_topology(client, "http://registry", "20s") is None
        assert fetch_topology(client, "http://registry", "20s") is None


def test_would_be_denials_are_counted_by_rule_from_json_and_console_lines(tmp_path: Path) -> None:
    """structlog's JSON and key=value renderings both name the rule."""
    log = tmp_path / "gateway.log"
    log.write_text(
        '{"event": "request_would_be_denied", "rule": "no-anonymous-orders", "caller": "x"}\n'
        "2025-01-01 [warning] request_would_be_denied caller=anonymous rule='no-anonymous-orders'\n"
        '{"event": "request_denied", "rule": "other"}\n'
    )
    found = would_be_denials([log, tmp_path / "missing.log"])
    assert found == {"no-anonymous-orders": 2}
