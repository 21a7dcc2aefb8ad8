"""Every default the mesh takes, in one place (DESIGN §3 and §6 say where each comes from)."""

from __future__ import annotations

__all__ = [
    "CLOCK_LEEWAY_SECONDS",
    "DEADLINE_HEADER",
    "DEFAULT_TRUST_DOMAIN",
    "DISCOVERY_FIRST_WAIT_SECONDS",
    "DISCOVERY_MIN_POLL_SECONDS",
    "DISCOVERY_WAIT",
    "EWMA_DECAY_SECONDS",
    "EWMA_DEFAULT_SECONDS",
    "FORWARDED_USER_HEADER",
    "FORWARDED_USER_LIFETIME_SECONDS",
    "IDENTITY_HEADER",
    "JWKS_FETCH_TIMEOUT_SECONDS",
    "JWKS_MIN_REFETCH_SECONDS",
    "JWKS_REFRESH_SECONDS",
    "MAX_EJECTION_SECONDS",
    "MAX_JWKS_BYTES",
    "MAX_MIRRORS_IN_FLIGHT",
    "MAX_TOKEN_BYTES",
    "MAX_TOKEN_LIFETIME_SECONDS",
    "MAX_WATCHED_SERVICES",
    "MIRROR_DRAIN_SECONDS",
    "PEER_KEY",
    "POLICY_POLL_SECONDS",
    "REGISTRATION_TTL",
    "REGISTRY_BACKOFF_CAP_SECONDS",
    "REGISTRY_BACKOFF_SECONDS",
    "REGISTRY_TIMEOUT_SECONDS",
    "REPORT_INTERVAL_SECONDS",
    "RETRY_AFTER_MAX_SECONDS",
    "RETRY_BACKOFF_BASE_SECONDS",
    "RETRY_BACKOFF_CAP_SECONDS",
    "RETRY_BUDGET_WINDOW_SECONDS",
    "SHADOW_HEADER",
    "TOKEN_CACHE_SIZE",
    "TOKEN_FETCH_WAIT_SECONDS",
    "TOKEN_LIFETIME_SECONDS",
    "UNKNOWN_KID_WAIT_SECONDS",
    "ZONE_OVERPROVISIONING",
    "default_issuer",
]

DEFAULT_TRUST_DOMAIN = "mesh.local"
"""SPIFFE trust domain of service identities: ``spiffe://mesh.local/svc/<service>``."""

IDENTITY_HEADER = "x-mesh-identity"
"""The header carrying a caller's JWT-SVID (``Authorization`` belongs to the app)."""

TOKEN_LIFETIME_SECONDS = 600
"""JWT-SVID lifetime; clients renew at half of it (Istio renews certificates at 50%)."""

CLOCK_LEEWAY_SECONDS = 10
"""Allowed clock skew when checking ``exp``, ``nbf`` and ``iat``."""

TOKEN_CACHE_SIZE = 10_000
"""Verified tokens kept per process; the oldest is dropped first."""

MAX_TOKEN_BYTES = 8192
"""A longer identity header is rejected before any parsing."""

JWKS_REFRESH_SECONDS = 300.0
"""How often a JWKS URL is refetched in the background (jittered)."""

JWKS_MIN_REFETCH_SECONDS = 10.0
"""An unknown ``kid`` refetches the JWKS at most this often."""

JWKS_FETCH_TIMEOUT_SECONDS = 2.0
"""Overall deadline of one JWKS fetch (connect, headers and body)."""

UNKNOWN_KID_WAIT_SECONDS = 2.5
"""How long a request naming an unknown ``kid`` waits for the refetch it triggered."""

MAX_TOKEN_LIFETIME_SECONDS = 24 * 3600
"""A token valid for longer than this (``exp`` beyond now) is refused."""

MAX_JWKS_BYTES = 256 * 1024
"""A larger JWKS document is refused."""

POLICY_POLL_SECONDS = 0.5
"""How often the policy file is checked for changes (changes apply within 2 s)."""

REGISTRY_TIMEOUT_SECONDS = 2.0
"""Timeout of each phase (connect, send, read) of one call to the registry."""

REGISTRATION_TTL = "15s"
"""The lease an instance asks for; it renews every third of it (jittered)."""

REGISTRY_BACKOFF_SECONDS = 0.5
"""First retry delay after a failed registry call; doubles per failure (jittered)."""

REGISTRY_BACKOFF_CAP_SECONDS = 10.0
"""Longest delay between retries while the registry is unreachable."""

TOKEN_FETCH_WAIT_SECONDS = 1.0
"""How long a caller of ``Mesh.identity_token`` may wait for a token that is not cached yet."""


# -- outbound (DESIGN §6) ----------------------------------------------------------------------

DISCOVERY_WAIT = "30s"
"""How long one registry watch (long-poll) waits for a change; the registry adds jitter."""

DISCOVERY_FIRST_WAIT_SECONDS = 1.0
"""How long a first call to a destination not yet in the discovery cache waits for it."""

DISCOVERY_MIN_POLL_SECONDS = 1.0
"""A watch that answered without a change waits at least this long (jittered) before the next."""

MAX_WATCHED_SERVICES = 256
"""Destinations watched at once by one process; calls to more fail with NoHealthyInstances."""

EWMA_DEFAULT_SECONDS = 0.030
"""Latency assumed for an instance not measured yet (Linkerd, Finagle)."""

EWMA_DECAY_SECONDS = 10.0
"""Time constant of the peak-EWMA latency estimate."""

ZONE_OVERPROVISIONING = 1.4
"""Traffic stays in the local zone while 1.4 * its healthy fraction ≥ 1, then spills (Envoy)."""

MAX_EJECTION_SECONDS = 300.0
"""Longest outlier ejection, however often an instance was ejected before (Envoy)."""

RETRY_BACKOFF_BASE_SECONDS = 0.025
"""Full-jitter retry backoff: random(0, min(cap, base · 2^n)) (Envoy, AWS)."""

RETRY_BACKOFF_CAP_SECONDS = 0.25
"""Longest retry backoff drawn from the full-jitter formula."""

RETRY_AFTER_MAX_SECONDS = 10.0
"""A ``Retry-After`` longer than this (or than the time left) ends retrying instead."""

RETRY_BUDGET_WINDOW_SECONDS = 10.0
"""The window over which retries are limited to ratio * requests + min_per_second * window."""

DEADLINE_HEADER = "x-mesh-deadline-ms"
"""Milliseconds the caller will still wait: relative, so the two clocks need not agree."""

SHADOW_HEADER = "x-mesh-shadow"
"""Marks mirrored (shadow) requests; their Host also gets a ``-shadow`` suffix, as Envoy does."""

MAX_MIRRORS_IN_FLIGHT = 64
"""Mirrored requests in flight per process; more are dropped, never queued."""

MIRROR_DRAIN_SECONDS = 2.0
"""How long a closing sync client waits for its mirrored requests in flight."""


REPORT_INTERVAL_SECONDS = 10.0
"""How often a process sends its per-edge request aggregates to the registry."""


def default_issuer(trust_domain: str) -> str:
    """The issuer (``iss``) of JWT-SVIDs in a trust domain: the trust domain's own SPIFFE ID."""
    return f"spiffe://{trust_domain}"


PEER_KEY = "mesh.peer"
"""The ASGI scope / WSGI environ key where ``mesh run`` puts the SPIFFE ID of the client
certificate of a mutual-TLS connection (servers cannot set it from a request's bytes)."""

FORWARDED_USER_HEADER = "x-mesh-user"
"""Carries the end user a mesh service forwards: a JWS signed with the key its identity token
binds (``cnf``), so the next service trusts it without the provider's token."""

FORWARDED_USER_LIFETIME_SECONDS = 300
"""A forwarded user's assertion lives this long at most (never past the user's own token)."""
