"""Every metric the mesh exports, defined once (names follow Prometheus conventions)."""

from __future__ import annotations

from prometheus_client import Counter

__all__ = [
    "AUTHORIZATION_DENIALS",
    "FAULTS_INJECTED",
    "POLICY_RELOADS",
    "count_denial",
    "count_fault",
    "count_reload",
]

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

FAULTS_INJECTED = Counter(
    "mesh_faults_injected",
    "Faults injected into inbound requests, by fault and kind (delay, abort).",
    ["service", "fault", "kind"],
)


def count_reload(service: str, ok: bool) -> None:
    POLICY_RELOADS.labels(service, "success" if ok else "failure").inc()


def count_denial(service: str, rule: str | None, *, audit: bool) -> None:
    AUTHORIZATION_DENIALS.labels(service, rule or "", "audit" if audit else "enforce").inc()


def count_fault(service: str, fault: str, delayed: bool, abort_status: int | None) -> None:
    if delayed:
        FAULTS_INJECTED.labels(service, fault, "delay").inc()
    if abort_status is not None:
        FAULTS_INJECTED.labels(service, fault, "abort").inc()
