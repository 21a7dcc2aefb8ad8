"""Verifying JWT-SVIDs locally, with a bounded cache of verified tokens.

The header is checked before any key is touched: ``alg`` must be Ed25519 (``none``, HMAC and
every other algorithm are refused), ``jwk``/``jku``/``x5u``/``x5c``/``crit`` are refused, and the
``kid`` must name a key from the trust domain's JWKS. Then the signature, ``iss``, ``sub`` (a
service SPIFFE ID in our trust domain), ``aud`` (must name this service), and ``exp``/``nbf``/
``iat`` with a small leeway.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from joserfc import errors as jose_errors
from joserfc import jwt
from mypy_extensions import mypyc_attr

from mesh_middleware import defaults
from mesh_middleware.errors import IdentityError, UnknownSigningKey
from mesh_middleware.identity.keys import KeyStore
from mesh_middleware.identity.spiffe import parse_service_id
from mesh_middleware.identity.tokens import ACCEPTED_ALGORITHMS, FORBIDDEN_HEADER_PARAMETERS

__all__ = ["CallerIdentity", "TokenVerifier", "unverified_segments", "validate_claims"]


@mypyc_attr(native_class=False)  # public: a native class would lose its docstring
@dataclass(frozen=True, slots=True)
class CallerIdentity:
    """Who called: a verified mesh service identity.

    ``confirmation`` is the Ed25519 public key (``x``, base64url) the token binds (its
    ``cnf`` claim): the key the caller signs the end users it forwards with.
    """

    service: str
    spiffe_id: str
    trust_domain: str
    expires_at: float
    token_id: str | None = None
    confirmation: str | None = None


@dataclass(frozen=True, slots=True)
class _Verified:
    identity: CallerIdentity
    audiences: tuple[str, ...]
    not_before: float


class TokenVerifier:
    """Verifies JWT-SVIDs against a :class:`KeyStore`; remembers verified tokens until expiry."""

    def __init__(
        self,
        keys: KeyStore,
        *,
        trust_domain: str = defaults.DEFAULT_TRUST_DOMAIN,
        issuer: str | None = None,
        leeway: float = defaults.CLOCK_LEEWAY_SECONDS,
        cache_size: int = defaults.TOKEN_CACHE_SIZE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.keys = keys
        self.trust_domain = trust_domain
        self.issuer = issuer or defaults.default_issuer(trust_domain)
        self.leeway = leeway
        self.cache_size = cache_size
        self._clock = clock
        self._cache: dict[str, _Verified] = {}
        keys.listeners.append(self.clear_cache)

    def clear_cache(self) -> None:
        """Forget every verified token (the key set changed)."""
        self._cache = {}

    def verify(self, token: str, audience: str) -> CallerIdentity:
        """Return the caller's identity, or raise :class:`IdentityError` saying why not.

        ``audience`` is this service's SPIFFE ID. Raises :class:`UnknownSigningKey` when the
        token names a key the store does not have; a JWKS refetch may then help.
        """
        now = self._clock()
        cached = self._cache.get(token)
        if cached is not None:
            if now >= cached.identity.expires_at + self.leeway:
                self._cache.pop(token, None)
                raise IdentityError("identity token expired")
            if audience not in cached.audiences:
                raise IdentityError("identity token is for another audience")
            if now + self.leeway < cached.not_before:
                raise IdentityError("identity token is not valid yet")
            return cached.identity
        generation = self.keys.generation
        verified = self._verify_uncached(token, audience, now)
        if self.keys.generation != generation:
            # The key set changed while we verified: the key used may be gone. Decide again.
            return self._verify_uncached(token, audience, now).identity
        cache = self._cache
        if len(cache) >= self.cache_size:
            # Another thread may evict at the same moment; losing that race is harmless.
            with contextlib.suppress(KeyError, StopIteration, RuntimeError):
                del cache[next(iter(cache))]
        cache[token] = verified
        return verified.identity

    def _verify_uncached(self, token: str, audience: str, now: float) -> _Verified:
        if len(token) > defaults.MAX_TOKEN_BYTES:
            raise IdentityError("identity token is too large")
        header = unverified_segments(token, "identity token")[0]
        alg = header.get("alg")
        if alg not in ACCEPTED_ALGORITHMS:
            raise IdentityError(f"identity token algorithm {alg!r} is not accepted")
        forbidden = FORBIDDEN_HEADER_PARAMETERS.intersection(header)
        if forbidden:
            raise IdentityError(f"identity token header may not carry {sorted(forbidden)}")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise IdentityError("identity token has no key id (kid)")
        key = self.keys.get(kid)
        if key is None:
            raise UnknownSigningKey(kid)
        claims = self._decode(token, key, str(alg))
        self._check_claims(claims, audience, now)
        td, service = parse_service_id(claims["sub"]) or ("", "")
        audiences = (claims["aud"],) if isinstance(claims["aud"], str) else tuple(claims["aud"])
        identity = CallerIdentity(
            service=service,
            spiffe_id=claims["sub"],
            trust_domain=td,
            expires_at=float(claims["exp"]),
            token_id=claims.get("jti") if isinstance(claims.get("jti"), str) else None,
            confirmation=_confirmation(claims.get("cnf")),
        )
        nbf = claims.get("nbf")
        not_before = float(nbf) if isinstance(nbf, int | float) else float("-inf")
        return _Verified(identity, audiences, not_before)

    def _decode(self, token: str, key: Any, alg: str) -> dict[str, Any]:
        try:
            if alg == "EdDSA":
                # joserfc warns that RFC 9864 deprecates the name; the algorithm is the same.
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    decoded = jwt.decode(token, key, algorithms=[alg])
            else:
                decoded = jwt.decode(token, key, algorithms=[alg])
        except jose_errors.BadSignatureError:
            raise IdentityError("identity token signature is invalid") from None
        except (jose_errors.JoseError, ValueError, TypeError):
            raise IdentityError("identity token is malformed") from None
        if not isinstance(decoded.claims, dict):
            raise IdentityError("identity token claims are not an object")
        return decoded.claims

    def _check_claims(self, claims: dict[str, Any], audience: str, now: float) -> None:
        registry = jwt.JWTClaimsRegistry(
            now=int(now),
            leeway=int(self.leeway),
            iss={"essential": True, "value": self.issuer},
            sub={"essential": True},
            aud={"essential": True, "value": audience},
            exp={"essential": True},
        )
        validate_claims(registry, claims, "identity token")
        if float(claims["exp"]) - now > defaults.MAX_TOKEN_LIFETIME_SECONDS:
            raise IdentityError("identity token lifetime is longer than the mesh allows")
        parsed = parse_service_id(claims["sub"]) if isinstance(claims["sub"], str) else None
        if parsed is None:
            raise IdentityError("identity token subject is not a mesh service SPIFFE ID")
        if parsed[0] != self.trust_domain:
            raise IdentityError("identity token is from another trust domain")


def validate_claims(registry: jwt.JWTClaimsRegistry, claims: dict[str, Any], what: str) -> None:
    """Run joserfc's claim checks; raise :class:`IdentityError` saying, of ``what`` (``identity
    token``, ``end-user token``), what did not hold."""
    try:
        registry.validate(claims)
    except jose_errors.ExpiredTokenError:
        raise IdentityError(f"{what} expired") from None
    except jose_errors.MissingClaimError as exc:
        raise IdentityError(f"{what} lacks required claims: {exc.claim}") from None
    except jose_errors.InvalidClaimError as exc:
        claim = exc.claim
        if claim == "aud":
            raise IdentityError(f"{what} is for another audience") from None
        if claim == "iss":
            raise IdentityError(f"{what} issuer is not trusted") from None
        if claim in {"nbf", "iat"}:
            raise IdentityError(f"{what} is not valid yet") from None
        raise IdentityError(f"{what} claim {claim!r} is invalid") from None
    except jose_errors.JoseError:
        raise IdentityError(f"{what} claims are invalid") from None


def _confirmation(cnf: Any) -> str | None:
    """The Ed25519 key (``x``) of a ``cnf`` claim, or ``None`` when it binds none."""
    if not isinstance(cnf, dict):
        return None
    jwk = cnf.get("jwk")
    if not isinstance(jwk, dict) or jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519":
        return None
    x = jwk.get("x")
    return x if isinstance(x, str) and x else None


def unverified_segments(token: str, what: str, count: int = 1) -> list[dict[str, Any]]:
    """The first ``count`` segments (header, then payload) of a compact JWS, decoded but not
    verified, for choosing how to verify it; raise :class:`IdentityError` about ``what``."""
    parts = token.split(".")
    if len(parts) != 3 or not all(parts):
        raise IdentityError(f"{what} is not a compact JWS")
    decoded = []
    for segment, name in zip(parts[:count], ("header", "payload"), strict=False):
        try:
            value = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
        except (binascii.Error, ValueError):
            raise IdentityError(f"{what} {name} is malformed") from None
        if not isinstance(value, dict):
            raise IdentityError(f"{what} {name} is malformed")
        decoded.append(value)
    return decoded
