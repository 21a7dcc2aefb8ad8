"""End users: tokens from OpenID Connect issuers, verified locally with cached keys.

The same checks as for mesh identity tokens, with the algorithms and audiences the policy
names for each issuer: the header is read before any key is touched (``alg`` must be one the
issuer allows, all asymmetric; ``jwk``/``jku``/``x5u``/``x5c``/``crit`` are refused), the
``iss`` must be a configured issuer, the signature must verify with that issuer's key, and
``exp`` (required), ``nbf`` and ``iat`` must hold within the issuer's clock skew, and ``aud``
must name an accepted audience when the issuer lists any. Verified tokens are remembered in a
bounded cache until they expire.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from joserfc import errors as jose_errors
from joserfc import jwt
from joserfc.jwk import Key
from mypy_extensions import mypyc_attr

from mesh_middleware import defaults
from mesh_middleware.errors import (
    EndUserKeysPending,
    EndUserKeysUnavailable,
    IdentityError,
    RequestError,
    UnknownUserSigningKey,
)
from mesh_middleware.identity.oidc import IssuerKeys
from mesh_middleware.identity.tokens import FORBIDDEN_HEADER_PARAMETERS
from mesh_middleware.identity.verifier import unverified_segments, validate_claims
from mesh_middleware.policy.schema import EndUserIssuer, EndUsersPolicy

if TYPE_CHECKING:
    from mesh_middleware.identity.end_user_keys import EndUserKeyring

__all__ = [
    "EndUser",
    "EndUserAuthentication",
    "EndUserKeysPending",
    "EndUserKeysUnavailable",
    "UnknownUserSigningKey",
]

MAX_USER_TOKEN_BYTES = 16 * 1024
_MAX_KEYS_TRIED = 8
# The cache is keyed by the token's last characters (its signature's end: 256 bits, random to
# whoever has no signing key) and an entry is used only when the whole token equals its own:
# hashing a whole token (hundreds of characters, new each request) was a fifth of its cost.
_CACHE_KEY_CHARS = 43


@mypyc_attr(native_class=False)  # public: a native class would lose its docstring
@dataclass(frozen=True, slots=True)
class EndUser:
    """A verified end user: the token's issuer and subject, and its claims (read-only).

    ``principal`` is ``iss/sub``, what ``users`` conditions match (Istio's request principal).
    ``forwarded_by`` names the mesh service that forwarded this user, when it came that way
    rather than with the provider's own token.
    """

    issuer: str
    subject: str
    claims: Mapping[str, Any] = field(repr=False)
    expires_at: float
    forwarded_by: str | None = None
    principal: str = field(default="", compare=False)
    memo: dict[object, bool] = field(default_factory=dict, compare=False, repr=False)
    """What each rule's end-user conditions made of this user (they depend on it alone)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "principal", f"{self.issuer}/{self.subject}")


Location = tuple[str, str, str]
"""Where a token is read: (lower-case header name, lower-case prefix, cookie name or "")."""


@dataclass(frozen=True, slots=True)
class _Issuer:
    spec: EndUserIssuer
    keys: IssuerKeys | None
    algorithms: frozenset[str]
    audiences: frozenset[str]
    accepted: frozenset[Location]
    clock_skew: float


def _locations(spec: EndUserIssuer) -> list[Location]:
    found = [(h.name, h.prefix.lower(), "") for h in spec.locations]
    return found + [("cookie", "", name) for name in spec.from_cookies]


class EndUserAuthentication:
    """Finds and verifies end-user tokens for one policy's ``inbound.end_users``.

    :meth:`bind` gives it key sets (a :class:`EndUserKeyring`); unbound, any token is refused
    as unverifiable (503), as the keys cannot be known.
    """

    def __init__(
        self,
        settings: EndUsersPolicy,
        *,
        cache_size: int = defaults.TOKEN_CACHE_SIZE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.cache_size = cache_size
        self._clock = clock
        self._cache: dict[str, tuple[str, EndUser]] = {}
        self._epoch = 0
        self._issuers: dict[str, _Issuer] = {
            spec.issuer: _issuer(spec, None) for spec in settings.issuers
        }
        locations: list[Location] = []
        for spec in settings.issuers:
            locations.extend(_locations(spec))
        self.locations = tuple(dict.fromkeys(locations))

    @property
    def issuers(self) -> list[str]:
        return list(self._issuers)

    def bind(self, keyring: EndUserKeyring) -> None:
        """Take each issuer's key set from ``keyring`` (fetching new ones in the background)."""
        issuers = {
            spec.issuer: _issuer(spec, keyring.keys_for(spec)) for spec in self.settings.issuers
        }
        for issuer in issuers.values():
            assert issuer.keys is not None
            if self.clear_cache not in issuer.keys.listeners:
                issuer.keys.listeners.append(self.clear_cache)
        self._issuers = issuers
        self._cache = {}

    def clear_cache(self) -> None:
        """Forget every verified token (an issuer's key set changed)."""
        self._epoch += 1
        self._cache = {}

    def token_in(self, headers: Mapping[str, str]) -> tuple[str, Location] | None:
        """The end-user token the request carries, and where; ``None`` when it has none.

        Raises :class:`RequestError` when several locations carry different tokens.
        """
        found: tuple[str, Location] | None = None
        for location in self.locations:
            header, prefix, cookie = location
            raw = headers.get(header)
            if raw is None:
                continue
            token = _cookie(raw, cookie) if cookie else _after_prefix(raw, prefix)
            if token is None:
                continue
            if found is not None and found[0] != token:
                raise RequestError("the request carries more than one end-user token")
            if found is None:
                found = (token, location)
        return found

    def verify(self, token: str, location: Location | None = None) -> EndUser:
        """The end user ``token`` names, or raise :class:`IdentityError` saying why not."""
        now = self._clock()
        key = token[-_CACHE_KEY_CHARS:]
        entry = self._cache.get(key)
        if entry is not None and entry[0] == token:
            cached = entry[1]
            issuer = self._issuers.get(cached.issuer)
            if issuer is None or (location is not None and location not in issuer.accepted):
                raise IdentityError("end-user token is not accepted where it was sent")
            if now >= cached.expires_at + issuer.clock_skew:
                self._cache.pop(key, None)
                raise IdentityError("end-user token expired")
            return cached
        epoch = self._epoch
        user = self._verify_uncached(token, location, now)
        if self._epoch != epoch:
            # A key set changed while we verified: the key used may be gone. Decide again.
            return self._verify_uncached(token, location, now)
        cache = self._cache
        if len(cache) >= self.cache_size:
            with contextlib.suppress(KeyError, StopIteration, RuntimeError):
                del cache[next(iter(cache))]
        cache[key] = (token, user)
        return user

    def _verify_uncached(self, token: str, location: Location | None, now: float) -> EndUser:
        if len(token) > MAX_USER_TOKEN_BYTES:
            raise IdentityError("end-user token is too large")
        header, payload = unverified_segments(token, "end-user token", 2)
        iss = payload.get("iss")
        issuer = self._issuers.get(iss) if isinstance(iss, str) else None
        if issuer is None:
            raise IdentityError("end-user token issuer is not trusted here")
        if location is not None and location not in issuer.accepted:
            raise IdentityError("end-user token is not accepted where it was sent")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in issuer.algorithms:
            raise IdentityError(f"end-user token algorithm {alg!r} is not accepted")
        forbidden = FORBIDDEN_HEADER_PARAMETERS.intersection(header)
        if forbidden:
            raise IdentityError(f"end-user token header may not carry {sorted(forbidden)}")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise IdentityError("end-user token key id (kid) is not a string")
        keys = issuer.keys
        if keys is None or not keys.loaded:
            # A fetch under way (or one started now, rate-limited as for an unknown kid) is
            # worth a short wait; otherwise the request cannot be judged.
            if keys is not None and (keys.fetching or keys.refetch_for(kid or "") is not None):
                raise EndUserKeysPending(kid or "", keys)
            raise EndUserKeysUnavailable(
                f"the keys of issuer {issuer.spec.issuer!r} are not available yet"
            )
        if kid:
            key = keys.get(kid)
            if key is None:
                raise UnknownUserSigningKey(kid, keys)
            candidates = [key]
        else:
            candidates = keys.all()[:_MAX_KEYS_TRIED]
        claims = _decode(token, candidates, alg)
        _check_claims(claims, issuer, now)
        expires = float(claims["exp"])
        return EndUser(
            issuer=issuer.spec.issuer,
            subject=claims["sub"],
            claims=MappingProxyType(claims),
            expires_at=expires,
        )


def _issuer(spec: EndUserIssuer, keys: IssuerKeys | None) -> _Issuer:
    return _Issuer(
        spec=spec,
        keys=keys,
        algorithms=frozenset(spec.algorithms),
        audiences=frozenset(spec.audiences),
        accepted=frozenset(_locations(spec)),
        clock_skew=spec.clock_skew,
    )


def _after_prefix(raw: str, prefix: str) -> str | None:
    """The token after ``prefix`` (lower-case; matched in any case, as Envoy does)."""
    if not prefix:
        token = raw.strip()
    elif raw[: len(prefix)].lower() == prefix:
        token = raw[len(prefix) :].strip()
    else:
        return None
    return token or None


def _cookie(raw: str, name: str) -> str | None:
    for part in raw.split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key == name:
            return value.strip().strip('"') or None
    return None


def _decode(token: str, candidates: Iterable[Key], alg: str) -> dict[str, Any]:
    bad_signature = False
    for key in candidates:
        try:
            with warnings.catch_warnings():
                # joserfc warns that RFC 9864 deprecates the name EdDSA; it is still Ed25519.
                warnings.simplefilter("ignore")
                decoded = jwt.decode(token, key, algorithms=[alg])
        except jose_errors.BadSignatureError:
            bad_signature = True
            continue
        except (jose_errors.JoseError, ValueError, TypeError):
            # A key of the wrong type for `alg` (an RSA key for ES256, say) lands here too.
            continue
        if not isinstance(decoded.claims, dict):
            raise IdentityError("end-user token claims are not an object")
        return decoded.claims
    if bad_signature:
        raise IdentityError("end-user token signature is invalid")
    raise IdentityError("end-user token does not verify with its issuer's keys")


def audience_list(value: object) -> list[str] | None:
    """A token's ``aud`` as a list; ``None`` when it is neither a string nor a list of them."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(a, str) for a in value):
        return value
    return None


def _check_claims(claims: dict[str, Any], issuer: _Issuer, now: float) -> None:
    audience = claims.get("aud")
    if audience is not None and audience_list(audience) is None:
        raise IdentityError("end-user token audience (aud) is not a string or a list of them")
    for name in ("iat", "nbf"):
        value = claims.get(name)
        if value is not None and (not isinstance(value, int | float) or isinstance(value, bool)):
            raise IdentityError(f"end-user token {name} is not a number")
    options: dict[str, Any] = {"iss": {"essential": True, "value": issuer.spec.issuer}}
    options["sub"] = {"essential": True}
    options["exp"] = {"essential": True}
    if issuer.audiences:
        options["aud"] = {"essential": True, "values": sorted(issuer.audiences)}
    registry = jwt.JWTClaimsRegistry(now=int(now), leeway=int(issuer.clock_skew), **options)
    validate_claims(registry, claims, "end-user token")
    if not isinstance(claims.get("sub"), str) or not claims["sub"]:
        raise IdentityError("end-user token subject (sub) is not a string")
    if not isinstance(claims.get("exp"), int | float) or isinstance(claims.get("exp"), bool):
        raise IdentityError("end-user token expiry (exp) is not a number")
