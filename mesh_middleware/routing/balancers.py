"""Load balancers: which of the candidate instances takes the next try.

The default is Linkerd's and Finagle's: power of two choices (P2C) over a peak-EWMA latency
estimate, cost = estimate * (in_flight + 1). The engine reports every try with
:func:`call_started` and :func:`call_finished`; the balancers only read that state. Nothing here
does I/O or takes a lock: a pick is a few attribute reads and one or two random numbers.
"""

from __future__ import annotations

import itertools
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from mesh_middleware.defaults import EWMA_DECAY_SECONDS, EWMA_DEFAULT_SECONDS
from mesh_middleware.discovery.endpoints import Endpoint
from mesh_middleware.policy.schema import ConsistentHashBalancer, LoadBalancer
from mesh_middleware.routing.hashring import RingHashBalancer

__all__ = [
    "Balancer",
    "EwmaBalancer",
    "LeastRequestBalancer",
    "RandomBalancer",
    "RingHashBalancer",
    "RoundRobinBalancer",
    "balancer_for",
    "call_finished",
    "call_started",
    "latency_estimate",
]

# A measured estimate never drops to 0.0, which means "not measured yet".
_MIN_ESTIMATE = 1e-6


def call_started(endpoint: Endpoint) -> None:
    """A try to ``endpoint`` begins: count it in flight."""
    endpoint.in_flight += 1


def call_abandoned(endpoint: Endpoint) -> None:
    """A try to ``endpoint`` ended without telling its latency (cancelled): no longer in flight."""
    in_flight = endpoint.in_flight - 1
    endpoint.in_flight = in_flight if in_flight > 0 else 0


def call_finished(endpoint: Endpoint, latency: float, now: float) -> None:
    """A try to ``endpoint`` ended after ``latency`` seconds: update its peak-EWMA estimate.

    As in Finagle's ``PeakEwma`` and tower's ``peak_ewma``: a sample above the estimate
    replaces it at once, so a slowing instance is avoided from the next pick; a lower sample
    pulls the estimate toward it with the weight of the time since the last sample,
    ``estimate * w + sample * (1 - w)`` with ``w = exp(-elapsed / EWMA_DECAY_SECONDS)``.
    """
    call_abandoned(endpoint)
    sample = latency if latency > _MIN_ESTIMATE else _MIN_ESTIMATE
    estimate = endpoint.ewma or EWMA_DEFAULT_SECONDS  # unmeasured: the default since creation
    if sample > estimate:
        endpoint.ewma = sample
    else:
        elapsed = now - endpoint.ewma_at
        w = math.exp(-elapsed / EWMA_DECAY_SECONDS) if elapsed > 0.0 else 1.0
        mixed = estimate * w + sample * (1.0 - w)
        endpoint.ewma = mixed if mixed > _MIN_ESTIMATE else _MIN_ESTIMATE
    endpoint.ewma_at = now


def latency_estimate(endpoint: Endpoint, now: float) -> float:
    """The latency estimate of ``endpoint`` as read at ``now`` (seconds).

    ``EWMA_DEFAULT_SECONDS`` for an instance not measured yet. Between samples the estimate
    decays toward zero, as reading it does in tower and Finagle (they decay with a zero-latency
    sample), so an instance that was slow once is tried again after a while. Unlike theirs, the
    read does not write the decay back: reads stay lock-free, and since the decay is
    multiplicative the value read is the same.
    """
    # Unmeasured, the estimate is the default from the moment the instance appeared, and
    # decays like any other (tower does the same): a caller that makes one call at a time
    # still tries an instance that has not answered yet, once the others' estimates are lower.
    estimate = endpoint.ewma or EWMA_DEFAULT_SECONDS
    elapsed = now - endpoint.ewma_at
    if elapsed > 0.0:
        return estimate * math.exp(-elapsed / EWMA_DECAY_SECONDS)
    return estimate


class Balancer(Protocol):
    """Chooses one endpoint of a non-empty candidate list for each try."""

    needs_key: bool
    """Whether :meth:`pick` uses a request key (consistent hashing only)."""

    def key_of(self, headers: Mapping[str, str]) -> str | None:
        """The hash key of a request (from lower-case header names), ``None`` if absent."""
        ...

    def pick(self, candidates: Sequence[Endpoint], key: str | None) -> Endpoint:
        """One of ``candidates`` (non-empty) for the next try."""
        ...


class _Keyless:
    """The part every balancer but consistent hashing shares: no request key."""

    __slots__ = ()
    needs_key = False

    def key_of(self, headers: Mapping[str, str]) -> str | None:
        """Always ``None``: this balancer does not look at the request."""
        return None


def _two(candidates: Sequence[Endpoint], rand: Callable[[], float]) -> tuple[Endpoint, Endpoint]:
    """Two distinct candidates drawn at random (``len(candidates) >= 2``)."""
    n = len(candidates)
    i = int(rand() * n)
    j = int(rand() * (n - 1))
    if j >= i:
        j += 1
    return candidates[i], candidates[j]


class EwmaBalancer(_Keyless):
    """P2C over peak-EWMA cost: two distinct random candidates, the cheaper one wins."""

    __slots__ = ("_clock", "_random")

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self._clock = clock
        self._random = (rng or random.Random()).random

    def pick(self, candidates: Sequence[Endpoint], key: str | None) -> Endpoint:
        """The cheaper of two distinct random candidates (ties go to the first drawn)."""
        if len(candidates) == 1:
            return candidates[0]
        a, b = _two(candidates, self._random)
        now = self._clock()
        cost_a = latency_estimate(a, now) * (a.in_flight + 1)
        cost_b = latency_estimate(b, now) * (b.in_flight + 1)
        return b if cost_b < cost_a else a


class LeastRequestBalancer(_Keyless):
    """P2C over calls in flight: of two distinct random candidates, the less busy one."""

    __slots__ = ("_random",)

    def __init__(self, *, rng: random.Random | None = None) -> None:
        self._random = (rng or random.Random()).random

    def pick(self, candidates: Sequence[Endpoint], key: str | None) -> Endpoint:
        """The one of two distinct random candidates with fewer calls in flight."""
        if len(candidates) == 1:
            return candidates[0]
        a, b = _two(candidates, self._random)
        return b if b.in_flight < a.in_flight else a


class RoundRobinBalancer(_Keyless):
    """A rotating counter over the candidate list."""

    __slots__ = ("_counter",)

    def __init__(self, *, start: int = 0) -> None:
        # next() on itertools.count is atomic under the GIL: threads never share a turn.
        self._counter = itertools.count(start)

    def pick(self, candidates: Sequence[Endpoint], key: str | None) -> Endpoint:
        """The next candidate in turn."""
        return candidates[next(self._counter) % len(candidates)]


class RandomBalancer(_Keyless):
    """A uniformly random candidate."""

    __slots__ = ("_random",)

    def __init__(self, *, rng: random.Random | None = None) -> None:
        self._random = (rng or random.Random()).random

    def pick(self, candidates: Sequence[Endpoint], key: str | None) -> Endpoint:
        """Any candidate, each as likely."""
        return candidates[int(self._random() * len(candidates))]


def balancer_for(spec: LoadBalancer, *, rng: random.Random | None = None) -> Balancer:
    """A new balancer (with its own state) for the policy's ``load_balancer`` setting.

    ``rng`` makes the random draws reproducible (tests); by default each balancer seeds its own.
    """
    if isinstance(spec, ConsistentHashBalancer):
        source = spec.consistent_hash
        return RingHashBalancer(header=source.header, cookie=source.cookie, rng=rng)
    if spec == "ewma":
        return EwmaBalancer(rng=rng)
    if spec == "least_request":
        return LeastRequestBalancer(rng=rng)
    if spec == "round_robin":
        # Start at a random place so that many clients do not all hit the first instance first.
        return RoundRobinBalancer(start=(rng or random.Random()).randrange(1 << 16))
    if spec == "random":
        return RandomBalancer(rng=rng)
    raise ValueError(f"unknown load balancer {spec!r}")
