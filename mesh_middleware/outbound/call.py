"""One outbound call to a mesh destination: which instance each try goes to, and what next.

The HTTP-client adapters drive the loop (they own sending, sleeping and their exception
types); a :class:`Call` decides. Order per DESIGN §1: route → subset → zone → outlier filter →
balancer pick → per-try timeout → on an answer or a failure, the retry decision (conditions,
method, replayable body, attempts, deadline, backoff or ``Retry-After``, then the budget).
"""

from __future__ import annotations

import enum
import random
import time
from collections.abc import Mapping
from typing import Any

from mesh_middleware import defaults
from mesh_middleware.discovery.endpoints import Endpoint, EndpointSet
from mesh_middleware.outbound.destination import Destination
from mesh_middleware.resilience.retry_policy import Failure, backoff, parse_retry_after
from mesh_middleware.routing.balancers import call_abandoned, call_finished, call_started
from mesh_middleware.routing.routes import RouteChoice
from mesh_middleware.routing.zones import prefer_zone
from mesh_middleware.telemetry import metrics

__all__ = ["Call", "CallRefused", "Next", "Refusal"]

_FAILURE_LATENCY = 1.0  # a failed try counts as a slow one, so the balancer steers away at once
_RETRY_AFTER_MAX = defaults.RETRY_AFTER_MAX_SECONDS


class Refusal(enum.Enum):
    """Why the mesh ended a call without (another) answer from the destination."""

    NO_HEALTHY_INSTANCES = "no_healthy_instances"
    CIRCUIT_OPEN = "circuit_open"
    RETRY_BUDGET_EXHAUSTED = "retry_budget_exhausted"
    DEADLINE_EXCEEDED = "deadline_exceeded"


class CallRefused(Exception):
    """Raised by :class:`Call` for the adapters to turn into their client's exception types."""

    def __init__(self, refusal: Refusal, message: str) -> None:
        super().__init__(message)
        self.refusal = refusal
        self.message = message


class Next(enum.Enum):
    """What the adapter does after a try."""

    DONE = "done"  # return the answer, or raise the try's own exception
    RETRY = "retry"  # sleep ``Call.delay``, then try again
    BUDGET = "budget"  # retriable, but the budget is spent: the adapter raises (failures only)
    DEADLINE = "deadline"  # the deadline has passed: the adapter raises DeadlineExceeded


class Call:
    """The decisions for one call; not shared between threads."""

    __slots__ = (
        "_finished",
        "_try_started",
        "attempt",
        "choice",
        "deadline",
        "delay",
        "destination",
        "endpoint_set",
        "headers",
        "method",
        "mirror_version",
        "mirrored",
        "panic",
        "path",
        "replayable",
        "span",
        "started",
        "tried",
        "url",
    )

    def __init__(
        self,
        destination: Destination,
        method: str,
        path: str,
        headers: Mapping[str, str],
        *,
        replayable: bool,
        deadline: float | None = None,
        now: float | None = None,
        url: Any = None,
    ) -> None:
        """Begin a call; raises :class:`CallRefused` when the destination is at its limit.

        ``deadline`` (monotonic) is the caller's own, if any; the destination's timeout may
        shorten it. ``path`` is the request target without scheme and host.
        """
        now = time.monotonic() if now is None else now
        if not destination.enter():
            metrics.count_circuit_open(destination.service)
            raise CallRefused(
                Refusal.CIRCUIT_OPEN,
                f"{destination.service}: {destination.max_concurrent} calls already in flight "
                "(outbound max_concurrent)",
            )
        self.destination = destination
        self.url = url  # the URL the caller asked for, for the adapters to put back
        self.path = path
        self.panic = False
        self.span: Any = None  # the current try's client span, kept by the adapters
        self.method = method
        self.headers = headers
        self.replayable = replayable
        self.started = now
        own = now + destination.timeout
        self.deadline = own if deadline is None or deadline > own else deadline
        self.choice: RouteChoice = destination.routes.select(method, path, headers)
        mirror = self.choice.mirror
        if mirror is None:
            mirror = destination.mirror
        self.mirrored = mirror is not None and mirror.chosen()
        self.mirror_version = mirror.version if mirror is not None else None
        self.endpoint_set: EndpointSet | None = destination.endpoints()
        self.attempt = 0
        self.tried: list[Endpoint] = []
        self.delay = 0.0
        self._finished = False
        self._try_started = now
        destination.budget.deposit()

    # -- choosing an instance -------------------------------------------------------------

    def pick(self, now: float) -> Endpoint:
        """The instance for the next try; raises :class:`CallRefused` if there is none."""
        destination = self.destination
        version = self.choice.version
        endpoint_set = self.endpoint_set
        subset = endpoint_set.subset(version) if endpoint_set is not None else ()
        if not subset:
            raise CallRefused(Refusal.NO_HEALTHY_INSTANCES, self._nobody(endpoint_set))
        usable, panic = destination.outlier.available(subset, now)
        self.panic = self.panic or panic
        if self.tried:
            fresh = [e for e in usable if e not in self.tried]
            if fresh:
                usable = fresh
        if destination.zone is not None:
            usable = prefer_zone(usable, subset, destination.zone, random.random())
        balancer = destination.balancer
        key = balancer.key_of(self.headers) if balancer.needs_key else None
        endpoint = balancer.pick(usable, key)
        if not destination.outlier.picked(endpoint):
            # Another call took this instance's one probe first: choose among the others.
            others = [e for e in usable if e is not endpoint]
            if others:
                endpoint = balancer.pick(others, key)
                destination.outlier.picked(endpoint)
        call_started(endpoint)
        self._try_started = now
        self.tried.append(endpoint)
        self.attempt += 1
        return endpoint

    def _nobody(self, endpoint_set: EndpointSet | None) -> str:
        service = self.destination.service
        if endpoint_set is None:
            return f"no instance of {service!r} is known yet (is the registry reachable?)"
        version = self.choice.version
        if version is not None and len(endpoint_set):
            route = self.choice.route
            return f"no healthy instance of {service!r} version {version!r} (route {route})"
        return f"no healthy instance of {service!r}"

    def try_timeout(self, now: float) -> float:
        """Seconds this try may take: the per-try timeout, never past the deadline."""
        left = self.deadline - now
        per_try = self.destination.retry.per_try_timeout
        if per_try is not None and per_try < left:
            return per_try
        return max(left, 0.001)

    def remaining(self, now: float) -> float:
        """Seconds left before the deadline."""
        return max(self.deadline - now, 0.0)

    def header_deadline(self, now: float) -> str:
        """What ``x-mesh-deadline-ms`` says for a try starting now: the try's own limit, so a
        callee stops when this try is abandoned (Envoy's expected-timeout header does the same)."""
        return str(int(self.try_timeout(now) * 1000))

    # -- after a try ----------------------------------------------------------------------

    def answered(
        self, endpoint: Endpoint, status: int, retry_after: str | None, now: float
    ) -> Next:
        """The try got an answer with ``status``: return it, or retry (``self.delay`` first)."""
        call_finished(endpoint, now - self._try_started, now)
        outlier = self.destination.outlier
        if status >= 500:
            outlier.failure(endpoint, now, self._population())
        else:
            outlier.success(endpoint, now)
        policy = self.destination.retry
        if not policy.retry_status(status):
            return Next.DONE
        if not policy.method_allows(
            self.method, self.headers, self.choice.retry_non_idempotent, None
        ):
            return Next.DONE
        wait = parse_retry_after(retry_after) if retry_after is not None else None
        # A retriable answer whose budget is spent is returned as it is (Envoy does the same).
        return Next.RETRY if self._may_retry(now, wait) is Next.RETRY else Next.DONE

    def failed(self, endpoint: Endpoint, failure: Failure, now: float) -> Next:
        """The try failed without an answer: raise its exception, retry, or say why not."""
        call_finished(endpoint, _FAILURE_LATENCY, now)
        self.destination.outlier.failure(endpoint, now, self._population())
        if now >= self.deadline:
            return Next.DEADLINE  # whatever failed last, the call ran out of time
        policy = self.destination.retry
        if not policy.retry_failure(failure):
            return Next.DONE
        if not policy.method_allows(
            self.method, self.headers, self.choice.retry_non_idempotent, failure
        ):
            return Next.DONE
        return self._may_retry(now, None)

    def broke(self, endpoint: Endpoint, now: float) -> None:
        """The try ended without a verdict on the instance: the caller cancelled it, or it failed
        on this side (a local protocol error). It is no longer in flight; nothing else counts,
        so a caller's own timeouts never eject healthy instances."""
        call_abandoned(endpoint)
        self.destination.outlier.abandoned(endpoint)

    def _may_retry(self, now: float, retry_after: float | None) -> Next:
        if self.attempt > self.destination.retry.attempts or not self.replayable:
            return Next.DONE
        left = self.deadline - now
        delay = backoff(self.attempt - 1)
        if retry_after is not None:
            if retry_after > min(left, _RETRY_AFTER_MAX):
                return Next.DONE
            delay = max(delay, retry_after)
        if left <= delay:
            return Next.DONE
        if not self.destination.budget.withdraw():
            destination = self.destination
            metrics.count_budget_exhausted(destination.source, destination.service)
            return Next.BUDGET
        self.delay = delay
        return Next.RETRY

    def _population(self) -> tuple[Endpoint, ...]:
        endpoint_set = self.endpoint_set
        return endpoint_set.endpoints if endpoint_set is not None else ()

    def finish(self) -> None:
        """The call is over (answered, failed or abandoned); call exactly once."""
        if not self._finished:
            self._finished = True
            self.destination.leave()
