"""The store interface the catalog and the issuer write through.

Each call is durable when it returns: the API acknowledges a registration only after its
``put_instance`` returned. Leases are not stored (an instance's lease starts afresh when a
registry loads it), so renewals that change nothing never touch the store. A replicated store
(etcd) implements the same calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

__all__ = ["CARootRecord", "InstanceRecord", "JoinTokenRecord", "KeyRecord", "Store"]


@dataclass(frozen=True, slots=True)
class InstanceRecord:
    """One registered instance, as stored."""

    service: str
    instance_id: str
    address: str
    port: int
    version: str | None
    zone: str | None
    metadata: dict[str, str]
    ttl: float
    check: dict[str, Any] | None
    modify_index: int


@dataclass(frozen=True, slots=True)
class JoinTokenRecord:
    """A join token: its public id, its service, and the SHA-256 of its secret."""

    token_id: str
    service: str
    secret_hash: str
    created_at: float


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """A signing key: published from creation, signs from ``activate_at``, gone at ``retire_at``."""

    kid: str
    private_jwk: dict[str, Any]
    created_at: float
    activate_at: float
    retire_at: float | None


@dataclass(frozen=True, slots=True)
class CARootRecord:
    """A root of the mesh CA: trusted from creation, signs from ``activate_at``, gone at
    ``retire_at`` (then kept with an empty ``key_pem``, so that it is never trusted again).
    ``supplied`` roots came from the operator and are never rotated by the registry itself."""

    root_id: str
    certificate_pem: str
    key_pem: str
    created_at: float
    activate_at: float
    retire_at: float | None
    supplied: bool


class Store(Protocol):
    """What the registry needs from its storage."""

    url: str

    def load_instances(self) -> list[InstanceRecord]: ...
    def put_instance(self, record: InstanceRecord) -> None:
        """Store an instance and, in the same transaction, its ``modify_index`` as the index."""
        ...

    def delete_instance(self, service: str, instance_id: str, index: int) -> None:
        """Remove an instance and record ``index`` in the same transaction."""
        ...

    def load_index(self) -> int: ...
    def set_index(self, index: int) -> None:
        """Record a change that stores nothing else (a health flip)."""
        ...

    def load_join_tokens(self) -> list[JoinTokenRecord]: ...
    def put_join_token(self, record: JoinTokenRecord) -> None: ...
    def delete_join_token(self, token_id: str) -> None: ...
    def load_keys(self) -> list[KeyRecord]: ...
    def put_key(self, record: KeyRecord) -> None: ...
    def delete_key(self, kid: str) -> None: ...
    def load_ca_roots(self) -> list[CARootRecord]: ...
    def put_ca_root(self, record: CARootRecord) -> None: ...
    def close(self) -> None: ...
