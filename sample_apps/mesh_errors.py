"""How the shop's apps name a call that got no answer of its own (a mesh refusal or a transport
failure), whatever their framework."""

from __future__ import annotations

import httpx

from mesh_middleware import CircuitOpen, DeadlineExceeded, NoHealthyInstances, RetryBudgetExhausted

__all__ = ["mesh_refusal"]


def mesh_refusal(exc: httpx.HTTPError) -> tuple[int, str]:
    """The status and error name for a call that got no answer of its own.

    The mesh's refusals are 503 (nothing healthy, circuit open, retry budget spent) or 504
    (deadline); a transport failure the mesh passed on is 502, a timeout 504.
    """
    if isinstance(exc, NoHealthyInstances):
        return 503, "no_healthy_instances"
    if isinstance(exc, CircuitOpen):
        return 503, "circuit_open"
    if isinstance(exc, RetryBudgetExhausted):
        return 503, "retry_budget_exhausted"
    if isinstance(exc, DeadlineExceeded):
        return 504, "deadline_exceeded"
    if isinstance(exc, httpx.TimeoutException):
        return 504, "upstream_timeout"
    return 502, "upstream_unreachable"
