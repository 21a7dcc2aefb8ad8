"""Forwarding a verified end user from one mesh service to the next.

The forwarding service signs an assertion about the user (issuer, subject, the claims its
policy chose) with a key of its own. That key is bound into its mesh identity tokens as a
``cnf`` claim (RFC 7800) by the registry, so the receiving service, which has already verified
the caller's identity token, checks the assertion with the key that token names: the user is
vouched for by a caller the mesh authenticated, without re-validating the provider's token or
any call to the registry. An assertion names one audience and lives at most 5 minutes, never
past the user's own token.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

from joserfc import errors as jose_errors
from joserfc import jwt
from joserfc.jwk import OKPKey

from mesh_middleware import defaults
from mesh_middleware.errors import IdentityError
from mesh_middleware.identity.end_user import EndUser
from mesh_middleware.identity.tokens import SIGNING_ALGORITHM
from mesh_middleware.identity.verifier import CallerIdentity

__all__ = ["ForwardedUserVerifier", "UserForwarder", "confirmation_key"]

_TYPE = "mesh-user+jwt"
_CACHE_SIZE = 4096
_MAX_ASSERTION_BYTES = 16 * 1024


def confirmation_key(public_jwk: Mapping[str, Any]) -> dict[str, str]:
    """The ``cnf`` JWK of an Ed25519 public key: ``kty``, ``crv`` and ``x`` only.

    Raises ``ValueError`` for anything else (a private key, another curve or key type).
    """
    if public_jwk.get("kty") != "OKP" or public_jwk.get("crv") != "Ed25519":
        raise ValueError("a confirmation key is an Ed25519 public key (kty OKP, crv Ed25519)")
    if "d" in public_jwk:
        raise ValueError("a confirmation key is a public key: 'd' is not allowed")
    x = public_jwk.get("x")
    if not isinstance(x, str) or not 40 <= len(x) <= 46:
        raise ValueError("a confirmation key needs its 'x' (32 bytes, base64url)")
    try:
        OKPKey.import_key({"kty": "OKP", "crv": "Ed25519", "x": x})
    except Exception:  # whatever a bad encoding or point raises, it is a bad key
        raise ValueError("a confirmation key's 'x' is not an Ed25519 public key") from None
    return {"kty": "OKP", "crv": "Ed25519", "x": x}


class UserForwarder:
    """Signs forwarded-user assertions with this process's own key (thread-safe)."""

    def __init__(
        self,
        key: OKPKey | None = None,
        *,
        lifetime: float = defaults.FORWARDED_USER_LIFETIME_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.key = key or OKPKey.generate_key("Ed25519")
        self.public_jwk = confirmation_key(self.key.as_dict(private=False))
        self.lifetime = lifetime
        self._clock = clock
        self._cache: dict[tuple[int, str, tuple[str, ...]], tuple[EndUser, str, float]] = {}
        self._lock = threading.Lock()

    def assertion(
        self, user: EndUser, *, forwarder: str, audience: str, claims: Sequence[str] = ()
    ) -> str:
        """An assertion that ``forwarder`` (a SPIFFE ID) passes ``user`` to ``audience``."""
        now = self._clock()
        key = (id(user), audience, tuple(claims))
        cached = self._cache.get(key)
        # The entry holds the user, so its id is not reused while the entry lives.
        if cached is not None and cached[0] is user and now < cached[2]:
            return cached[1]
        expires = min(now + self.lifetime, user.expires_at)
        if expires <= now:
            raise IdentityError("the end user's token has expired")
        carried = {name: user.claims[name] for name in claims if name in user.claims}
        exp = int(expires) if math.isfinite(expires) else int(now + self.lifetime)
        payload = {
            "iss": forwarder,
            "aud": audience,
            "iat": int(now),
            "exp": exp,
            "user": {"iss": user.issuer, "sub": user.subject, "claims": carried},
        }
        header = {"alg": SIGNING_ALGORITHM, "typ": _TYPE}
        token = jwt.encode(header, payload, self.key, algorithms=[SIGNING_ALGORITHM])
        with self._lock:
            if len(self._cache) >= _CACHE_SIZE:
                self._cache = {}
            # Renewed a minute before it ends, so a receiver never sees it expire in flight.
            self._cache[key] = (user, token, exp - min(60.0, self.lifetime / 5))
        return token


class ForwardedUserVerifier:
    """Verifies forwarded-user assertions; remembers verified ones until they expire."""

    def __init__(
        self,
        *,
        leeway: float = defaults.CLOCK_LEEWAY_SECONDS,
        cache_size: int = _CACHE_SIZE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.leeway = leeway
        self.cache_size = cache_size
        self._clock = clock
        self._cache: dict[tuple[str, str, str], EndUser] = {}

    def verify(self, assertion: str, caller: CallerIdentity, audience: str) -> EndUser:
        """The user ``caller`` forwards to ``audience`` (this service's SPIFFE ID), or raise
        :class:`IdentityError`."""
        now = self._clock()
        key = (assertion, caller.spiffe_id, audience)
        cached = self._cache.get(key)
        if cached is not None:
            if now >= cached.expires_at + self.leeway:
                self._cache.pop(key, None)
                raise IdentityError("forwarded end user expired")
            return cached
        user = self._verify(assertion, caller, audience, now)
        cache = self._cache
        if len(cache) >= self.cache_size:
            with contextlib.suppress(KeyError, StopIteration, RuntimeError):
                del cache[next(iter(cache))]
        cache[key] = user
        return user

    def _verify(self, assertion: str, caller: CallerIdentity, audience: str, now: float) -> EndUser:
        if len(assertion) > _MAX_ASSERTION_BYTES:
            raise IdentityError("forwarded end user is too large")
        if caller.confirmation is None:
            raise IdentityError("the caller's identity token binds no key to forward users with")
        try:
            key = OKPKey.import_key({"kty": "OKP", "crv": "Ed25519", "x": caller.confirmation})
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                decoded = jwt.decode(assertion, key, algorithms=[SIGNING_ALGORITHM])
        except jose_errors.BadSignatureError:
            raise IdentityError("forwarded end user signature is invalid") from None
        except (jose_errors.JoseError, ValueError, TypeError):
            raise IdentityError("forwarded end user is malformed") from None
        if decoded.header.get("typ") != _TYPE:
            raise IdentityError("forwarded end user is not a mesh user assertion")
        claims = decoded.claims
        registry = jwt.JWTClaimsRegistry(
            now=int(now),
            leeway=int(self.leeway),
            iss={"essential": True, "value": caller.spiffe_id},
            aud={"essential": True, "value": audience},
            exp={"essential": True},
        )
        try:
            registry.validate(claims)
        except jose_errors.ExpiredTokenError:
            raise IdentityError("forwarded end user expired") from None
        except jose_errors.JoseError:
            raise IdentityError("forwarded end user is not for this service") from None
        user = claims.get("user")
        if not isinstance(user, dict):
            raise IdentityError("forwarded end user names no user")
        issuer, subject, carried = user.get("iss"), user.get("sub"), user.get("claims", {})
        if not isinstance(issuer, str) or not isinstance(subject, str) or not issuer or not subject:
            raise IdentityError("forwarded end user lacks iss or sub")
        if not isinstance(carried, dict):
            raise IdentityError("forwarded end user claims are not an object")
        return EndUser(
            issuer=issuer,
            subject=subject,
            claims=MappingProxyType({**carried, "iss": issuer, "sub": subject}),
            expires_at=float(claims["exp"]),
            forwarded_by=caller.service,
        )
