"""The registry's own Prometheus metrics, in a registry of their own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

__all__ = [
    "CA_ROOT_EXPIRY",
    "CA_WARNINGS",
    "CERTIFICATES_ISSUED",
    "EXPIRIES",
    "INDEX",
    "INSTANCES",
    "REGISTRATIONS",
    "REGISTRY",
    "RENEWALS",
    "REQUESTS",
    "TOKENS_ISSUED",
    "WATCHERS",
]

REGISTRY = CollectorRegistry(auto_describe=True)

REQUESTS = Counter(
    "mesh_registry_requests",
    "API requests by route and status.",
    ["route", "status"],
    registry=REGISTRY,
)
REGISTRATIONS = Counter(
    "mesh_registry_registrations",
    "Registrations that created or changed an instance.",
    registry=REGISTRY,
)
RENEWALS = Counter(
    "mesh_registry_renewals", "Lease renewals that changed nothing else.", registry=REGISTRY
)
EXPIRIES = Counter(
    "mesh_registry_expiries", "Instances removed because their lease ran out.", registry=REGISTRY
)
TOKENS_ISSUED = Counter(
    "mesh_registry_tokens_issued", "JWT-SVIDs issued.", ["service"], registry=REGISTRY
)
INSTANCES = Gauge("mesh_registry_instances", "Registered instances.", registry=REGISTRY)
WATCHERS = Gauge("mesh_registry_watchers", "Long-poll watches waiting now.", registry=REGISTRY)
INDEX = Gauge("mesh_registry_index", "The catalog's change index.", registry=REGISTRY)
CERTIFICATES_ISSUED = Counter(
    "mesh_registry_certificates_issued",
    "Leaf certificates signed by the mesh CA.",
    ["service"],
    registry=REGISTRY,
)
CA_ROOT_EXPIRY = Gauge(
    "mesh_registry_ca_root_expiry_timestamp_seconds",
    "When each trusted CA root expires (unix time).",
    ["root", "state"],
    registry=REGISTRY,
)
CA_WARNINGS = Gauge(
    "mesh_registry_ca_warnings",
    "CA problems an operator must act on (roots expiring soon, leaves cut short).",
    registry=REGISTRY,
)
