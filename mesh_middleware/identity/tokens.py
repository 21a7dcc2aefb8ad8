"""The JWT-SVID format shared by the issuer (registry) and the verifier (apps)."""

from __future__ import annotations

__all__ = ["ACCEPTED_ALGORITHMS", "FORBIDDEN_HEADER_PARAMETERS", "SIGNING_ALGORITHM"]

SIGNING_ALGORITHM = "Ed25519"
"""What the issuer signs with: RFC 9864's fully-specified name for EdDSA over Ed25519."""

ACCEPTED_ALGORITHMS = frozenset({"Ed25519", "EdDSA"})
"""What the verifier accepts: Ed25519 under its RFC 9864 name or the older ``EdDSA``, and only
with an Ed25519 key. Everything else (``none``, HMAC, RSA, ECDSA) is rejected before any key
is looked at."""

FORBIDDEN_HEADER_PARAMETERS = frozenset({"jwk", "jku", "x5u", "x5c", "crit"})
"""Header parameters that would let a token choose its own key (or demand unknown processing)."""
