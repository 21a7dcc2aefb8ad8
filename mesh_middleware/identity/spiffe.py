"""SPIFFE IDs of mesh services: ``spiffe://<trust-domain>/svc/<service>``."""

from __future__ import annotations

import re

__all__ = ["SERVICE_NAME", "SERVICE_NAME_PATTERN", "parse_service_id", "service_id"]

SERVICE_NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
"""A service name is a DNS label: lowercase letters, digits and '-', at most 63 characters."""

SERVICE_NAME = re.compile(SERVICE_NAME_PATTERN)

_SERVICE_ID = re.compile(
    r"^spiffe://(?P<td>[a-z0-9._-]{1,255})/svc/(?P<svc>" + SERVICE_NAME_PATTERN[1:-1] + r")$"
)


def service_id(service: str, trust_domain: str) -> str:
    """The SPIFFE ID of ``service`` in ``trust_domain``."""
    return f"spiffe://{trust_domain}/svc/{service}"


def parse_service_id(value: str) -> tuple[str, str] | None:
    """Return ``(trust_domain, service)`` of a service SPIFFE ID, or ``None`` if it is not one."""
    match = _SERVICE_ID.match(value)
    if match is None:
        return None
    return match.group("td"), match.group("svc")
