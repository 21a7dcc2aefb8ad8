"""``mesh doctor``: ask every registry URL an app is given whether they make one registry.

Each URL is asked on its own (no failover: the point is to see each one): is it up, which store
does it use, does it lead, which trust domain and signing keys does it publish, where is its
index. Replicas of one registry must agree on all but the index, and exactly one must lead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httpx

from mesh_middleware.identity.registry_trust import registry_verify
from mesh_middleware.runtime.registry_client import parse_registry_urls

__all__ = ["ReplicaReport", "examine"]

_TIMEOUT = 2.0


@dataclass
class ReplicaReport:
    """What one registry URL said (``error`` if it could not say)."""

    url: str
    error: str | None = None
    store: str | None = None
    replica: str | None = None
    leader: bool | None = None
    index: int | None = None
    trust_domain: str | None = None
    kids: frozenset[str] = field(default_factory=frozenset)

    def row(self) -> tuple[str, ...]:
        if self.error:
            return (self.url, "DOWN", "", "", self.error)
        lead = {True: "yes", False: "no", None: "-"}[self.leader]
        return (self.url, "up", lead, str(self.index), self.store or "")


def _ask(http: httpx.Client, url: str) -> ReplicaReport:
    report = ReplicaReport(url)
    try:
        health = http.get(f"{url}/healthz").json()
        trust = http.get(f"{url}/v1/identity/trust").json()
        jwks = http.get(f"{url}/v1/identity/jwks").json()
    except (httpx.HTTPError, ValueError) as exc:
        report.error = f"{type(exc).__name__}: {exc}"[:200]
        return report
    replica: dict[str, Any] = health.get("replica") or {}
    report.store = health.get("store")
    report.index = health.get("index")
    report.replica = replica.get("replica")
    report.leader = replica.get("leader") if replica else None
    report.trust_domain = trust.get("trust_domain")
    report.kids = frozenset(str(k.get("kid")) for k in jwks.get("keys", []))
    return report


def examine(urls: str) -> tuple[list[ReplicaReport], list[str]]:
    """Ask each URL of ``urls`` (comma-separated); the reports and the problems found."""
    with httpx.Client(timeout=_TIMEOUT, verify=registry_verify()) as http:
        reports = [_ask(http, url) for url in parse_registry_urls(urls)]
    problems = [f"{r.url} does not answer: {r.error}" for r in reports if r.error]
    up = [r for r in reports if not r.error]
    if len(up) < 2:
        return reports, problems
    if len({r.store for r in up}) > 1:
        problems.append("the registries use different stores: they are not replicas of one")
    elif up[0].store and not up[0].store.startswith(("etcd://", "etcds://")):
        problems.append(
            "several URLs name registries on SQLite files: each has its own state; replicas "
            "need --store etcd://… (docs/replicas.md)"
        )
    if len({r.replica for r in up}) < len(up):
        problems.append("two URLs reach the same replica: it counts once for failover")
    leaders = [r.url for r in up if r.leader]
    if len(leaders) > 1:
        problems.append(f"more than one replica leads: {', '.join(leaders)}")
    elif not leaders and all(r.leader is not None for r in up):
        problems.append("no replica leads (normal for a few seconds after the leader died)")
    if len({r.trust_domain for r in up}) > 1:
        problems.append("the registries issue for different trust domains")
    if len({r.kids for r in up}) > 1:
        problems.append("the registries publish different signing keys (a rotation in flight?)")
    return reports, problems
