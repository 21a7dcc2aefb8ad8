"""One registry watch (Consul-style blocking query) per destination service, in its own thread."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import Any

import structlog

from mesh_middleware import defaults
from mesh_middleware.discovery.endpoints import Endpoint, EndpointSet
from mesh_middleware.runtime.backoff import Backoff
from mesh_middleware.runtime.registry_client import (
    RegistryClient,
    RegistryError,
    RegistryRefused,
)

__all__ = ["ServiceWatch"]

log = structlog.get_logger("mesh.discovery")

_FLOOR_FRACTION = 0.25
"""Polls of one watch start at least this fraction of the minimum poll interval apart, whatever
the registry answers: changes arriving faster than that are coalesced, never lost (the index
carries them)."""


class ServiceWatch:
    """Keeps one service's healthy instances current by long-polling the registry forever.

    The watch owns ``client`` (one long-poll connection per watch) and closes it when its
    thread ends. Each answer becomes a new :class:`EndpointSet` in :attr:`current` (read it
    without locks) and is passed to ``publish``; the :class:`Endpoint` of an instance whose
    place is unchanged is carried over, so its balancing and outlier state survive. On errors
    the last good set stays and the watch retries with a jittered backoff, logging once per
    outage.
    """

    def __init__(
        self,
        service: str,
        client: RegistryClient,
        publish: Callable[[ServiceWatch, EndpointSet], None] | None = None,
        *,
        wait: str = defaults.DISCOVERY_WAIT,
        min_poll: float = defaults.DISCOVERY_MIN_POLL_SECONDS,
        timeout: float = defaults.REGISTRY_TIMEOUT_SECONDS,
        previous: EndpointSet | None = None,
        backoff: Backoff | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.service = service
        self.current: EndpointSet | None = previous
        self.connected = False
        self.answered = threading.Event()
        """Set once the first poll ended, with an answer or an error (or the watch stopped)."""
        self.since = clock()
        """``clock()`` time of the last good answer (or of the start, before the first one)."""
        self._client = client
        self._publish = publish
        self._wait = wait
        self._min_poll = min_poll
        self._timeout = timeout
        self._backoff = backoff or Backoff()
        self._clock = clock
        # The index to send: None for a plain fetch (at start, after an error or a reset).
        self._index: int | None = None
        self._outage_since: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        """Whether the thread runs and has not been asked to stop."""
        return self._thread is not None and self._thread.is_alive() and not self._stop.is_set()

    def start(self) -> None:
        """Start polling in a daemon thread (once)."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name=f"mesh-discovery-{self.service}", daemon=True
            )
            self._thread.start()

    def stop(self, join: float | None = None) -> None:
        """End the thread: at once if it is pausing, after the poll under way otherwise.

        ``join`` waits up to that many seconds for the thread to end.
        """
        self._stop.set()
        self.answered.set()
        if join is not None and self._thread is not None:
            self._thread.join(join)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._stop.wait(self._poll())
        finally:
            self._client.close()

    def _poll(self) -> float:
        """One call to the registry; returns how long to pause before the next."""
        requested = self._index
        started = time.monotonic()
        try:
            index, instances = self._client.instances(
                self.service,
                index=requested,
                wait=self._wait if requested is not None else None,
                timeout=self._timeout,
            )
            if not self._stop.is_set():
                self._answer(requested, index, instances)
        except Exception as exc:  # a bug must not end discovery either
            if self._stop.is_set():
                return 0.0  # aborted by stop(): not an outage
            self._failed(exc)
            return self._backoff.next()
        elapsed = time.monotonic() - started
        if requested is not None and index <= requested and elapsed < self._min_poll:
            # The registry did not block: pausing is what keeps this from being a busy loop.
            return random.uniform(1.0, 1.5) * self._min_poll
        return max(self._min_poll * _FLOOR_FRACTION - elapsed, 0.0)

    def _answer(self, requested: int | None, index: int, instances: list[dict[str, Any]]) -> None:
        if requested is not None and index < requested:
            # Another history (a registry restarted on a new store): start again from scratch.
            log.info("discovery_index_reset", service=self.service, was=requested, now=index)
            self._index = None
        else:
            self._index = index
        endpoints = self._endpoints(instances)
        current = self.current
        if current is None or current.index != index or current.endpoints != endpoints:
            self.current = EndpointSet(self.service, endpoints, index, "registry")
            if self._publish is not None:
                self._publish(self, self.current)
        self._backoff.reset()
        self.since = self._clock()
        if self._outage_since is not None:
            log.info(
                "discovery_recovered",
                service=self.service,
                outage_seconds=round(self.since - self._outage_since, 3),
            )
            self._outage_since = None
        self.connected = True
        self.answered.set()

    def _endpoints(self, instances: list[dict[str, Any]]) -> tuple[Endpoint, ...]:
        known = {e.id: e for e in self.current.endpoints} if self.current is not None else {}
        endpoints: dict[str, Endpoint] = {}
        for instance in instances:
            metadata = instance.get("metadata")
            mtls = metadata.get("mtls") if isinstance(metadata, dict) else None
            tls = mtls in _MTLS_SERVING
            fresh = Endpoint(
                instance["id"],
                "https" if tls else "http",
                instance["address"],
                instance["port"],
                instance.get("version"),
                instance.get("zone"),
                tls,
                _port(metadata.get("plain_port")) if tls and isinstance(metadata, dict) else None,
            )
            kept = known.get(fresh.id)
            endpoints.setdefault(
                fresh.id, kept if kept is not None and kept.same_place(fresh) else fresh
            )
        return tuple(endpoints.values())

    def _failed(self, exc: Exception) -> None:
        self._index = None  # come back with a quick plain fetch, not a long-poll
        self.connected = False
        if self._outage_since is None:
            self._outage_since = self._clock()
            if isinstance(exc, RegistryRefused):
                event = "discovery_refused"
            elif isinstance(exc, RegistryError):
                event = "discovery_unreachable"
            else:
                log.exception("discovery_failed", service=self.service)
                event = ""
            if event:
                log.warning(
                    event,
                    service=self.service,
                    error=str(exc),
                    serving=len(self.current) if self.current is not None else None,
                )
        self.answered.set()


_MTLS_SERVING = frozenset({"strict", "permissive"})


def _port(value: object) -> int | None:
    """A port from registration metadata (a string there), or ``None``."""
    if isinstance(value, str) and value.isascii() and value.isdigit():
        port = int(value)
        if 1 <= port <= 65535:
            return port
    return None
