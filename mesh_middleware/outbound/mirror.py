"""Bounds on mirrored (shadow) requests: fire-and-forget, never queued, never in the way."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait

from mesh_middleware import defaults
from mesh_middleware.telemetry import metrics

__all__ = ["MirrorSlots", "ShadowSender", "mirror_slots", "shadow_executor"]


class MirrorSlots:
    """A cap on mirrored requests in flight: beyond it they are dropped and counted."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0
        self.dropped = 0
        self.failed = 0
        self._lock = threading.Lock()

    def take(self) -> bool:
        """Claim a slot; ``False`` (and one more drop counted) when all are taken."""
        with self._lock:
            if self.in_flight >= self.limit:
                self.dropped += 1
                metrics.count_mirror_dropped()
                return False
            self.in_flight += 1
            return True

    def give(self, *, failed: bool = False) -> None:
        """Release a slot once the shadow request is over."""
        with self._lock:
            self.in_flight -= 1
            self.failed += failed


mirror_slots = MirrorSlots(defaults.MAX_MIRRORS_IN_FLIGHT)
"""The process-wide cap shared by every client."""

_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def shadow_executor() -> ThreadPoolExecutor:
    """The small thread pool sync clients send shadows from (created on first use)."""
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="mesh-mirror")
        return _executor


class ShadowSender:
    """The shadows one sync client sends from the shared pool, and their end when it closes.

    A shadow sent after its client closed would open a connection on a closed pool that nobody
    closes again; so ``close`` stops new ones, lets those in flight finish (within ``drain``
    seconds) and only then may the client close its pool.
    """

    def __init__(self, drain: float = defaults.MIRROR_DRAIN_SECONDS) -> None:
        self.drain = drain
        self.sent = 0
        """Shadows that got an answer (any status)."""
        self.failed = 0
        """Shadows that were sent and failed."""
        self.unsent = 0
        """Shadows still queued (the shared pool was busy) when the client closed: never sent."""
        self._pending: set[Future[None]] = set()
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, send: Callable[[], None]) -> bool:
        """Send ``send()`` in the background if a slot is free; ``False`` when dropped."""
        with self._lock:
            if self._closed or not mirror_slots.take():
                return False
            future = shadow_executor().submit(self._run, send)
            self._pending.add(future)
        future.add_done_callback(self._done)
        return True

    def _run(self, send: Callable[[], None]) -> None:
        if self._closed:  # it waited in the queue until its client closed: never sent
            with self._lock:
                self.unsent += 1
            mirror_slots.give(failed=True)
            return
        ok = False
        try:
            send()
            ok = True
        except Exception:  # a shadow never affects the caller; it is only counted
            pass
        with self._lock:
            if ok:
                self.sent += 1
            else:
                self.failed += 1
        mirror_slots.give(failed=not ok)

    def _done(self, future: Future[None]) -> None:
        with self._lock:
            self._pending.discard(future)

    def close(self) -> None:
        """No new shadows; wait (bounded) for those in flight."""
        with self._lock:
            self._closed = True
            pending = list(self._pending)
        if pending:
            wait(pending, timeout=self.drain)
