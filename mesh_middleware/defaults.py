"""Every default the mesh takes, in one place (DESIGN §3 and §6 say where each comes from)."""

from __future__ import annotations

__all__ = [
    "CLOCK_LEEWAY_SECONDS",
    "DEFAULT_TRUST_DOMAIN",
    "IDENTITY_HEADER",
    "JWKS_FETCH_TIMEOUT_SECONDS",
    "JWKS_MIN_REFETCH_SECONDS",
    "JWKS_REFRESH_SECONDS",
    "MAX_JWKS_BYTES",
    "MAX_TOKEN_BYTES",
    "MAX_TOKEN_LIFETIME_SECONDS",
    "POLICY_POLL_SECONDS",
    "REGISTRATION_TTL",
    "REGISTRY_BACKOFF_CAP_SECONDS",
    "REGISTRY_BACKOFF_SECONDS",
    "REGISTRY_TIMEOUT_SECONDS",
    "TOKEN_CACHE_SIZE",
    "TOKEN_FETCH_WAIT_SECONDS",
    "TOKEN_LIFETIME_SECONDS",
    "UNKNOWN_KID_WAIT_SECONDS",
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


def default_issuer(trust_domain: str) -> str:
    """The issuer (``iss``) of JWT-SVIDs in a trust domain: the trust domain's own SPIFFE ID."""
    return f"spiffe://{trust_domain}"
