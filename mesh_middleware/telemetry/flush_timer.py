"""A one-shot daemon timer for batches: whatever waits is flushed within an interval."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["FlushTimer", "Handle"]

T = TypeVar("T")


class Handle(Generic[T]):
    """Stands for a batch's owner in a weak set (flush at exit, forget after fork), as the
    owner itself, compiled by mypyc, cannot be weakly referenced. The owner keeps its handle
    and the handle its owner, so the two are collected together."""

    __slots__ = ("__weakref__", "owner")

    def __init__(self, owner: T) -> None:
        self.owner = owner


class FlushTimer:
    """Calls a flush ``interval`` seconds after it is armed; arming an armed timer does nothing.

    Callers check :attr:`armed` before :meth:`arm`, so a request pays one attribute read. With
    ``pending`` given, a flush that leaves something waiting (it came while flushing) arms the
    timer again, so that too is flushed within the interval.
    """

    __slots__ = ("_interval", "_lock", "armed")

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._lock = threading.Lock()
        self.armed = False

    def arm(self, flush: Callable[[], None], pending: Callable[[], bool] | None = None) -> None:
        """Start the timer unless it is running; ``flush`` runs in its thread."""
        with self._lock:
            if self.armed:
                return
            self.armed = True
        timer = threading.Timer(self._interval, self._fire, (flush, pending))
        timer.daemon = True
        timer.start()

    def _fire(self, flush: Callable[[], None], pending: Callable[[], bool] | None) -> None:
        with self._lock:
            self.armed = False
        flush()
        if pending is not None and pending():
            self.arm(flush, pending)

    def forget(self) -> None:
        """In a forked child: no timer runs here (threads do not survive ``fork``)."""
        self.armed = False
        self._lock = threading.Lock()
