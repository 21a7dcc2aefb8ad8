"""The catalog of a registry replica: etcd holds the truth, the watch keeps memory in step.

Every replica applies the same etcd events in revision order, so the index (the etcd revision)
and each service's index mean the same on every replica: a client may long-poll on one replica
with an index it got from another. A change made here is written to etcd and acknowledged once
this replica's watch has applied it (read-your-writes), never applied twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import structlog

from mesh_middleware.registry import metrics
from mesh_middleware.registry.catalog import Catalog, Instance, same_registration
from mesh_middleware.registry.store.base import InstanceRecord
from mesh_middleware.registry.store.etcd import EtcdStore, StoredInstance
from mesh_middleware.registry.store.etcd_client import WatchEvent

__all__ = ["ReplicaBehind", "ReplicatedCatalog"]

log = structlog.get_logger("mesh.registry")

# How long an acknowledgement waits for the watch to bring back a write (it is durable in
# etcd already; past this the answer goes out without it). With the etcd call's 1.5 s it stays
# under the mesh clients' 2 s registry timeout.
CATCH_UP_SECONDS = 0.4
# How long a long-poll carrying an index this replica has not reached yet waits for its watch
# to get there, before the replica says it is behind (503: the client tries another).
BEHIND_SECONDS = 2.0
# etcd calls run on threads of their own, at most this many waiting or running: past that,
# etcd is not keeping up and a client is better told at once (503) to try another replica.
ETCD_THREADS = 6
MAX_ETCD_CALLS = 256


T = TypeVar("T")


class StoreBusy(OSError):
    """Too many etcd calls are waiting (an OSError: the API answers 503, the store failed)."""


class ReplicaBehind(Exception):
    """A client holds an index this replica has not reached: its watch of etcd is behind."""


class ReplicatedCatalog(Catalog):
    """A catalog whose changes go through etcd and come back through its watch."""

    def __init__(self, store: EtcdStore, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(store, clock=clock)
        self._etcd = store
        self._applied: asyncio.Event | None = None
        self._tasks: set[asyncio.Future[None]] = set()
        self._threads = ThreadPoolExecutor(ETCD_THREADS, thread_name_prefix="mesh-etcd-call")
        self._calls = 0
        for stored in store.stored_instances():
            instance = self.get(stored.record.service, stored.record.instance_id)
            if instance is not None:
                instance.healthy, instance.lease = stored.healthy, stored.lease

    # -- changes, through etcd -----------------------------------------------------------

    async def register(self, record: InstanceRecord) -> tuple[Instance, bool]:
        existing = self.get(record.service, record.instance_id)
        # A renewal is a keepalive of the instance's lease, from whichever replica.
        if (
            existing is not None
            and existing.lease
            and same_registration(existing.record, record)
            and await self._call(self._etcd.renew, existing.lease)
        ):
            existing.expires_at = self._clock() + record.ttl
            metrics.RENEWALS.inc()
            return existing, False
        healthy = existing.healthy if existing and existing.record.check == record.check else True
        revision = await self._call(self._etcd.register, record, healthy)
        if existing is not None and existing.lease:
            # The key moved to a new lease; end the old one (in the background, best effort).
            self._background(self._call(self._etcd.release, existing.lease))
        await self._caught_up(revision)
        metrics.REGISTRATIONS.inc()
        instance = self.get(record.service, record.instance_id)
        if instance is None or instance.record.modify_index < revision:
            # The watch is late (or the instance is gone again): answer with what was written.
            instance = Instance(record, self._clock() + record.ttl, healthy)
        return instance, True

    async def deregister(
        self, service: str, instance_id: str, *, reason: str = "deregistered"
    ) -> bool:
        existing = self.get(service, instance_id)
        if existing is None:
            return False
        revision = await self._call(self._etcd.deregister, service, instance_id, existing.lease)
        if revision is not None:
            await self._caught_up(revision)
        log.info("instance_deregistered", service=service, instance=instance_id, reason=reason)
        return True

    async def set_health(self, service: str, instance_id: str, healthy: bool) -> None:
        instance = self.get(service, instance_id)
        if instance is None or instance.healthy == healthy:
            return
        stored = StoredInstance(instance.record, instance.healthy, instance.lease)
        revision = await self._call(self._etcd.set_health, stored, healthy)
        if revision is None:
            return  # changed meanwhile (another replica, a re-registration): check again later
        await self._caught_up(revision)
        log.info("instance_health", service=service, instance=instance_id, healthy=healthy)

    async def expire(self) -> int:
        """Expire nothing: etcd ends leases, and the watch brings the deletions. An instance
        renewed through another replica is still in etcd, so its lease was renewed within its
        TTL: this replica's ``expires_in`` starts again from the TTL (an upper bound; asking
        etcd for each lease cost as much as the renewals themselves)."""
        now = self._clock()
        for instance in self.all_instances():
            if instance.lease and instance.expires_at <= now:
                instance.expires_at = now + instance.record.ttl
        return 0

    async def wait_for_change(self, service: str, after: int, wait: float) -> None:
        if after > self.index and not await self._reaches(after, wait):
            raise ReplicaBehind
        await super().wait_for_change(service, after, wait)

    async def _reaches(self, after: int, wait: float) -> bool:
        """An index past this replica's: from a replica further on (wait for this one's watch
        to get there, never answering a lower index and an older state than the client saw),
        or from another history (etcd never got that far: answer at once, as a new store
        does). ``False`` when this replica is behind and stays so."""
        try:
            current = await self._call(self._etcd.current_revision)
        except OSError:
            return False  # cannot tell: let the client ask another replica
        if after > current:
            return True
        return await self._caught_up(after, min(wait, BEHIND_SECONDS), quiet=True)

    async def _call(self, function: Callable[..., T], *args: Any) -> T:
        """Run a (blocking) etcd call on the store's threads, or refuse if they are backed up."""
        if self._calls >= MAX_ETCD_CALLS:
            raise StoreBusy(f"{self._calls} etcd calls are waiting: etcd is not keeping up")
        self._calls += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._threads, functools.partial(function, *args))
        finally:
            self._calls -= 1

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _caught_up(
        self, revision: int, within: float = CATCH_UP_SECONDS, *, quiet: bool = False
    ) -> bool:
        deadline = self._clock() + within
        while self.index < revision:
            remaining = deadline - self._clock()
            if remaining <= 0:
                if not quiet:
                    log.warning("etcd_watch_behind", revision=revision, applied=self.index)
                return False
            if self._applied is None:
                self._applied = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._applied.wait(), remaining)
        return True

    # -- the watch -----------------------------------------------------------------------

    def apply(self, revision: int, events: list[WatchEvent]) -> None:
        """Apply watched events (on the event loop, in revision order)."""
        now = self._clock()
        for event in events:
            if self._etcd.kind_of(event.kv.key) != "instances":
                continue
            service, instance_id, stored = self._etcd.instance_event(event)
            self.index = max(self.index, event.kv.mod_revision)
            group = self._instances.get(service, {})
            if stored is None:
                if group.pop(instance_id, None) is not None:
                    if not group:
                        self._instances.pop(service, None)
                    log.info("instance_removed", service=service, instance=instance_id)
            else:
                previous = group.get(instance_id)
                instance = _fresh(stored, now)
                if previous is not None and previous.lease == stored.lease:
                    instance.expires_at = previous.expires_at
                self._instances.setdefault(service, {})[instance_id] = instance
            self._changed(service)
        self.index = max(self.index, revision)
        metrics.INDEX.set(self.index)
        metrics.INSTANCES.set(self.count())
        self._wake()

    def resync(self, revision: int) -> None:
        """After a re-list (the watch's history was compacted): rebuild from the store."""
        now = self._clock()
        self._instances = {}
        for stored in self._etcd.stored_instances():
            instance = _fresh(stored, now)
            self._instances.setdefault(stored.record.service, {})[stored.record.instance_id] = (
                instance
            )
        self.index = max(self.index, revision)
        # Anything may have changed: every watcher re-reads.
        self._floor = self.index
        for service in list(self._watchers):
            self._changed(service)
        metrics.INSTANCES.set(self.count())
        self._wake()

    def _wake(self) -> None:
        if self._applied is not None:
            self._applied.set()
            self._applied = None


def _fresh(stored: StoredInstance, now: float) -> Instance:
    """The catalog's instance for what etcd holds: a full TTL from ``now`` (etcd decides the
    real expiry through the lease)."""
    instance = Instance(stored.record, now + stored.record.ttl, stored.healthy)
    instance.lease = stored.lease
    return instance
