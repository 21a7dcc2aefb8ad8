"""Which failed calls are retried, how long to wait between tries, and ``Retry-After``.

A :class:`RetryPolicy` is compiled once from a destination's ``retries`` (DESIGN §2, §6) into
sets, so every check on the request path is a set look-up.
"""

from __future__ import annotations

import enum
import random
import time
from collections.abc import Callable, Mapping
from datetime import UTC
from email.utils import parsedate_to_datetime

from mesh_middleware import defaults
from mesh_middleware.policy import schema

__all__ = ["IDEMPOTENT_METHODS", "Failure", "RetryPolicy", "backoff", "parse_retry_after"]


class Failure(enum.Enum):
    """Kinds of transport failure; the HTTP-client adapters map their exceptions to these."""

    CONNECT_FAILURE = "connect-failure"
    """The connection could not be made: the request was never sent."""
    RESET = "reset"
    """The connection was reset or closed before a response arrived."""
    REFUSED_STREAM = "refused-stream"
    """HTTP/2 ``REFUSED_STREAM``: the server refused the stream."""
    TIMEOUT = "timeout"
    """The per-try timeout expired."""


IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
"""Methods RFC 9110 defines as idempotent: safe to send twice."""

_IDEMPOTENCY_KEY = "idempotency-key"
# The policy's names for groups of status codes (Envoy's retry_on).
_STATUS_GROUPS: dict[str, frozenset[int]] = {
    "gateway-error": frozenset({502, 503, 504}),
    "retriable-4xx": frozenset({409}),
}
_FAILURE_NAMES = {f.value: f for f in Failure if f is not Failure.TIMEOUT}


class RetryPolicy:
    """A destination's compiled ``retries``.

    ``attempts`` is the number of retries after the first try (Istio's meaning; 2 by default),
    ``per_try_timeout`` the timeout of each try in seconds, ``None`` for none.
    """

    __slots__ = ("_failures", "_statuses", "attempts", "idempotent_only", "per_try_timeout")

    def __init__(self, retries: schema.Retries) -> None:
        self.attempts = retries.attempts
        self.per_try_timeout = retries.per_try_timeout
        self.idempotent_only = retries.idempotent_only
        statuses: set[int] = set()
        failures: set[Failure] = set()
        for condition in retries.on:
            if condition in _STATUS_GROUPS:
                statuses |= _STATUS_GROUPS[condition]
            elif condition in _FAILURE_NAMES:
                failures.add(_FAILURE_NAMES[condition])
            else:
                # The schema admits only the names above and status codes 400-599.
                statuses.add(int(condition))
        # Envoy retries a per-try timeout only when one is set: without it the only timeout is
        # the overall one, and there is no time left to retry in.
        if self.per_try_timeout is not None:
            failures.add(Failure.TIMEOUT)
        self._statuses = frozenset(statuses)
        self._failures = frozenset(failures)

    def retry_status(self, status: int) -> bool:
        """Whether a response with this status is retried (``gateway-error`` is 502, 503, 504;
        ``retriable-4xx`` is 409, as in Envoy; other codes only when listed)."""
        return status in self._statuses

    def retry_failure(self, failure: Failure) -> bool:
        """Whether this transport failure is retried (``TIMEOUT`` only with a per-try timeout)."""
        return failure in self._failures

    def method_allows(
        self,
        method: str,
        headers: Mapping[str, str],
        route_opt_in: bool,
        failure: Failure | None,
    ) -> bool:
        """Whether a request with this method may be sent again.

        Idempotent methods (GET, HEAD, OPTIONS, TRACE, PUT, DELETE) always may. Others (POST,
        PATCH, ...) may when the request carries a non-empty ``Idempotency-Key`` header, when the
        route sets ``retry_non_idempotent``, or when ``retries.idempotent_only`` is false. A
        ``CONNECT_FAILURE`` may be retried for every method, as urllib3 does for connect errors:
        no byte of the request reached the server, so sending it again cannot repeat its effect.

        ``headers`` should be a case-insensitive mapping (httpx's, requests'); a plain dict is
        searched without regard to case as well.
        """
        if failure is Failure.CONNECT_FAILURE or method in IDEMPOTENT_METHODS:
            return True
        if route_opt_in or not self.idempotent_only:
            return True
        return _has_idempotency_key(headers)


def _has_idempotency_key(headers: Mapping[str, str]) -> bool:
    value = headers.get(_IDEMPOTENCY_KEY)
    if value is None and isinstance(headers, dict):
        # A plain dict may spell the name in any case; client header mappings already ignore it.
        for name, candidate in headers.items():
            if name.lower() == _IDEMPOTENCY_KEY:
                value = candidate
                break
    return bool(value)


_BASE = defaults.RETRY_BACKOFF_BASE_SECONDS
_CAP = defaults.RETRY_BACKOFF_CAP_SECONDS
# 2**_MAX_EXPONENT * base is far past any cap; clamping keeps the float finite for any retry.
_MAX_EXPONENT = 32


def backoff(retry: int, rand: Callable[[], float] = random.random) -> float:
    """Seconds to wait before retry number ``retry`` (0 for the first): full jitter.

    ``rand() * min(cap, base * 2**retry)`` with base 25 ms and cap 250 ms (AWS, Envoy), so the
    wait is uniform in [0, 25 ms) before the first retry, [0, 50 ms) before the second, and never
    250 ms or more.
    """
    exponent = min(max(retry, 0), _MAX_EXPONENT)
    return rand() * min(_CAP, _BASE * (1 << exponent))


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds a ``Retry-After`` header asks to wait, or ``None`` to fall back to the backoff.

    ``value`` is delay-seconds (``120``) or an HTTP-date (``Wed, 21 Oct 2015 07:28:00 GMT``),
    taken relative to ``now`` (seconds since the epoch; the wall clock when omitted). ``None``
    when the header is absent or unparsable, and for a date already past: a server whose clock
    runs behind ours must not turn into immediate retries. The caller caps the wait
    (``RETRY_AFTER_MAX_SECONDS``).
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if text.isascii() and text.isdigit():
        # float() has no digit limit (int() does), and an absurd delay is infinity, not a crash.
        return float(text)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        # RFC 9110 dates are GMT; email.utils leaves a date with a "-0000" zone naive.
        when = when.replace(tzinfo=UTC)
    try:
        delay = when.timestamp() - (time.time() if now is None else now)
    except (OverflowError, OSError, ValueError):
        return None
    return delay if delay >= 0 else None
