"""Outlier detection: eject an instance after consecutive failures, probe it back with one call.

Istio's defaults with Linkerd's recovery: ``consecutive_failures`` failures in a row eject an
instance for ``base_ejection * ejections`` (capped at ``MAX_EJECTION_SECONDS``); when the time is
up the instance is on probation, where it takes one real request at a time until one succeeds
(back to normal) or fails (ejected again, for longer). At most ``max_ejection_percent`` of the
instances are ejected at once, though one always may be; when nothing is usable, calls spread
over every instance (Envoy's panic routing) rather than fail.

The state lives on the shared :class:`Endpoint` objects; the detector counts the instances it
has taken out of normal service so that the common case, nobody ejected, costs one test.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import structlog

from mesh_middleware.defaults import MAX_EJECTION_SECONDS
from mesh_middleware.discovery.endpoints import Endpoint
from mesh_middleware.policy.schema import OutlierDetection
from mesh_middleware.telemetry import metrics

__all__ = ["OutlierDetector"]

log = structlog.get_logger("mesh.outbound")


class OutlierDetector:
    """Ejection and probation of one destination's instances.

    The engine reports every try: :meth:`picked` when it chose an instance, then
    :meth:`success` or :meth:`failure` when the try ended. An instance is "out" from its ejection
    until a probe succeeds; while nothing is out, :meth:`available` returns its argument as is.
    """

    __slots__ = ("_base", "_limit", "_lock", "_max_percent", "_out", "_probes", "clock", "service")

    def __init__(
        self,
        settings: OutlierDetection,
        *,
        clock: Callable[[], float] = time.monotonic,
        service: str = "",
    ) -> None:
        self.service = service  # the destination, for metrics and logs
        self._limit = settings.consecutive_failures
        self._base = settings.base_ejection
        self._max_percent = settings.max_ejection_percent
        self.clock = clock
        self._lock = threading.Lock()
        # Ejected or on probation: exactly the endpoints with ``probing`` set by this detector.
        self._out: set[Endpoint] = set()
        # When each probe in flight was handed out, so a probe never reported is not waited
        # for forever (a cancelled request, a bug in a caller).
        self._probes: dict[Endpoint, float] = {}

    def available(
        self, endpoints: Sequence[Endpoint], now: float
    ) -> tuple[Sequence[Endpoint], bool]:
        """The endpoints a call may use now, and whether that is panic routing.

        Ejected endpoints are left out, and an endpoint on probation is in only while its probe
        is not taken. With none left, all of ``endpoints`` come back with ``True`` (panic).
        When nothing is left out, ``endpoints`` itself is returned.
        """
        if not self._out:
            return endpoints, False
        with self._lock:
            self._release_forgotten(now)
            usable = [e for e in endpoints if not e.probing or self._probe_free(e, now)]
        if not usable:
            return endpoints, True
        if len(usable) == len(endpoints):
            return endpoints, False
        return usable, False

    def picked(self, endpoint: Endpoint) -> bool:
        """The engine chose ``endpoint`` for a try: an endpoint on probation now has its probe.

        Returns ``False`` when another caller took the probe first (two callers saw it free):
        the engine should then pick again. Panic routing to an ejected endpoint takes no probe.
        """
        if not endpoint.probing:
            return True
        now = self.clock()
        with self._lock:
            if not endpoint.probing or endpoint.ejected_until > now:
                return True
            if not self._probe_free(endpoint, now):
                return False
            endpoint.probe_in_flight = True
            self._probes[endpoint] = now
            return True

    def success(self, endpoint: Endpoint, now: float) -> None:
        """A try to ``endpoint`` succeeded: its failure streak ends, and so does its probation."""
        if endpoint.consecutive_failures:
            endpoint.consecutive_failures = 0
        if not endpoint.probing:
            return
        with self._lock:
            if endpoint.probing and endpoint.ejected_until <= now:
                self._reinstate(endpoint, now)

    def abandoned(self, endpoint: Endpoint) -> None:
        """A try ended without telling anything about ``endpoint`` (the caller cancelled it, or
        it failed on the caller's side): a probe it held is free again, nothing is counted."""
        if not endpoint.probe_in_flight:
            return
        with self._lock:
            endpoint.probe_in_flight = False
            self._probes.pop(endpoint, None)

    def failure(self, endpoint: Endpoint, now: float, population: Sequence[Endpoint]) -> bool:
        """A try to ``endpoint`` failed (connect failure, reset, timeout or 5xx).

        Ejects it after ``consecutive_failures`` failures in a row, or after one failure on
        probation, unless that would eject more than ``max_ejection_percent`` of ``population``
        (one ejection is always allowed). Returns whether it was ejected.
        """
        endpoint.consecutive_failures += 1
        if not endpoint.probing and endpoint.consecutive_failures < self._limit:
            return False
        with self._lock:
            if endpoint.ejected_until > now:
                # Already ejected: a try sent before the ejection, or by panic routing.
                return False
            if endpoint.probing:
                endpoint.probe_in_flight = False
                self._probes.pop(endpoint, None)
            elif endpoint.consecutive_failures < self._limit:
                return False  # another thread reset the streak meanwhile
            return self._eject(endpoint, now, population)

    @property
    def ejected_count(self) -> int:
        """How many of this detector's endpoints are ejected now (for metrics)."""
        if not self._out:
            return 0
        now = self.clock()
        with self._lock:
            return sum(1 for e in self._out if e.ejected_until > now)

    # -- under the lock ---------------------------------------------------------------------

    def _probe_free(self, endpoint: Endpoint, now: float) -> bool:
        """Whether an endpoint on probation may take a call now."""
        if endpoint.ejected_until > now:
            return False
        if not endpoint.probe_in_flight:
            return True
        if now - self._probes.get(endpoint, now) >= self._base:
            endpoint.probe_in_flight = False  # never reported: take it as lost
            self._probes.pop(endpoint, None)
            return True
        return False

    def _eject(self, endpoint: Endpoint, now: float, population: Sequence[Endpoint]) -> bool:
        if self._max_percent <= 0:
            return False
        ejected = sum(1 for e in population if e.ejected_until > now and e is not endpoint)
        if ejected and 100.0 * (ejected + 1) > self._max_percent * len(population):
            return False
        # Ejections are forgiven once the endpoint stayed healthy for as long as its last
        # ejection multiplier asked (checked here, lazily, rather than by a timer).
        if (
            not endpoint.probing
            and endpoint.ejections
            and now - endpoint.last_ejection_end >= self._base * endpoint.ejections
        ):
            endpoint.ejections = 0
        endpoint.ejections += 1
        seconds = min(self._base * endpoint.ejections, MAX_EJECTION_SECONDS)
        endpoint.ejected_until = now + seconds
        endpoint.consecutive_failures = 0
        endpoint.probing = True
        endpoint.probe_in_flight = False
        self._out.add(endpoint)
        metrics.count_ejection(self.service)
        metrics.set_ejected_endpoints(self.service, len(self._out))
        log.warning(
            "endpoint_ejected",
            service=self.service,
            endpoint=endpoint.id,
            seconds=seconds,
            count=endpoint.ejections,
        )
        return True

    def _reinstate(self, endpoint: Endpoint, now: float) -> None:
        endpoint.probing = False
        endpoint.probe_in_flight = False
        endpoint.last_ejection_end = now
        self._probes.pop(endpoint, None)
        self._out.discard(endpoint)
        metrics.set_ejected_endpoints(self.service, len(self._out))

    def _release_forgotten(self, now: float) -> None:
        # An endpoint that left the catalog while out would keep every call on the slow path;
        # one that nobody probed for this long is simply given back to normal service.
        for endpoint in [e for e in self._out if not e.probe_in_flight]:
            if now - endpoint.ejected_until > MAX_EJECTION_SECONDS:
                self._reinstate(endpoint, endpoint.ejected_until)
