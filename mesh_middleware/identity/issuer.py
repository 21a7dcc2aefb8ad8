"""Minting JWT-SVIDs: the registry's issuer, and the tests' and demo's stand-in for it."""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

from joserfc import jwt
from joserfc.jwk import OKPKey

from mesh_middleware import defaults
from mesh_middleware.identity.spiffe import service_id
from mesh_middleware.identity.tokens import SIGNING_ALGORITHM

__all__ = ["TokenIssuer", "generate_signing_key"]


def generate_signing_key() -> OKPKey:
    """A new Ed25519 private key whose ``kid`` is its RFC 7638 thumbprint."""
    key = OKPKey.generate_key("Ed25519", auto_kid=True)
    return key


class TokenIssuer:
    """Signs per-audience JWT-SVIDs for the services of one trust domain."""

    def __init__(
        self,
        signing_key: OKPKey | None = None,
        *,
        trust_domain: str = defaults.DEFAULT_TRUST_DOMAIN,
        issuer: str | None = None,
        lifetime: int = defaults.TOKEN_LIFETIME_SECONDS,
    ) -> None:
        self.key = signing_key or generate_signing_key()
        self.kid = str(self.key.kid or self.key.thumbprint())
        self.trust_domain = trust_domain
        self.issuer = issuer or defaults.default_issuer(trust_domain)
        self.lifetime = lifetime

    def mint(
        self,
        service: str,
        audience: str,
        *,
        lifetime: int | None = None,
        now: float | None = None,
        extra_claims: dict[str, Any] | None = None,
    ) -> str:
        """A token saying that ``service`` calls ``audience`` (both service names)."""
        issued = int(now if now is not None else time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": service_id(service, self.trust_domain),
            "aud": [service_id(audience, self.trust_domain)],
            "iat": issued,
            "exp": issued + (lifetime if lifetime is not None else self.lifetime),
            "jti": secrets.token_urlsafe(12),
        }
        claims.update(extra_claims or {})
        header = {"alg": SIGNING_ALGORITHM, "kid": self.kid, "typ": "JWT"}
        return jwt.encode(header, claims, self.key, algorithms=[SIGNING_ALGORITHM])

    def jwks(self) -> dict[str, Any]:
        """The public JWKS document verifiers need."""
        public = self.key.as_dict(private=False)
        public["kid"] = self.kid
        public["alg"] = SIGNING_ALGORITHM
        public["use"] = "sig"
        return {"keys": [public]}

    def save_private_key(self, path: str | Path) -> None:
        """Write the private key as JWK JSON, readable by the owner only (0600)."""
        private = self.key.as_dict(private=True)
        private["kid"] = self.kid
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(private, handle)
        os.chmod(path, 0o600)

    @classmethod
    def from_private_key_file(cls, path: str | Path, **kwargs: Any) -> TokenIssuer:
        """Load an issuer whose key was written by :meth:`save_private_key`."""
        data = json.loads(Path(path).read_text())
        return cls(OKPKey.import_key(data), **kwargs)
