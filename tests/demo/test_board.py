"""The live table: rows per edge from the registry's topology and the metrics pages."""

from __future__ import annotations

import io
from typing import Any

from mesh_middleware.demo.board import Board, edge_rows, render_edges, render_status
from mesh_middleware.demo.scrape import MetricsSnapshot, parse_metrics
from mesh_middleware.demo.traffic import Kind, TrafficTally


def _edge(source: str, destination: str, requests: int, **extra: Any) -> dict[str, Any]:
    edge = {
        "source": source,
        "destination": destination,
        "requests": requests,
        "rps": requests / 20,
        "success_rate": 0.995,
        "latency": {"p50": 0.002, "p95": 0.02, "p99": 0.0456},
    }
    return edge | extra


TOPOLOGY = {
    "window_seconds": 20.0,
    "covered_seconds": 20.0,
    "edges": [
        _edge("orders", "payments", 180),
        _edge("anonymous", "gateway", 600),
        _edge("anonymous", "inventory", 4),  # the demo's own scrapes
        _edge("gateway", "search", 10),  # not one of the shop's: shown after them
    ],
}

METRICS = MetricsSnapshot(
    pages={
        "orders": parse_metrics(
            'mesh_outbound_retries_total{source_service="orders",'
            'destination_service="payments",reason="503"} 5.0\n'
        ),
        "inventory-v1-a": parse_metrics(
            'mesh_requests_total{reporter="destination",source_service="gateway",'
            'destination_service="inventory",response_code="403",response_flags="DENIED"} 7.0\n'
        ),
        "gateway": parse_metrics(
            'mesh_requests_total{reporter="destination",source_service="anonymous",'
            'destination_service="gateway",response_code="201",response_flags="DENIED"} 9.0\n'
        ),
    }
)


def test_rows_follow_the_shops_edges_then_others_but_not_the_demos_probes() -> None:
    """Shop edges first, in a fixed order (with or without traffic), unknown edges after,
    anonymous calls other than to the gateway left out."""
    rows = edge_rows(TOPOLOGY, METRICS)
    assert [row.label for row in rows] == [
        "client -> gateway",
        "gateway -> inventory",
        "gateway -> orders",
        "orders -> inventory",
        "orders -> payments",
        "gateway -> search",
    ]
    payments = rows[4]
    assert (payments.requests, payments.rps, payments.retries) == (180, 9.0, 5)
    assert payments.p99 == 0.0456
    assert rows[1].denials == 7
    assert rows[1].requests is None  # no traffic in the window
    assert rows[0].audited == 9


def test_rates_can_be_worked_out_over_the_traffics_own_seconds() -> None:
    """``seconds`` replaces the registry's rate (its window also covers the time before)."""
    rows = edge_rows(TOPOLOGY, None, seconds=12.0)
    assert rows[0].rps == 50.0
    assert rows[0].retries is None and rows[0].denials is None


def test_rendered_rows_show_dashes_for_unknown_figures() -> None:
    """Percent, milliseconds and counts are formatted; unknowns are '-'."""
    lines = render_edges(edge_rows(TOPOLOGY, METRICS))
    assert lines[0].split() == ["edge", "req/s", "success", "p99", "ms", "retries", "denials"]
    assert lines[1].split()[3:] == ["30.0", "99.50%", "45.6", "0", "0", "(+9", "audit)"]
    assert lines[2].split()[3:] == ["-", "-", "-", "0", "7"]
    assert render_edges(edge_rows(None, None))[1].split()[3:] == ["-"] * 5


def test_the_status_line_says_what_the_client_saw() -> None:
    """Sent, rate, customer successes, v2 share and denials, and how long it runs."""
    tally = TrafficTally(elapsed=2.0)
    tally.record(Kind.ITEM, 200, {"inventory": {"version": "v2"}}, "")
    tally.record(Kind.RESERVE, 403, {"rule": "r"}, "")
    tally.skipped = 1
    line = render_status(tally, until="for 20 s")
    assert "sent 2 (1.0/s)" in line
    assert "customer ok 1/1" in line
    assert "reads v2 100.0% of 1 (last 10 s: 100.0%)" in line
    assert "reserve-direct denied 1" in line
    assert "skipped 1" in line
    assert line.endswith("[for 20 s]")


def test_on_a_terminal_the_table_is_redrawn_in_place() -> None:
    """The second draw moves the cursor up over the first and clears below."""
    out = io.StringIO()
    board = Board(out, tty=True)
    board.show(["a", "b"])
    board.show(["c", "d", "e"])
    assert out.getvalue() == "a\nb\n\x1b[2F\x1b[Jc\nd\ne\n"
    board.release()
    board.show(["f"])
    assert out.getvalue().endswith("e\nf\n")


def test_elsewhere_each_table_is_printed_below_the_last() -> None:
    """No escape sequences in a log file; a blank line between tables; 5 s apart."""
    out = io.StringIO()
    board = Board(out, tty=False)
    board.show(["a"])
    board.show(["b"])
    assert out.getvalue() == "a\n\nb\n\n"
    assert board.interval == 5.0
