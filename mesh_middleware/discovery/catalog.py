"""The discovery cache: each destination's instances, from the policy file or a registry watch."""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import structlog

from mesh_middleware import defaults
from mesh_middleware.discovery.endpoints import Endpoint, EndpointSet
from mesh_middleware.discovery.watch import ServiceWatch
from mesh_middleware.identity.spiffe import SERVICE_NAME
from mesh_middleware.policy import schema
from mesh_middleware.runtime.registry_client import RegistryClient

__all__ = ["Discovery"]

log = structlog.get_logger("mesh.discovery")


class Discovery:
    """Where each destination's instances are, answered from memory on the request path.

    A service with static endpoints (the policy file) is answered from them; any other is
    watched in the registry from its first sighting on, one thread and connection per
    service, up to ``max_services``. :meth:`get` never blocks; :meth:`wait` blocks for a
    service's first answer. After a ``fork`` the child restarts its watches lazily, from the
    sets it inherited.
    """

    def __init__(
        self,
        client: RegistryClient | None,
        *,
        wait: str = defaults.DISCOVERY_WAIT,
        max_services: int = defaults.MAX_WATCHED_SERVICES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._wait = wait
        self._max_services = max_services
        self._clock = clock
        # What get() answers, written under the lock and read without it.
        self._sets: dict[str, EndpointSet] = {}
        self._static: dict[str, EndpointSet] = {}
        self._watches: dict[str, ServiceWatch] = {}
        self._lock = threading.Lock()
        self._forked = False
        self._closed = False
        self._cap_logged = False
        ref = weakref.ref(self)

        def forked() -> None:
            # Flagged rather than compared with os.getpid() on every get(): a flag costs
            # nanoseconds, the syscall a tenth of a microsecond. The lock may have been held
            # by a parent thread that does not exist here.
            discovery = ref()
            if discovery is not None:
                discovery._lock = threading.Lock()
                discovery._forked = True

        os.register_at_fork(after_in_child=forked)

    def get(self, service: str) -> EndpointSet | None:
        """The instances of ``service`` now, or ``None`` while nothing is known; never blocks.

        The first call for a service not static starts its watch.
        """
        if self._forked:
            self._restart_after_fork()
        found = self._sets.get(service)
        if found is None and service not in self._watches:
            self._start(service)
        return found

    def wait(self, service: str, timeout: float) -> EndpointSet | None:
        """Like :meth:`get`, but waits up to ``timeout`` seconds for a watch's first answer.

        Returns at once while the registry is known to be unreachable, or without one.
        """
        found = self.get(service)
        if found is not None:
            return found
        watch = self._watches.get(service)
        if watch is not None and not self._in_outage():
            watch.answered.wait(timeout)
        return self._sets.get(service)

    def _in_outage(self) -> bool:
        # A watch that has answered and is not connected means the registry is down now: a
        # new destination would only wait for the same failure.
        return any(w.answered.is_set() and not w.connected for w in list(self._watches.values()))

    def watch(self, services: Iterable[str]) -> None:
        """Start watching ``services`` now, without waiting for any answer."""
        for service in services:
            self.get(service)

    def set_static(self, static: Mapping[str, Sequence[schema.Endpoint]]) -> None:
        """Serve these services from the given endpoints (the policy file's), not the registry.

        Called at start and at each policy reload: an endpoint whose place did not change keeps
        its object (and state). A service that loses its static endpoints is watched again.
        Raises ``ValueError`` (changing nothing) on an endpoint URL with an invalid port.
        """
        with self._lock:
            built = {
                service: _static_set(service, endpoints, self._static.get(service))
                for service, endpoints in static.items()
                if endpoints
            }
            unstatic = self._static.keys() - built.keys()
            for service in unstatic:
                del self._sets[service]
            stopped = [self._watches.pop(s) for s in built if s in self._watches]
            self._sets.update(built)
            self._static = built
        for watch in stopped:
            watch.stop()
        self.watch(sorted(unstatic))

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Per service: source, index, instances (a count), connected and stale_seconds.

        ``connected`` is ``None`` and ``stale_seconds`` 0 for static services; a watched one is
        stale since its last good answer while its registry is unreachable.
        """
        with self._lock:
            static, watches = dict(self._static), dict(self._watches)
        now = self._clock()
        view: dict[str, dict[str, Any]] = {}
        for service, endpoints in static.items():
            view[service] = {
                "source": "static",
                "index": endpoints.index,
                "instances": len(endpoints),
                "connected": None,
                "stale_seconds": 0.0,
            }
        for service, watch in watches.items():
            current, connected = watch.current, watch.connected
            view[service] = {
                "source": "registry",
                "index": current.index if current is not None else None,
                "instances": len(current) if current is not None else 0,
                "connected": connected,
                "stale_seconds": 0.0 if connected else round(max(now - watch.since, 0.0), 3),
            }
        return view

    def close(self) -> None:
        """Stop every watch; later sightings start none."""
        with self._lock:
            self._closed = True
            watches = list(self._watches.values())
            self._watches.clear()
        for watch in watches:
            watch.stop()

    # -- inside ----------------------------------------------------------------------------

    def _start(self, service: str) -> None:
        if self._client is None or self._closed or not SERVICE_NAME.match(service):
            return
        with self._lock:
            if self._closed or service in self._watches or service in self._static:
                return
            if len(self._watches) < self._max_services:
                self._launch(service, None)
                return
            if self._cap_logged:
                return
            self._cap_logged = True
        log.warning("discovery_too_many_services", service=service, max=self._max_services)

    def _launch(self, service: str, previous: EndpointSet | None) -> None:
        """Start a watch (with the lock held) on a client of its own."""
        assert self._client is not None
        base = self._client
        watch = ServiceWatch(
            service,
            RegistryClient(base.failover_order, base.join_token, timeout=base.timeout),
            self._published,
            wait=self._wait,
            previous=previous,
            clock=self._clock,
        )
        self._watches[service] = watch
        watch.start()

    def _published(self, watch: ServiceWatch, endpoints: EndpointSet) -> None:
        with self._lock:
            if self._watches.get(watch.service) is watch:  # not a watch stopped meanwhile
                self._sets[watch.service] = endpoints

    def _restart_after_fork(self) -> None:
        with self._lock:
            if not self._forked:
                return
            self._forked = False
            if self._closed:
                return
            # The parent's threads did not come along; their last sets did, and keep serving.
            for service, old in list(self._watches.items()):
                self._launch(service, old.current)


def _static_set(
    service: str, endpoints: Sequence[schema.Endpoint], previous: EndpointSet | None
) -> EndpointSet:
    known = {e.id: e for e in previous.endpoints} if previous is not None else {}
    chosen: dict[str, Endpoint] = {}
    for endpoint in endpoints:
        fresh = _static_endpoint(service, endpoint)
        kept = known.get(fresh.id)
        chosen.setdefault(fresh.id, kept if kept is not None and kept.same_place(fresh) else fresh)
    kept_all = tuple(chosen.values())
    if previous is not None and previous.endpoints == kept_all:
        return previous
    return EndpointSet(service, kept_all, 0, "static")


def _static_endpoint(service: str, endpoint: schema.Endpoint) -> Endpoint:
    url = endpoint.url.rstrip("/")
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        raise ValueError(
            f"{service}: static endpoint {endpoint.url!r} has an invalid port"
        ) from None
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    return Endpoint(url, parts.scheme, parts.hostname or "", port, endpoint.version, endpoint.zone)
