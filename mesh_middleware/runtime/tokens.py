"""The JWT-SVIDs this service presents to others, by audience.

Tokens for the audiences a policy lists under ``outbound.services`` are prefetched, and every
token held is renewed in the background at half its lifetime (DESIGN §3, after Istio). A
token asked for before it is cached is fetched on demand with a short bounded wait; callers
asking for the same audience at once share one fetch.
"""

from __future__ import annotations

import os
import random
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

from mesh_middleware import defaults
from mesh_middleware.runtime.registry_client import (
    IssuedToken,
    RegistryError,
    RegistryUnavailable,
)

__all__ = ["TokenCache"]

Fetch = Callable[[str, float | None], IssuedToken]

_MIN_RENEW_SECONDS = 1.0
_EXPIRY_MARGIN_SECONDS = 1.0
_MAX_REQUESTED = 1024


@dataclass(frozen=True, slots=True)
class _Entry:
    token: str
    valid_until: float  # monotonic
    renew_at: float  # monotonic


class TokenCache:
    """Tokens by audience: cached, renewed at half-life, fetched on demand (thread-safe)."""

    def __init__(
        self,
        fetch: Fetch,
        *,
        clock: Callable[[], float] = time.monotonic,
        uniform: Callable[[float, float], float] = random.uniform,
        retry_seconds: float = defaults.REGISTRY_BACKOFF_CAP_SECONDS,
    ) -> None:
        self._fetch = fetch
        self._clock = clock
        self._uniform = uniform
        self._retry_seconds = retry_seconds
        self._entries: dict[str, _Entry] = {}
        self._requested: set[str] = set()
        self._retry_at: dict[str, float] = {}
        self._inflight: dict[str, Future[str]] = {}
        self._lock = threading.Lock()
        ref = weakref.ref(self)

        def reset_in_child() -> None:
            cache = ref()
            if cache is not None:
                cache._lock = threading.Lock()
                cache._inflight = {}

        os.register_at_fork(after_in_child=reset_in_child)

    def get(self, audience: str) -> str | None:
        """The cached token for ``audience`` if it is still valid; never blocks."""
        entry = self._entries.get(audience)
        if entry is None or self._clock() >= entry.valid_until:
            return None
        return entry.token

    def audiences(self) -> list[str]:
        """Every audience a token is held or was asked for."""
        with self._lock:
            return sorted(set(self._entries) | self._requested)

    def due(self, wanted: Iterable[str]) -> list[str]:
        """Audiences to fetch now: wanted or asked for, and missing or past half-life."""
        now = self._clock()
        with self._lock:
            names = set(wanted) | self._requested | set(self._entries)
        due = []
        for audience in sorted(names):
            entry = self._entries.get(audience)
            if entry is not None and now < entry.renew_at:
                continue
            if now < self._retry_at.get(audience, float("-inf")):
                continue
            due.append(audience)
        return due

    def refresh(self, audience: str, timeout: float | None = None) -> str:
        """Fetch a token for ``audience`` now (or join a fetch under way); raise ``RegistryError``.

        ``timeout`` bounds each phase of the registry call, and the wait of a caller joining
        someone else's fetch.
        """
        with self._lock:
            future = self._inflight.get(audience)
            owner = future is None
            if future is None:
                future = Future()
                self._inflight[audience] = future
        if not owner:
            try:
                return future.result(timeout)
            except FutureTimeout:
                raise RegistryError(f"token for {audience!r}: still waiting") from None
        try:
            issued = self._fetch(audience, timeout)
        except BaseException as exc:
            if isinstance(exc, RegistryError) and not isinstance(exc, RegistryUnavailable):
                # Refused (e.g. an audience the registry rejects): not worth asking every tick.
                self._retry_at[audience] = self._clock() + self._retry_seconds
            future.set_exception(exc)
            raise
        finally:
            with self._lock:
                self._inflight.pop(audience, None)
        self._store(issued)
        future.set_result(issued.token)
        return issued.token

    def want(self, audience: str) -> None:
        """Fetch a token for ``audience`` in the background from now on."""
        with self._lock:
            if len(self._requested) < _MAX_REQUESTED:
                self._requested.add(audience)

    def fetch_now(
        self, audience: str, wait: float = defaults.TOKEN_FETCH_WAIT_SECONDS
    ) -> str | None:
        """The token for ``audience``, fetching it if it is not cached; ``None`` if that fails.

        The audience is renewed in the background from then on.
        """
        token = self.get(audience)
        if token is not None:
            return token
        self.want(audience)
        if self._clock() < self._retry_at.get(audience, float("-inf")):
            return None  # the registry refused this audience lately: not on a caller's thread
        try:
            return self.refresh(audience, timeout=wait)
        except RegistryError:
            return None

    def _store(self, issued: IssuedToken) -> None:
        now = self._clock()
        lifetime = issued.lifetime
        renew_in = max(lifetime * 0.5 * self._uniform(0.9, 1.0), _MIN_RENEW_SECONDS)
        entry = _Entry(issued.token, now + lifetime - _EXPIRY_MARGIN_SECONDS, now + renew_in)
        with self._lock:
            self._entries[issued.audience] = entry
        self._retry_at.pop(issued.audience, None)
