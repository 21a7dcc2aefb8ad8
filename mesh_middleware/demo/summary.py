"""The demo's verdict: what the run showed, checked against the bars the shop promises."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mesh_middleware.demo.board import edge_rows, render_edges
from mesh_middleware.demo.scrape import MetricsSnapshot
from mesh_middleware.demo.traffic import Kind, TrafficTally

__all__ = ["SUCCESS_BAR", "V2_SHARE_BAR", "Check", "Findings", "evaluate", "render_summary"]

V2_SHARE_BAR = (0.05, 0.15)
"""The share of item reads inventory v2 may answer (the routes split 90/10)."""

SUCCESS_BAR = 0.99
"""The share of customer requests that must succeed at the gateway while payments fails some."""

MIN_READS = 300
"""Below this many item reads the share is not judged: a correct 10% split would land outside
5-15% too often (11% of the time at 90 reads, 1.8% at 180, 0.1% at 360)."""


@dataclass(frozen=True, slots=True)
class Check:
    """One bar: its name, whether it holds, and the figures behind the answer."""

    name: str
    passed: bool
    detail: str
    judged: bool = True  # False: too little traffic to tell; it does not fail the demo


@dataclass(slots=True)
class Findings:
    """Everything the summary is made of, gathered once the traffic has stopped."""

    tally: TrafficTally
    metrics: MetricsSnapshot
    topology: Mapping[str, Any] | None = None
    logged_would_be: Counter[str] = field(default_factory=Counter)
    mirror_percent: float | None = None
    pids: Sequence[int] = ()
    leftover: Sequence[int] = ()


def evaluate(findings: Findings) -> list[Check]:
    """Every check, in the order the summary prints them."""
    return [
        _denials(findings),
        _v2_share(findings.tally),
        _success(findings),
        _retries(findings.metrics),
        _audit(findings),
        _mirror(findings),
        _processes(findings),
    ]


def _denials(findings: Findings) -> Check:
    tally = findings.tally.kinds[Kind.RESERVE]
    denied = tally.statuses.get(403, 0)
    named = [
        (key, n)
        for key, n in findings.tally.denials.most_common()
        if key[0] == "inventory" and key[1] != "-"
    ]
    parts = [f"{denied} of {tally.sent} reserve-direct calls denied with 403"]
    for (by, rule), count in named:
        reason = findings.tally.denial_reasons.get((by, rule), "")
        parts.append(f"by {by}, rule {rule!r} x{count}: {reason}")
    counted = findings.metrics.rule_denials(audit=False)
    if counted:
        total = sum(counted.values())
        parts.append(
            "the apps' metrics count "
            + ", ".join(f"{s}/{r} x{n}" for (s, r), n in counted.items())
            + (" (more than the calls: other callers were denied too)" if total > denied else "")
        )
    passed = denied > 0 and bool(named) and tally.succeeded == 0
    if tally.succeeded:
        parts.append(f"but {tally.succeeded} were ALLOWED")
    elif denied and not named:
        parts.append(f"but no 403 body names a rule: {tally.examples.get('403', '')}")
    return Check("denials", passed, "; ".join(parts))


def _v2_share(tally: TrafficTally) -> Check:
    reads = sum(tally.versions.values())
    share = tally.v2_share()
    low, high = V2_SHARE_BAR
    bar = f"bar {low:.0%}-{high:.0%}"
    if share is None or reads < MIN_READS:
        seen = f"{share:.1%} of " if share is not None else ""
        return Check(
            "v2 share",
            True,
            f"{seen}{reads} item reads: too few to judge a 10% share (needs {MIN_READS}, "
            f"about 17 s of traffic; {bar})",
            judged=False,
        )
    detail = f"{share:.1%} of {reads} item reads answered by inventory v2 ({bar})"
    others = {v: n for v, n in tally.versions.items() if v not in ("v1", "v2")}
    if others:
        detail += f"; unexpected versions {others}"
    return Check("v2 share", low <= share <= high, detail)


def _success(findings: Findings) -> Check:
    ok, sent = findings.tally.customer()
    # A request skipped at the in-flight cap (the shop too slow to keep up) counts as failed.
    skipped = findings.tally.skipped
    faults = findings.metrics.faults("payments")
    injected = sum(faults.values())
    fault_text = ", ".join(f"{name} {kind} x{n}" for (name, kind), n in faults.items())
    rate = ok / (sent + skipped) if sent else 0.0
    detail = (
        f"{rate:.2%} of {sent} customer requests (item reads, orders) succeeded at the gateway "
        f"(bar >= {SUCCESS_BAR:.0%}); payments injected {injected} faults"
        + (f" ({fault_text})" if fault_text else "")
        + (f"; {skipped} requests skipped at the in-flight cap count as failed" if skipped else "")
    )
    failures = [
        f"{kind.value} {key} x{count}: {tally.examples.get(key, '')[:120]}"
        for kind, tally in findings.tally.kinds.items()
        if kind.customer
        for key, count in [
            *((str(s), n) for s, n in tally.statuses.items() if not 200 <= s < 300),
            *tally.errors.items(),
        ]
    ]
    if failures:
        detail += "; failed: " + "; ".join(failures[:4])
    if not injected:
        detail += "; without injected faults this bar shows nothing"
    return Check("success", bool(sent) and rate >= SUCCESS_BAR and injected > 0, detail)


def _retries(metrics: MetricsSnapshot) -> Check:
    reasons = metrics.retries("orders", "payments")
    total = sum(reasons.values())
    detail = f"{total} retries orders -> payments"
    if reasons:
        detail += " (" + ", ".join(f"{r} x{n}" for r, n in reasons.most_common()) + ")"
    budget = metrics.total(
        "mesh_outbound_retry_budget_exhausted_total",
        source_service="orders",
        destination_service="payments",
    )
    if budget:
        detail += f"; {int(budget)} refused by the retry budget"
    if "orders" in metrics.errors:
        detail += f"; orders' metrics page failed: {metrics.errors['orders']}"
    return Check("retries", total > 0, detail)


def _audit(findings: Findings) -> Check:
    audited = findings.metrics.rule_denials(audit=True)
    total = sum(audited.values())
    rules = ", ".join(f"rule {r!r} ({s}) x{n}" for (s, r), n in audited.most_common())
    logged = sum(findings.logged_would_be.values())
    detail = f"{total} would-be denials let through by audit mode" + (f": {rules}" if rules else "")
    detail += f"; {logged} request_would_be_denied log lines"
    if findings.logged_would_be:
        named = ", ".join(f"{r} x{n}" for r, n in findings.logged_would_be.most_common())
        detail += f" ({named})"
    return Check("audit", total > 0, detail)


def _mirror(findings: Findings) -> Check:
    shadows = findings.metrics.shadows("gateway", "inventory", "v2")
    reads = findings.tally.kinds[Kind.ITEM].sent
    configured = (
        f"; the gateway's policy mirrors {findings.mirror_percent:g}%"
        if findings.mirror_percent is not None
        else ""
    )
    if shadows is None:
        return Check("mirror", False, "no metrics pages could be read" + configured)
    share = f" ({shadows / reads:.0%} of {reads} item reads)" if reads else ""
    detail = f"about {shadows} shadow reads reached inventory v2{share}{configured}"
    return Check("mirror", shadows > 0, detail)


def _processes(findings: Findings) -> Check:
    pids = " ".join(map(str, findings.pids)) or "none"
    if findings.leftover:
        still = " ".join(map(str, findings.leftover))
        return Check("processes", False, f"stopped processes: {pids}; STILL RUNNING: {still}")
    return Check(
        "processes",
        True,
        f"stopped processes: {pids} (none left running)",
    )


def render_summary(findings: Findings, checks: Sequence[Check]) -> list[str]:
    """The summary's lines: the traffic, the edges over the whole run, every check."""
    tally = findings.tally
    rate = tally.sent / tally.elapsed if tally.elapsed > 0 else 0.0
    unanswered = sum(sum(t.errors.values()) for t in tally.kinds.values())
    lines = [
        "",
        f"summary: {tally.elapsed:.1f} s of traffic, {tally.sent} requests to the gateway "
        f"({rate:.1f}/s), {unanswered} without an answer, {tally.skipped} skipped "
        "(in-flight cap)",
    ]
    for kind, kind_tally in tally.kinds.items():
        outcomes = [f"{s} x{n}" for s, n in sorted(kind_tally.statuses.items())]
        outcomes += [f"{e} x{n}" for e, n in kind_tally.errors.most_common()]
        lines.append(f"  {kind.value:<15} {kind_tally.sent:>6}  {', '.join(outcomes) or '-'}")
    if findings.topology is not None:
        window = findings.topology.get("window_seconds", "?")
        lines.append(
            f"  edges, whole run (registry telemetry over its last {window} s; "
            "retries and denials from the metrics pages):"
        )
        covered = findings.topology.get("covered_seconds")
        seconds = tally.elapsed
        if isinstance(covered, int | float):
            seconds = min(seconds, float(covered))  # a long run: the registry keeps 5 minutes
        rows = edge_rows(findings.topology, findings.metrics, seconds=seconds or None)
        lines += ["  " + line for line in render_edges(rows)]
    else:
        lines.append("  edges: the registry gave no topology")
    if findings.metrics.errors:
        failed = ", ".join(f"{p} ({e})" for p, e in findings.metrics.errors.items())
        lines.append(f"  metrics pages that could not be read: {failed}")
    lines += [
        f"  {('ok' if c.passed else 'FAIL') if c.judged else '--':<5} {c.name:<10} {c.detail}"
        for c in checks
    ]
    return lines
