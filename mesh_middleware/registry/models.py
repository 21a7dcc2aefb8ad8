"""Request bodies of the registry API: validated with pydantic, described in its OpenAPI."""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from mesh_middleware.identity.spiffe import SERVICE_NAME, SERVICE_NAME_PATTERN
from mesh_middleware.policy.durations import DURATION_PATTERN, parse_duration
from mesh_middleware.registry import settings

__all__ = [
    "INSTANCE_ID",
    "SERVICE_NAME",
    "CertificateRequest",
    "HealthCheck",
    "JoinTokenRequest",
    "Registration",
    "RootRotation",
    "TokenRequest",
]

INSTANCE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*$")


def _address(value: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if not _HOSTNAME.match(value):
            raise ValueError("not a host name or IP address") from None
    return value


def _seconds(low: float, high: float) -> Any:
    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ValueError("expected a duration like '15s'")
        seconds = parse_duration(value) if isinstance(value, str) else float(value)
        if not low <= seconds <= high:
            raise ValueError(f"must be between {low:g}s and {high:g}s")
        return seconds

    return check


def _duration(low: float, high: float, default: str) -> Any:
    return Annotated[
        float,
        BeforeValidator(_seconds(low, high)),
        WithJsonSchema(
            {"type": "string", "pattern": DURATION_PATTERN, "default": default},
            mode="validation",
        ),
    ]


ServiceName = Annotated[str, Field(pattern=SERVICE_NAME_PATTERN)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class HealthCheck(_Body):
    """An active HTTP check the registry runs against the instance."""

    http: Annotated[str, Field(pattern=r"^/[!-~]{0,255}$")]
    interval: _duration(1, 300, "10s") = 10.0  # type: ignore[valid-type]
    timeout: _duration(0.1, 60, "1s") = 1.0  # type: ignore[valid-type]
    failures_before_unhealthy: Annotated[int, Field(ge=1, le=10)] = 3
    successes_before_healthy: Annotated[int, Field(ge=1, le=10)] = 1


class Registration(_Body):
    """Register (or renew) one instance of a service."""

    address: Annotated[str, Field(min_length=1, max_length=253), AfterValidator(_address)]
    port: Annotated[int, Field(ge=1, le=65535)]
    version: Annotated[str, Field(min_length=1, max_length=63)] | None = None
    zone: Annotated[str, Field(min_length=1, max_length=63)] | None = None
    metadata: Annotated[
        dict[Annotated[str, Field(max_length=63)], Annotated[str, Field(max_length=512)]],
        Field(max_length=64),
    ] = Field(default_factory=dict)
    ttl: _duration(settings.MIN_TTL, settings.MAX_TTL, "30s") = settings.DEFAULT_TTL  # type: ignore[valid-type]
    check: HealthCheck | None = None

    @model_validator(mode="after")
    def _checkable(self) -> Registration:
        # The registry itself connects to a checked address: never to link-local ones
        # (cloud metadata services live there).
        if self.check is not None:
            try:
                if ipaddress.ip_address(self.address).is_link_local:
                    raise ValueError("a link-local address cannot have a health check")
            except ValueError as exc:
                if "link-local" in str(exc):
                    raise
        return self


class TokenRequest(_Body):
    """Ask for a JWT-SVID naming ``audience``; ``service`` only in dev mode (no join token).

    ``cnf`` is an Ed25519 public JWK the service holds, for the token to bind (RFC 7800).
    """

    audience: ServiceName
    service: ServiceName | None = None
    cnf: dict[str, str] | None = None

    @field_validator("cnf")
    @classmethod
    def _public_ed25519(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return None
        from mesh_middleware.identity.forwarded_user import confirmation_key

        return confirmation_key(value)


class CertificateRequest(_Body):
    """Ask the CA to sign ``csr`` (PEM); ``service`` only in dev mode (no join token)."""

    csr: str = Field(min_length=1, max_length=16 * 1024)
    service: ServiceName | None = None


class RootRotation(_Body):
    """Rotate the CA root: to a new one the registry makes, or to the operator's."""

    certificate: str | None = Field(default=None, max_length=32 * 1024)
    key: str | None = Field(default=None, max_length=32 * 1024)
    activate_after: str | None = None


class JoinTokenRequest(_Body):
    """Create a join token for ``service``."""

    service: ServiceName
