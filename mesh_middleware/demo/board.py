"""The live table: one row per edge (source -> destination) with rate, success, p99, retries
and denials; redrawn in place on a terminal, printed every few seconds otherwise."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from mesh_middleware.demo.scrape import CLIENT, MetricsSnapshot
from mesh_middleware.demo.traffic import Kind, TrafficTally

__all__ = ["EDGES", "Board", "EdgeRow", "edge_rows", "render_edges", "render_status"]

EDGES: tuple[tuple[str, str], ...] = (
    (CLIENT, "gateway"),
    ("gateway", "inventory"),
    ("gateway", "orders"),
    ("orders", "inventory"),
    ("orders", "payments"),
)
"""The shop's edges, in the order the table shows them (others seen are added after)."""

RECENT_SECONDS = 10.0
"""The status line's recent v2 share is over this many seconds."""


@dataclass(frozen=True, slots=True)
class EdgeRow:
    """One edge's figures: from the registry (rate, success, p99) and the metrics pages."""

    source: str
    destination: str
    requests: int | None = None
    rps: float | None = None
    success: float | None = None
    p99: float | None = None  # seconds
    retries: int | None = None
    denials: int | None = None
    audited: int | None = None

    @property
    def label(self) -> str:
        source = "client" if self.source == CLIENT else self.source
        return f"{source} -> {self.destination}"


def edge_rows(
    topology: Mapping[str, Any] | None,
    metrics: MetricsSnapshot | None,
    *,
    seconds: float | None = None,
) -> list[EdgeRow]:
    """The table's rows. ``seconds``: work out rates as requests / seconds (for a summary over
    the traffic's duration) instead of taking the registry's rate over its window."""
    found: dict[tuple[str, str], Mapping[str, Any]] = {}
    for edge in (topology or {}).get("edges", []):
        if isinstance(edge, Mapping):
            found[(str(edge.get("source")), str(edge.get("destination")))] = edge
    # The demo's own probes and scrapes (anonymous calls to /healthz and /metrics) are edges
    # too; only the client's calls to the gateway are its traffic.
    others = sorted(k for k in found if k not in EDGES and k[0] != CLIENT)
    keys = list(EDGES) + others
    rows = []
    for source, destination in keys:
        edge = found.get((source, destination), {})
        requests = _int(edge.get("requests"))
        rps = _float(edge.get("rps"))
        if seconds and requests is not None:
            rps = requests / seconds
        latency = edge.get("latency")
        p99 = _float(latency.get("p99")) if isinstance(latency, Mapping) else None
        retries = denials = audited = None
        if metrics is not None and metrics.pages:
            retries = sum(metrics.retries(source, destination).values())
            denials, audited = metrics.denials(source, destination)
        rows.append(
            EdgeRow(
                source,
                destination,
                requests,
                rps,
                _float(edge.get("success_rate")),
                p99,
                retries,
                denials,
                audited,
            )
        )
    return rows


def _int(value: object) -> int | None:
    return int(value) if isinstance(value, int | float) else None


def _float(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def render_edges(rows: Sequence[EdgeRow]) -> list[str]:
    """The rows as fixed-width text lines, with a header."""
    lines = [
        f"  {'edge':<22} {'req/s':>7} {'success':>8} {'p99 ms':>8} {'retries':>8} {'denials':>8}"
    ]
    for row in rows:
        denials = "-" if row.denials is None else str(row.denials)
        if row.audited:
            denials += f" (+{row.audited} audit)"
        lines.append(
            f"  {row.label:<22} {_fmt(row.rps, '{:.1f}'):>7} "
            f"{_fmt(row.success, '{:.2%}', scale=1.0):>8} {_fmt(row.p99, '{:.1f}', 1000.0):>8} "
            f"{'-' if row.retries is None else str(row.retries):>8} {denials:>8}"
        )
    return lines


def _fmt(value: float | None, pattern: str, scale: float = 1.0) -> str:
    return "-" if value is None else pattern.format(value * scale)


def render_status(tally: TrafficTally, *, until: str) -> str:
    """One line of what the client saw: sent, rate, outcomes by kind, the v2 share so far."""
    rate = tally.sent / tally.elapsed if tally.elapsed > 0 else 0.0
    ok, customer = tally.customer()
    share = tally.v2_share()
    denied = tally.kinds[Kind.RESERVE].statuses.get(403, 0)
    parts = [
        f"t={tally.elapsed:5.1f} s",
        f"sent {tally.sent} ({rate:.1f}/s)",
        f"customer ok {ok}/{customer}",
        f"reads v2 {_percent(share)} of {sum(tally.versions.values())} "
        f"(last {RECENT_SECONDS:g} s: {_percent(tally.recent_v2_share(RECENT_SECONDS))})",
        f"reserve-direct denied {denied}",
    ]
    errors = sum(sum(t.errors.values()) for t in tally.kinds.values())
    if errors or tally.skipped:
        parts.append(f"no answer {errors}, skipped {tally.skipped}")
    return "  ".join(parts) + f"  [{until}]"


def _percent(share: float | None) -> str:
    return "-" if share is None else f"{share:.1%}"


class Board:
    """Prints the table: redrawn in place on a terminal, appended otherwise."""

    def __init__(self, stream: TextIO = sys.stdout, *, tty: bool | None = None) -> None:
        """``tty``: whether to redraw in place (default: whether ``stream`` is a terminal)."""
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self._drawn = 0

    @property
    def interval(self) -> float:
        """Seconds between redraws."""
        return 1.0 if self.tty else 5.0

    def show(self, lines: Sequence[str]) -> None:
        """Draw ``lines``, over the last table on a terminal."""
        out = list(lines)
        if self.tty:
            # A wrapped line would break the redraw: cut lines to the terminal's width.
            width = max(40, shutil.get_terminal_size().columns - 1)
            out = [line[:width] for line in out]
            if self._drawn:
                self.stream.write(f"\x1b[{self._drawn}F\x1b[J")
        self.stream.write("\n".join(out) + "\n")
        if not self.tty:
            self.stream.write("\n")
        self.stream.flush()
        self._drawn = len(out) if self.tty else 0

    def release(self) -> None:
        """Leave the last table on screen: what is printed next goes below it."""
        self._drawn = 0
