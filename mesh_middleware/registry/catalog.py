"""The catalog: instances with leases, a change index, and long-poll watches.

State lives in memory and is written through to the store before a change is acknowledged.
The index moves on every change (register with new data, deregister, expiry, health flip);
each service remembers the index of its last change, which is what watches compare against
(Consul's blocking-query semantics).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import structlog

from mesh_middleware.registry import metrics, settings
from mesh_middleware.registry.store import InstanceRecord, Store

__all__ = ["Catalog", "Instance", "TooManyWatches", "same_registration"]

log = structlog.get_logger("mesh.registry")


class TooManyWatches(Exception):
    """More distinct services are watched than the registry keeps wake-ups for."""


@dataclass(slots=True)
class Instance:
    """An instance as the catalog holds it: the stored record plus its lease and health."""

    record: InstanceRecord
    expires_at: float
    healthy: bool = True
    check_failures: int = 0
    check_successes: int = 0
    lease: int = 0  # its etcd lease, on a replicated store

    def view(self, now: float) -> dict[str, Any]:
        r = self.record
        return {
            "service": r.service,
            "id": r.instance_id,
            "address": r.address,
            "port": r.port,
            "version": r.version,
            "zone": r.zone,
            "metadata": r.metadata,
            "healthy": self.healthy,
            "ttl": r.ttl,
            "expires_in": round(max(0.0, self.expires_at - now), 3),
        }


@dataclass
class _Watchers:
    event: asyncio.Event = field(default_factory=asyncio.Event)
    waiting: int = 0


class Catalog:
    """Every registered instance, the change index, and the wake-ups of watches."""

    def __init__(self, store: Store, clock: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self._clock = clock
        self.index = store.load_index()
        self._instances: dict[str, dict[str, Instance]] = {}
        self._service_index: dict[str, int] = {}
        self._watchers: dict[str, _Watchers] = {}
        now = clock()
        for record in store.load_instances():
            # Leases are not stored: every loaded instance gets a fresh one.
            self._instances.setdefault(record.service, {})[record.instance_id] = Instance(
                record, now + record.ttl
            )
            self.index = max(self.index, record.modify_index)
            self._service_index[record.service] = max(
                self._service_index.get(record.service, 0), record.modify_index
            )
        # What happened before a restart is not all stored (health flips, deregistrations):
        # every service starts at the loaded index, so no index a watcher saw is answered
        # again for another state, and each watcher wakes once to re-read.
        self._floor = self.index
        metrics.INSTANCES.set(self.count())

    # -- reading -------------------------------------------------------------------------

    def count(self) -> int:
        return sum(len(group) for group in self._instances.values())

    def services(self) -> list[dict[str, Any]]:
        out = []
        for name in sorted(self._instances):
            group = self._instances[name]
            if group:
                healthy = sum(1 for i in group.values() if i.healthy)
                out.append({"name": name, "instances": len(group), "healthy": healthy})
        return out

    def service_index(self, service: str) -> int:
        return max(self._service_index.get(service, 0), self._floor)

    def instances(self, service: str, *, healthy_only: bool = False) -> list[dict[str, Any]]:
        now = self._clock()
        group = self._instances.get(service, {})
        return [
            group[key].view(now) for key in sorted(group) if group[key].healthy or not healthy_only
        ]

    def get(self, service: str, instance_id: str) -> Instance | None:
        return self._instances.get(service, {}).get(instance_id)

    def all_instances(self) -> list[Instance]:
        return [i for group in self._instances.values() for i in group.values()]

    # -- changing ------------------------------------------------------------------------

    async def register(self, record: InstanceRecord) -> tuple[Instance, bool]:
        """Register or renew; return the instance and whether anything but the lease changed."""
        now = self._clock()
        existing = self.get(record.service, record.instance_id)
        if existing is not None and same_registration(existing.record, record):
            existing.expires_at = now + record.ttl
            metrics.RENEWALS.inc()
            return existing, False
        index = self.index + 1
        stored = replace(record, modify_index=index)
        self._store.put_instance(stored)  # durable before anything is acknowledged
        self.index = index
        instance = Instance(stored, now + record.ttl)
        if existing is not None and existing.record.check == record.check:
            instance.healthy = existing.healthy
        self._instances.setdefault(record.service, {})[record.instance_id] = instance
        self._changed(record.service)
        metrics.REGISTRATIONS.inc()
        metrics.INSTANCES.set(self.count())
        return instance, True

    async def deregister(
        self, service: str, instance_id: str, *, reason: str = "deregistered"
    ) -> bool:
        group = self._instances.get(service, {})
        if instance_id not in group:
            return False
        index = self.index + 1
        self._store.delete_instance(service, instance_id, index)
        self.index = index
        del group[instance_id]
        if not group:
            del self._instances[service]
        self._changed(service)
        metrics.INSTANCES.set(self.count())
        log.info("instance_removed", service=service, instance=instance_id, reason=reason)
        return True

    async def set_health(self, service: str, instance_id: str, healthy: bool) -> None:
        instance = self.get(service, instance_id)
        if instance is None or instance.healthy == healthy:
            return
        instance.healthy = healthy
        self._store.set_index(self.index + 1)  # so a restart never hands out this index again
        self.index += 1
        self._changed(service)
        log.info("instance_health", service=service, instance=instance_id, healthy=healthy)

    async def expire(self) -> int:
        """Remove every instance whose lease ran out; return how many."""
        now = self._clock()
        expired = [
            (i.record.service, i.record.instance_id)
            for group in self._instances.values()
            for i in group.values()
            if i.expires_at <= now
        ]
        for service, instance_id in expired:
            await self.deregister(service, instance_id, reason="lease expired")
            metrics.EXPIRIES.inc()
        return len(expired)

    def _changed(self, service: str) -> None:
        self._service_index[service] = self.index
        metrics.INDEX.set(self.index)
        watchers = self._watchers.pop(service, None)
        if watchers is not None:
            watchers.event.set()

    # -- watching ------------------------------------------------------------------------

    async def wait_for_change(self, service: str, after: int, wait: float) -> None:
        """Return once ``service``'s index passes ``after``, or after ``wait`` (+ jitter)."""
        if after > self.index:
            return  # the client's index is from another history: answer at once
        deadline = self._clock() + wait + random.uniform(0, wait / 16)
        while self.service_index(service) <= after:
            remaining = deadline - self._clock()
            if remaining <= 0:
                return
            watchers = self._watchers.get(service)
            if watchers is None:
                # The cap is on names nobody registered: a known service can always be watched.
                known = service in self._instances or service in self._service_index
                if not known and len(self._watchers) >= settings.MAX_WATCHED_SERVICES:
                    raise TooManyWatches
                watchers = self._watchers[service] = _Watchers()
            watchers.waiting += 1
            metrics.WATCHERS.inc()
            try:
                await asyncio.wait_for(watchers.event.wait(), remaining)
            except TimeoutError:
                return
            finally:
                watchers.waiting -= 1
                metrics.WATCHERS.dec()
                if watchers.waiting == 0 and self._watchers.get(service) is watchers:
                    del self._watchers[service]


def same_registration(a: InstanceRecord, b: InstanceRecord) -> bool:
    """Whether ``b`` registers what ``a`` holds (a renewal), leases and indexes aside."""
    return (
        a.address == b.address
        and a.port == b.port
        and a.version == b.version
        and a.zone == b.zone
        and a.metadata == b.metadata
        and a.ttl == b.ttl
        and a.check == b.check
    )
