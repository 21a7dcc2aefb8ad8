"""One destination service as the outbound side sees it: settings compiled once, live state.

A :class:`Destination` is built from the policy's ``outbound.defaults`` and the service's own
section (a section a service gives replaces the default one as a whole, e.g. ``retries``).
It owns what must be shared by every call to that service: the balancer, the outlier
detector, the retry budget and the count of calls in flight.
"""

from __future__ import annotations

import threading

from mesh_middleware.discovery.catalog import Discovery
from mesh_middleware.discovery.endpoints import EndpointSet
from mesh_middleware.policy.schema import DestinationPolicy, OutboundDefaults
from mesh_middleware.resilience.budget import RetryBudget
from mesh_middleware.resilience.outlier import OutlierDetector
from mesh_middleware.resilience.retry_policy import RetryPolicy
from mesh_middleware.routing.balancers import Balancer, balancer_for
from mesh_middleware.routing.routes import MirrorRule, RouteTable

__all__ = ["Destination", "DestinationSettings", "resolve_settings"]


DestinationSettings = tuple[OutboundDefaults, DestinationPolicy | None, str | None]
"""What a destination is built from: the defaults, the service's section, the local zone."""


def resolve_settings(
    defaults: OutboundDefaults, own: DestinationPolicy | None, zone: str | None
) -> DestinationSettings:
    """The inputs a :class:`Destination` is built from (compared to decide on a rebuild)."""
    return defaults, own, zone


class Destination:
    """Calls to one service: compiled settings plus the state every call shares."""

    def __init__(self, service: str, settings: DestinationSettings, discovery: Discovery) -> None:
        defaults, own, zone = settings
        own = own or DestinationPolicy()
        self.service = service
        self.source = ""  # the calling service, set by the engine (for metrics)
        self.settings = settings
        self.zone = zone
        self.timeout: float = own.timeout if own.timeout is not None else defaults.timeout
        retries = own.retries or defaults.retries
        self.retry = RetryPolicy(retries)
        self.budget = RetryBudget(retries.budget.ratio, retries.budget.min_per_second)
        self.balancer: Balancer = balancer_for(own.load_balancer or defaults.load_balancer)
        self.outlier = OutlierDetector(
            own.outlier_detection or defaults.outlier_detection, service=service
        )
        self.max_concurrent: int = own.max_concurrent or defaults.max_concurrent
        self.routes = RouteTable(own.routes)
        mirror = own.mirror
        self.mirror = MirrorRule(mirror) if mirror is not None and mirror.percent > 0 else None
        self.static = bool(own.endpoints)
        self.in_flight = 0
        self._lock = threading.Lock()
        self._discovery = discovery

    def endpoints(self) -> EndpointSet | None:
        """The instances known now (never blocks); ``None`` when none were learned yet."""
        return self._discovery.get(self.service)

    def wait_for_endpoints(self, timeout: float) -> EndpointSet | None:
        """Block up to ``timeout`` for the registry's first answer about this service."""
        return self._discovery.wait(self.service, timeout)

    def enter(self) -> bool:
        """Count one more call in flight; ``False`` (and nothing counted) when at the limit."""
        with self._lock:
            if self.in_flight >= self.max_concurrent:
                return False
            self.in_flight += 1
        return True

    def leave(self) -> None:
        """One call in flight fewer."""
        with self._lock:
            self.in_flight -= 1
