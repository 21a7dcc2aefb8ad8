"""What the demo reads back: the apps' metrics pages and the registry's topology, and the
figures worked out from them (retries and denials per edge, audit, faults, shadows)."""

from __future__ import annotations

import itertools
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

__all__ = [
    "CLIENT",
    "MetricsSnapshot",
    "Sample",
    "fetch_topology",
    "parse_metrics",
    "scrape",
    "would_be_denials",
]

CLIENT = "anonymous"
"""How the registry and the metrics name a caller without a mesh identity (the demo's client)."""

SCRAPE_TIMEOUT_SECONDS = 2.0
_MAX_PAGE_BYTES = 4 << 20


@dataclass(frozen=True, slots=True)
class Sample:
    """One sample of a metrics page."""

    name: str
    labels: Mapping[str, str]
    value: float


def parse_metrics(text: str) -> list[Sample]:
    """The samples of a Prometheus text page."""
    return [
        Sample(sample.name, dict(sample.labels), float(sample.value))
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


@dataclass(slots=True)
class MetricsSnapshot:
    """The samples of every page scraped at one moment, and the pages that failed."""

    pages: dict[str, list[Sample]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def samples(self, name: str, pages: Iterable[str] | None = None) -> Iterable[Sample]:
        chosen = self.pages if pages is None else {p: self.pages.get(p, []) for p in pages}
        for samples in chosen.values():
            yield from (s for s in samples if s.name == name)

    def total(self, name: str, **labels: str) -> float:
        """The sum of ``name``'s samples on every page whose labels include ``labels``."""
        return sum(
            s.value
            for s in self.samples(name)
            if all(s.labels.get(k) == v for k, v in labels.items())
        )

    def retries(self, source: str, destination: str) -> Counter[str]:
        """Retries ``source`` sent to ``destination``, by the reason the try before failed."""
        found: Counter[str] = Counter()
        for s in self.samples("mesh_outbound_retries_total"):
            labels = s.labels
            if labels.get("source_service") == source and (
                labels.get("destination_service") == destination
            ):
                found[labels.get("reason", "?")] += int(s.value)
        return found

    def denials(self, source: str, destination: str) -> tuple[int, int]:
        """(denied, audited): requests ``destination`` refused from ``source`` with a 403,
        and those an audit-mode rule would have denied but let through."""
        denied = audited = 0
        for s in self.samples("mesh_requests_total"):
            labels = s.labels
            if (
                labels.get("reporter") != "destination"
                or labels.get("source_service") != source
                or labels.get("destination_service") != destination
                or "DENIED" not in labels.get("response_flags", "").split(",")
            ):
                continue
            if labels.get("response_code") == "403":
                denied += int(s.value)
            else:
                audited += int(s.value)
        return denied, audited

    def rule_denials(self, *, audit: bool) -> Counter[tuple[str, str]]:
        """Denials by (service, rule): enforced ones, or audit mode's would-be denials."""
        found: Counter[tuple[str, str]] = Counter()
        for s in self.samples("mesh_authorization_denials_total"):
            if (s.labels.get("mode") == "audit") == audit and s.value:
                found[(s.labels.get("service", "?"), s.labels.get("rule") or "-")] += int(s.value)
        return found

    def faults(self, service: str) -> Counter[tuple[str, str]]:
        """Faults ``service`` injected, by (fault, kind)."""
        found: Counter[tuple[str, str]] = Counter()
        for s in self.samples("mesh_faults_injected_total"):
            if s.labels.get("service") == service and s.value:
                found[(s.labels.get("fault", "?"), s.labels.get("kind", "?"))] += int(s.value)
        return found

    def shadows(self, source: str, destination: str, version: str) -> int | None:
        """About how many mirrored (shadow) requests ``destination``'s ``version`` got.

        Shadows are sent past the source's metrics, so they are the GETs the version's
        instances served to ``source`` minus the calls ``source`` recorded as answered by
        that version (a retry that landed there counts as a shadow: rare).
        """
        if not self.pages:
            return None
        served = self.total(
            "mesh_requests_total",
            reporter="destination",
            source_service=source,
            destination_service=destination,
            destination_version=version,
            method="GET",
        )
        answered = self.total(
            "mesh_requests_total",
            reporter="source",
            source_service=source,
            destination_service=destination,
            destination_version=version,
            method="GET",
        )
        return max(0, int(served - answered))


def scrape(client: httpx.Client, pages: Mapping[str, str]) -> MetricsSnapshot:
    """Fetch and parse each metrics page (name to URL); a page that fails is noted, not fatal."""
    snapshot = MetricsSnapshot()
    for name, url in pages.items():
        try:
            response = client.get(url, timeout=SCRAPE_TIMEOUT_SECONDS)
            response.raise_for_status()
            if len(response.content) > _MAX_PAGE_BYTES:
                raise ValueError(f"page over {_MAX_PAGE_BYTES} bytes")
            snapshot.pages[name] = parse_metrics(response.text)
        except (httpx.HTTPError, ValueError) as exc:
            snapshot.errors[name] = f"{type(exc).__name__}: {exc}"[:200]
    return snapshot


def fetch_topology(client: httpx.Client, registry_url: str, window: str) -> dict[str, Any] | None:
    """The registry's ``GET /v1/telemetry/topology`` answer, or None when it gives none."""
    try:
        response = client.get(
            f"{registry_url}/v1/telemetry/topology",
            params={"window": window},
            timeout=SCRAPE_TIMEOUT_SECONDS,
        )
        response.raise_for_status()
        body = response.json()
    except (httpx.HTTPError, ValueError):
        return None
    return body if isinstance(body, dict) and isinstance(body.get("edges"), list) else None


_RULE = re.compile(r"""\brule"?\s*[=:]\s*['"]?([\w.-]+)""")
_MAX_LOG_BYTES = 64 << 20


def would_be_denials(logs: Iterable[Path]) -> Counter[str]:
    """``request_would_be_denied`` log events in the apps' logs, by the rule they name."""
    found: Counter[str] = Counter()
    for path in logs:
        try:
            with path.open("rb") as handle:
                for raw in itertools.islice(handle, 1_000_000):
                    if b"request_would_be_denied" not in raw:
                        continue
                    match = _RULE.search(raw.decode("utf-8", "replace"))
                    found[match.group(1) if match else "?"] += 1
                    if handle.tell() > _MAX_LOG_BYTES:
                        break
        except OSError:
            continue
    return found
