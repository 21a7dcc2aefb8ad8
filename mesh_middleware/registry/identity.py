"""The registry as issuer: signing keys with rotation, join tokens, the admin token.

Rotation without downtime: a new key is published in the JWKS at once but signs only from
``activate_at`` (after verifiers had time to fetch it); the key it replaces stays published
until the last token it signed has expired.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
from joserfc.jwk import OKPKey

from mesh_middleware import defaults
from mesh_middleware.identity.issuer import TokenIssuer, generate_signing_key
from mesh_middleware.registry.store import JoinTokenRecord, KeyRecord, Store

__all__ = ["AdminToken", "JoinTokens", "KeyRing", "hash_secret"]

log = structlog.get_logger("mesh.registry")

_JOIN_PREFIX = "mjt_"


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


class KeyRing:
    """The trust domain's signing keys: which one signs now, which ones are published."""

    def __init__(
        self,
        store: Store,
        *,
        trust_domain: str,
        issuer: str,
        token_lifetime: int,
        publish_lead: float,
        rotation: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._clock = clock
        self.trust_domain = trust_domain
        self.issuer = issuer
        self.token_lifetime = token_lifetime
        self.publish_lead = publish_lead
        self.rotation = rotation
        self._keys = {record.kid: record for record in store.load_keys()}
        self._issuers: dict[str, TokenIssuer] = {}
        if not self._keys:
            # The first key signs at once: there is no verifier to wait for yet.
            self._add(generate_signing_key(), activate_at=self._clock())

    def _add(self, key: OKPKey, *, activate_at: float) -> KeyRecord:
        kid = str(key.kid or key.thumbprint())
        private = key.as_dict(private=True)
        private["kid"] = kid
        record = KeyRecord(kid, private, self._clock(), activate_at, None)
        self._store.put_key(record)
        self._keys[kid] = record
        return record

    def reload(self) -> None:
        """Take the keys from the store again (another replica changed them)."""
        self._keys = {record.kid: record for record in self._store.load_keys()}
        for kid in set(self._issuers) - set(self._keys):
            del self._issuers[kid]

    def signing_key(self) -> KeyRecord:
        """The newest key whose signing has begun."""
        now = self._clock()
        active = [k for k in self._keys.values() if k.activate_at <= now]
        return max(active, key=lambda k: (k.activate_at, k.created_at))

    def issuer_for(self, record: KeyRecord) -> TokenIssuer:
        issuer = self._issuers.get(record.kid)
        if issuer is None:
            issuer = TokenIssuer(
                OKPKey.import_key(record.private_jwk),
                trust_domain=self.trust_domain,
                issuer=self.issuer,
                lifetime=self.token_lifetime,
            )
            self._issuers[record.kid] = issuer
        return issuer

    def mint(
        self, service: str, audience: str, *, cnf: dict[str, str] | None = None
    ) -> tuple[str, int]:
        """A JWT-SVID for ``service`` calling ``audience``, and its expiry (unix time).

        ``cnf`` is a public key the service holds (RFC 7800): the token binds it, so what the
        service signs with it (the end users it forwards) is trusted as coming from it.
        """
        now = self._clock()
        extra = {"cnf": {"jwk": cnf}} if cnf is not None else None
        token = self.issuer_for(self.signing_key()).mint(
            service, audience, now=now, extra_claims=extra
        )
        return token, int(now) + self.token_lifetime

    def jwks(self) -> dict[str, Any]:
        """Every published key (all not yet retired), public parts only."""
        now = self._clock()
        keys = []
        for record in sorted(self._keys.values(), key=lambda k: k.created_at):
            if record.retire_at is not None and record.retire_at <= now:
                continue
            keys.extend(self.issuer_for(record).jwks()["keys"])
        return {"keys": keys}

    def rotate(self) -> KeyRecord:
        """Publish a new key now; it signs after the publish lead, and the old one retires
        once every token it could have signed has expired."""
        now = self._clock()
        new = self._add(generate_signing_key(), activate_at=now + self.publish_lead)
        retire_at = new.activate_at + self.token_lifetime + defaults.CLOCK_LEEWAY_SECONDS
        for record in list(self._keys.values()):
            if record.kid != new.kid and record.retire_at is None:
                retired = KeyRecord(
                    record.kid, record.private_jwk, record.created_at, record.activate_at, retire_at
                )
                self._store.put_key(retired)
                self._keys[record.kid] = retired
        log.info("signing_key_rotated", kid=new.kid, signs_from=new.activate_at)
        return new

    def maintain(self) -> None:
        """Rotate when the signing key is old; forget keys that retired."""
        now = self._clock()
        for record in list(self._keys.values()):
            if record.retire_at is not None and record.retire_at <= now:
                self._store.delete_key(record.kid)
                del self._keys[record.kid]
                self._issuers.pop(record.kid, None)
        newest = max(self._keys.values(), key=lambda k: k.created_at)
        if now - newest.created_at >= self.rotation:
            self.rotate()


class JoinTokens:
    """Operator-issued credentials, one service each, kept only as hashes."""

    def __init__(self, store: Store, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._clock = clock
        self._tokens = {record.token_id: record for record in store.load_join_tokens()}

    def reload(self) -> None:
        """Take the tokens from the store again (another replica changed them)."""
        self._tokens = {record.token_id: record for record in self._store.load_join_tokens()}

    def create(self, service: str) -> tuple[str, JoinTokenRecord]:
        """A new join token for ``service``: the token (shown once) and what is stored."""
        token_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)
        record = JoinTokenRecord(token_id, service, hash_secret(secret), self._clock())
        self._store.put_join_token(record)
        self._tokens[token_id] = record
        return f"{_JOIN_PREFIX}{token_id}.{secret}", record

    def service_of(self, token: str) -> str | None:
        """The service a presented join token belongs to, or ``None`` if it is not valid."""
        if not token.startswith(_JOIN_PREFIX) or "." not in token:
            return None
        token_id, _, secret = token[len(_JOIN_PREFIX) :].partition(".")
        record = self._tokens.get(token_id)
        if record is None:
            return None
        if not hmac.compare_digest(record.secret_hash, hash_secret(secret)):
            return None
        return record.service

    def list(self) -> list[JoinTokenRecord]:
        return sorted(self._tokens.values(), key=lambda r: r.created_at)

    def revoke(self, token_id: str) -> bool:
        if token_id not in self._tokens:
            return False
        self._store.delete_join_token(token_id)
        del self._tokens[token_id]
        return True


class AdminToken:
    """A registry credential kept in a file: created at first start, stored 0600, shown once.

    The admin token (``admin.token``, prefix ``mat_``) manages the registry; the read-only
    viewer token (``viewer.token``, prefix ``mvt_``) opens the dashboard and nothing else.
    """

    def __init__(
        self,
        path: Path,
        prefix: str = "mat_",
        *,
        shared: Callable[[str], str] | None = None,
    ) -> None:
        self.path = path
        self.created = False
        self.token_shown_once: str | None = None
        if path.exists():
            self._hash = hash_secret(path.read_text().strip())
        else:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            token = prefix + secrets.token_urlsafe(32)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(token + "\n")
            self._hash = hash_secret(token)
            self.created = True
            self.token_shown_once = token
        if shared is not None:
            # Replicas share one token: the first replica's. A replica that came later holds
            # no copy of it (its own file is removed, or left aside if it was there before).
            in_force = shared(self._hash)
            if in_force != self._hash:
                if self.created:
                    path.unlink()
                else:
                    log.warning("registry_token_file_stale", path=str(path))
                self.created = False
                self.token_shown_once = None
                self._hash = in_force

    def matches(self, presented: str) -> bool:
        return hmac.compare_digest(self._hash, hash_secret(presented))
