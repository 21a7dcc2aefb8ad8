"""Bounds on mirrored (shadow) requests: fire-and-forget, never queued, never in the way."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from mesh_middleware import defaults
from mesh_middleware.telemetry import metrics

__all__ = ["MirrorSlots", "mirror_slots", "shadow_executor"]


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
