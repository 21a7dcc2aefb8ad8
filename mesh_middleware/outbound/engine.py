"""Which hosts are mesh destinations, and their :class:`Destination` objects, per policy.

A host is a mesh destination when the policy lists it under ``outbound.services``, or — with
a registry — when it is a bare service name (one DNS label, not ``localhost``): the URL
``http://inventory/items`` names the service ``inventory``. Every other host (``example.com``,
``127.0.0.1``, ``db.internal``) bypasses routing and never receives an identity token.

Destinations are rebuilt when the policy changes, keeping the object (and so its balancer,
outlier and budget state) of every service whose settings did not change.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from mesh_middleware.discovery.catalog import Discovery
from mesh_middleware.identity.spiffe import SERVICE_NAME
from mesh_middleware.outbound.destination import Destination, resolve_settings
from mesh_middleware.policy.compiled import CompiledPolicy

__all__ = ["OutboundEngine"]

_MAX_HOSTS = 4096


class OutboundEngine:
    """Destinations by host for one Mesh; cheap to ask on every outbound request."""

    def __init__(
        self,
        policy: Callable[[], CompiledPolicy],
        discovery: Discovery,
        *,
        registry: bool,
    ) -> None:
        self._policy = policy
        self.discovery = discovery
        self.registry = registry
        self._seen: CompiledPolicy | None = None
        self._hosts: dict[str, Destination | None] = {}
        self._destinations: dict[str, Destination] = {}
        self._lock = threading.Lock()

    @property
    def trace_external(self) -> bool:
        """Whether hosts outside the mesh get a ``traceparent`` (policy switch, default on)."""
        return self._policy().loaded.policy.outbound.defaults.trace_context_to_external_hosts

    def destination(self, host: str) -> Destination | None:
        """The destination ``host`` names, or ``None`` when it is not a mesh service."""
        if self._policy() is not self._seen:
            self._rebuild()
        try:
            return self._hosts[host]
        except KeyError:
            return self._resolve(host)

    def destinations(self) -> dict[str, Destination]:
        """Every destination called or configured so far, by service."""
        with self._lock:
            return dict(self._destinations)

    def _resolve(self, host: str) -> Destination | None:
        service = host.lower()
        with self._lock:
            policy = self._seen
            assert policy is not None
            outbound = policy.loaded.policy.outbound
            known = service in outbound.services
            if not known and not (
                self.registry
                and service != "localhost"
                and "." not in service
                and SERVICE_NAME.match(service) is not None
            ):
                found = None
            else:
                found = self._destinations.get(service)
                if found is None:
                    settings = resolve_settings(
                        outbound.defaults, outbound.services.get(service), policy.loaded.policy.zone
                    )
                    found = Destination(service, settings, self.discovery)
                    found.source = policy.service
                    self._destinations[service] = found
            if len(self._hosts) >= _MAX_HOSTS:
                self._hosts.clear()
            self._hosts[host] = found
            return found

    def _rebuild(self) -> None:
        policy = self._policy()
        with self._lock:
            if policy is self._seen:
                return
            outbound = policy.loaded.policy.outbound
            zone = policy.loaded.policy.zone
            kept: dict[str, Destination] = {}
            for service, old in self._destinations.items():
                settings = resolve_settings(outbound.defaults, outbound.services.get(service), zone)
                if settings == old.settings:
                    kept[service] = old
            for service, own in outbound.services.items():
                if service not in kept:
                    settings = resolve_settings(outbound.defaults, own, zone)
                    kept[service] = Destination(service, settings, self.discovery)
            for destination in kept.values():
                destination.source = policy.service
            self._destinations = kept
            self._hosts = {}
            self.discovery.set_static(
                {name: own.endpoints for name, own in outbound.services.items() if own.endpoints}
            )
            self._seen = policy

    def prefetch(self) -> None:
        """Start watching every destination the policy names (the runtime calls it at start)."""
        policy = self._policy()
        services = policy.loaded.policy.outbound.services
        self.discovery.watch(name for name, own in services.items() if not own.endpoints)
