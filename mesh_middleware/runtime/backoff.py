"""Jittered exponential backoff for retrying the registry."""

from __future__ import annotations

import random
from collections.abc import Callable

from mesh_middleware import defaults

__all__ = ["Backoff"]


class Backoff:
    """Delays that double from ``base`` up to ``cap``, each drawn from ``[d/2, d]``.

    Half the delay is kept fixed so a fleet that lost the registry together does not come back
    at once, and never retries in a tight loop either (full jitter can draw ~0).
    """

    def __init__(
        self,
        base: float = defaults.REGISTRY_BACKOFF_SECONDS,
        cap: float = defaults.REGISTRY_BACKOFF_CAP_SECONDS,
        uniform: Callable[[float, float], float] = random.uniform,
    ) -> None:
        self.base = base
        self.cap = cap
        self._uniform = uniform
        self.failures = 0

    def next(self) -> float:
        """The delay before the next attempt; counts one more failure."""
        ceiling = min(self.cap, self.base * 2 ** min(self.failures, 32))
        self.failures += 1
        return self._uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        """A call succeeded: the next failure starts again from ``base``."""
        self.failures = 0
