"""An OpenID Connect issuer's signing keys: discovery, JWKS, refreshed off the request path.

The discovery document (``{issuer}/.well-known/openid-configuration``) is read and checked
with Authlib's OpenID provider metadata model: its ``issuer`` must be the one configured
(OpenID Connect Discovery §4.3) and its ``jwks_uri`` https (plain http only on loopback). The
JWKS is parsed with joserfc. Only public signing keys are kept: symmetric keys, private key
material and keys meant for encryption are dropped. A failed refresh keeps the last good keys.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from authlib.oidc.discovery import OpenIDProviderMetadata, get_well_known_url
from joserfc.jwk import ECKey, Key, KeySet, OKPKey, RSAKey

from mesh_middleware import defaults
from mesh_middleware.identity.keys import KeyStoreBase

__all__ = ["IssuerKeys", "parse_issuer_jwks"]

_MAX_KEYS = 64
_ASYMMETRIC = {"RSA", "EC", "OKP"}


def parse_issuer_jwks(document: Any) -> dict[str, Key]:
    """The public signing keys of an issuer's JWKS by ``kid``; raise ``ValueError``.

    A key without a ``kid`` is kept under its RFC 7638 thumbprint, so that a token without
    ``kid`` can still be tried against it.
    """
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("a JWKS is an object with a 'keys' list")
    wanted = []
    for entry in document["keys"]:
        if not isinstance(entry, dict) or entry.get("kty") not in _ASYMMETRIC:
            continue  # HMAC secrets never verify end-user tokens: no key confusion
        if entry.get("use", "sig") != "sig" or "d" in entry:
            continue
        wanted.append({k: v for k, v in entry.items() if k not in {"x5c", "x5u", "x5t"}})
        if len(wanted) >= _MAX_KEYS:
            break
    keys: dict[str, Key] = {}
    for key in KeySet.import_key_set({"keys": wanted}).keys:
        if not isinstance(key, RSAKey | ECKey | OKPKey):
            continue
        kid = key.kid or key.thumbprint()
        keys[str(kid)] = key
    return keys


class IssuerKeys(KeyStoreBase[Key]):
    """The keys of one OpenID Connect issuer, by ``kid``.

    With ``jwks_uri`` they are fetched from there; otherwise from the ``jwks_uri`` of the
    issuer's discovery document. ``keys`` alone gives a fixed key set (a policy's inline JWKS).
    """

    def __init__(
        self,
        issuer: str,
        *,
        jwks_uri: str | None = None,
        keys: dict[str, Key] | None = None,
        fetch_timeout: float = defaults.JWKS_FETCH_TIMEOUT_SECONDS,
        min_refetch_seconds: float = defaults.JWKS_MIN_REFETCH_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.issuer = issuer
        self.discovery_url = (
            None if (jwks_uri or keys is not None) else issuer_discovery_url(issuer)
        )
        source = None if keys is not None else (jwks_uri or self.discovery_url)
        super().__init__(
            source,
            keys=keys,
            fetch_timeout=fetch_timeout,
            min_refetch_seconds=min_refetch_seconds,
            clock=clock,
        )
        self.jwks_uri = jwks_uri
        self.loaded = keys is not None
        """Whether keys were ever loaded (a fixed key set counts)."""

    def _load(self, source: str) -> dict[str, Key]:
        jwks_uri = source
        if source == self.discovery_url:
            jwks_uri = self._discover(source)
        keys = parse_issuer_jwks(self._read_url(jwks_uri))
        self.jwks_uri = jwks_uri
        self.loaded = True
        return keys

    def _discover(self, url: str) -> str:
        document = self._read_url(url)
        if not isinstance(document, dict):
            raise ValueError("the discovery document is not a JSON object")
        metadata = OpenIDProviderMetadata(document)
        if metadata.get("issuer") != self.issuer:
            raise ValueError(
                f"the discovery document names issuer {metadata.get('issuer')!r}, "
                f"not {self.issuer!r}"
            )
        metadata.validate_issuer()
        metadata.validate_jwks_uri()
        jwks_uri = metadata.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not jwks_uri:
            raise ValueError("the discovery document has no jwks_uri")
        return jwks_uri


def issuer_discovery_url(issuer: str) -> str:
    """Where an issuer's OpenID Connect discovery document is."""
    return str(get_well_known_url(issuer, external=True))
