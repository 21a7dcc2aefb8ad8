"""Every metric the mesh exports, defined once (names follow Prometheus conventions)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

__all__ = [
    "AUTHORIZATION_DENIALS",
    "FAULTS_INJECTED",
    "POLICY_RELOADS",
    "REGISTRY_CALLS",
    "REGISTRY_CONNECTED",
    "REGISTRY_STALE_SECONDS",
    "count_denial",
    "count_fault",
    "count_registry_call",
    "count_reload",
    "set_registry_state",
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

REGISTRY_CONNECTED = Gauge(
    "mesh_registry_connected",
    "1 while the last call to the registry succeeded, 0 while it is unreachable.",
    ["service"],
)

REGISTRY_STALE_SECONDS = Gauge(
    "mesh_registry_stale_seconds",
    "Seconds since the registry last answered, while it is unreachable (0 when connected).",
    ["service"],
)

REGISTRY_CALLS = Counter(
    "mesh_registry_client_calls",
    "Calls from this process to the registry, by operation and result (ok, refused, unavailable).",
    ["service", "operation", "result"],
)


def set_registry_state(service: str, connected: bool, stale_seconds: float) -> None:
    REGISTRY_CONNECTED.labels(service).set(1 if connected else 0)
    REGISTRY_STALE_SECONDS.labels(service).set(stale_seconds)


def count_registry_call(service: str, operation: str, result: str) -> None:
    REGISTRY_CALLS.labels(service, operation, result).inc()


def count_reload(service: str, ok: bool) -> None:
    POLICY_RELOADS.labels(service, "success" if ok else "failure").inc()


def count_denial(service: str, rule: str | None, *, audit: bool) -> None:
    AUTHORIZATION_DENIALS.labels(service, rule or "", "audit" if audit else "enforce").inc()


def count_fault(service: str, fault: str, delayed: bool, abort_status: int | None) -> None:
    if delayed:
        FAULTS_INJECTED.labels(service, fault, "delay").inc()
    if abort_status is not None:
        FAULTS_INJECTED.labels(service, fault, "abort").inc()
