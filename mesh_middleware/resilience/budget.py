"""The retry budget: retries may add at most a fraction of the requests, plus a small reserve.

Finagle's and Linkerd's semantics (DESIGN §6): over the last ``window`` seconds,

    retries <= ratio * requests + min_per_second * window

so a destination that fails every call gets about ``ratio`` extra load from retries, not
``attempts`` times the load, while a client making few calls can still retry some of them.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

from mesh_middleware import defaults

__all__ = ["RetryBudget"]

# Float products like 0.2 * 15 land a hair above or below the whole number they stand for.
_EPSILON = 1e-9
_MAX_WINDOW_SECONDS = 3600


class RetryBudget:
    """Allows a retry only while retries stay within ``ratio`` of requests plus a reserve.

    Counts are kept in one-second buckets, a ring of ``window`` slots, so :meth:`deposit` and
    :meth:`withdraw` are O(1): a call in a new second first empties the buckets of the seconds
    that left the window (at most ``window`` of them) and adjusts running totals. The window is
    the current second plus the ``window - 1`` before it. A lock makes each call atomic across
    threads; the clock is read outside it.

    Where this differs from the originals:

    - Finagle's ``RetryBudget`` is a leaky token bucket over ``ttl / 10`` slices: each deposit
      adds 1000 tokens, each retry takes ``1000 / percentCanRetry`` (truncated to an integer),
      plus a fixed reserve of ``minRetriesPerSec * ttl`` retries. Counting requests and retries
      separately is the same inequality without the integer rounding, and the counts are there
      for metrics. The slices are one second whatever the window (the same for the default
      10 s), and the window must be a whole number of seconds (Finagle: 1 to 60 s; here up to an
      hour).
    - Linkerd's budget (``retry_ratio``, ``min_retries_per_second``, ``ttl``) states the same
      rule; tower's ``Budget`` (Rust) implements it with 10 slices of the ``ttl`` and tokens
      scaled like Finagle's. Here ``ratio`` is 0 to 1 as the policy schema has it, though any
      non-negative value works.
    - As in both, a withdrawal that is refused changes nothing, and the reserve is available at
      any time, so a client that has just started may retry before it has made many requests.
    """

    __slots__ = (
        "_clock",
        "_lock",
        "_ratio",
        "_request_slots",
        "_requests",
        "_reserve",
        "_retries",
        "_retry_slots",
        "_second",
        "_size",
        "_slot",
    )

    def __init__(
        self,
        ratio: float,
        min_per_second: float,
        *,
        window: float = defaults.RETRY_BUDGET_WINDOW_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not (ratio >= 0 and math.isfinite(ratio)):
            raise ValueError(f"retry budget ratio must be a finite number >= 0, got {ratio!r}")
        if not (min_per_second >= 0 and math.isfinite(min_per_second)):
            raise ValueError(f"min_per_second must be a finite number >= 0, got {min_per_second!r}")
        if not (1 <= window <= _MAX_WINDOW_SECONDS and float(window).is_integer()):
            raise ValueError(
                f"retry budget window must be whole seconds, 1 to {_MAX_WINDOW_SECONDS}, "
                f"got {window!r}"
            )
        self._size = int(window)
        self._ratio = float(ratio)
        self._reserve = float(min_per_second) * self._size + _EPSILON
        self._clock = clock
        self._lock = threading.Lock()
        self._request_slots = [0] * self._size
        self._retry_slots = [0] * self._size
        self._requests = 0
        self._retries = 0
        self._second = math.floor(clock())
        self._slot = self._second % self._size

    def _expire(self, now: int) -> None:
        """Move the window to second ``now``, emptying the buckets of seconds that left it."""
        gap = now - self._second
        if gap <= 0:
            # A clock that steps back (only a test clock can) keeps counting in the newest bucket.
            return
        size = self._size
        if gap >= size:
            self._request_slots = [0] * size
            self._retry_slots = [0] * size
            self._requests = 0
            self._retries = 0
        else:
            requests, retries = self._request_slots, self._retry_slots
            for second in range(self._second + 1, now + 1):
                slot = second % size
                self._requests -= requests[slot]
                self._retries -= retries[slot]
                requests[slot] = 0
                retries[slot] = 0
        self._second = now
        self._slot = now % size

    def deposit(self) -> None:
        """Count one request (a first attempt, not a retry)."""
        now = math.floor(self._clock())
        with self._lock:
            if now != self._second:
                self._expire(now)
            self._request_slots[self._slot] += 1
            self._requests += 1

    def withdraw(self) -> bool:
        """Whether one retry may be made now; if so it is counted against the budget."""
        now = math.floor(self._clock())
        with self._lock:
            if now != self._second:
                self._expire(now)
            if self._retries + 1 > self._ratio * self._requests + self._reserve:
                return False
            self._retry_slots[self._slot] += 1
            self._retries += 1
            return True

    @property
    def requests(self) -> int:
        """Requests counted within the window."""
        with self._lock:
            self._expire(math.floor(self._clock()))
            return self._requests

    @property
    def retries(self) -> int:
        """Retries allowed within the window."""
        with self._lock:
            self._expire(math.floor(self._clock()))
            return self._retries

    def __repr__(self) -> str:
        return (
            f"RetryBudget(ratio={self._ratio}, reserve={self._reserve - _EPSILON:g}, "
            f"window={self._size}s, requests={self.requests}, retries={self.retries})"
        )
