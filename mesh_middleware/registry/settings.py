"""The registry's settings and limits, in one place."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from mesh_middleware import defaults

__all__ = ["RegistrySettings", "default_data_dir"]

DEFAULT_PORT = 7400
MAX_BODY_BYTES = 64 * 1024
DEFAULT_TTL = 30.0
MIN_TTL = 5.0
MAX_TTL = 600.0
DEFAULT_WAIT = 30.0
MAX_WAIT = 300.0
SWEEP_SECONDS = 0.5
# Longer than verifiers' periodic JWKS refresh (5 min), so a new key is known everywhere before
# it signs; the refetch on an unknown kid is only the fallback.
KEY_PUBLISH_LEAD_SECONDS = 360.0
KEY_ROTATION_SECONDS = 24 * 3600.0
# Leaf certificates live a day and renew at half life (Istio's workload default); a root the
# registry creates lives a year and rotates itself with a third left.
CERT_LIFETIME_SECONDS = 24 * 3600.0
CA_ROOT_LIFETIME_SECONDS = 365 * 86400.0
# A new root signs only after every instance refetched the bundle (each does every minute).
CA_ACTIVATE_AFTER_SECONDS = 600.0
MAX_WATCHED_SERVICES = 10_000
MAX_HEALTH_CHECKS_IN_FLIGHT = 100


def default_data_dir() -> Path:
    """``$MESH_REGISTRY_DATA``, else ``~/.local/state/mesh-registry``."""
    configured = os.environ.get("MESH_REGISTRY_DATA")
    if configured:
        return Path(configured)
    return Path.home() / ".local" / "state" / "mesh-registry"


@dataclass
class RegistrySettings:
    """How one registry process runs."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    data_dir: Path = field(default_factory=default_data_dir)
    store_url: str | None = None
    store_key_file: Path | None = None  # wraps private keys in an etcd store ($MESH_STORE_KEY)
    dev: bool = False
    trust_domain: str = defaults.DEFAULT_TRUST_DOMAIN
    token_lifetime: int = defaults.TOKEN_LIFETIME_SECONDS
    key_publish_lead: float = KEY_PUBLISH_LEAD_SECONDS
    key_rotation: float = KEY_ROTATION_SECONDS
    cert_lifetime: float = CERT_LIFETIME_SECONDS
    ca_root_lifetime: float = CA_ROOT_LIFETIME_SECONDS
    ca_activate_after: float = CA_ACTIVATE_AFTER_SECONDS
    ca_certificate: Path | None = None  # an operator's CA (PEM); the registry makes one if not
    ca_key: Path | None = None
    tls_certificate: Path | None = None  # serve the API over HTTPS with this certificate (PEM)
    tls_key: Path | None = None

    @property
    def store(self) -> str:
        """The store URL; the embedded default is a SQLite file in the data directory."""
        return self.store_url or f"sqlite:///{self.data_dir / 'registry.db'}"

    @property
    def issuer(self) -> str:
        return defaults.default_issuer(self.trust_domain)
