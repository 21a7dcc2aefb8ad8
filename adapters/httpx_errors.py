"""The errors a mesh call raises, each a subclass of the httpx exception it stands for.

``except httpx.HTTPError`` (or ``httpx.TransportError``, ``httpx.TimeoutException``, …) keeps
working unchanged; ``except NoHealthyInstances`` tells the mesh's reasons apart.
"""

from __future__ import annotations

import json

import httpx

from mesh_middleware.errors import MeshError
from mesh_middleware.outbound.call import CallRefused, Refusal

__all__ = [
    "CircuitOpen",
    "DeadlineExceeded",
    "NoHealthyInstances",
    "RetryBudgetExhausted",
    "httpx_error",
]


class NoHealthyInstances(httpx.ConnectError, MeshError):
    """No instance of the destination (or of the routed version) can take the call."""


class CircuitOpen(httpx.HTTPStatusError, MeshError):
    """The destination already has ``max_concurrent`` calls in flight: a fast 503.

    ``response`` is that 503, with a JSON body saying why (as a sidecar would answer).
    """


class RetryBudgetExhausted(httpx.TransportError, MeshError):
    """A retriable failure was not retried because the destination's retry budget is spent.

    The failure itself is ``__cause__``.
    """


class DeadlineExceeded(httpx.TimeoutException, MeshError):
    """The call's deadline (its timeout, or its caller's propagated deadline) has passed."""


def httpx_error(refused: CallRefused, request: httpx.Request) -> httpx.HTTPError:
    """The httpx-flavoured exception for a call the mesh ended."""
    message = refused.message
    refusal = refused.refusal
    if refusal is Refusal.NO_HEALTHY_INSTANCES:
        return NoHealthyInstances(message, request=request)
    if refusal is Refusal.CIRCUIT_OPEN:
        body = json.dumps({"error": refusal.value, "reason": message}).encode()
        response = httpx.Response(
            503,
            headers={"content-type": "application/json", "x-mesh-error": refusal.value},
            content=body,
            request=request,
        )
        return CircuitOpen(message, request=request, response=response)
    if refusal is Refusal.RETRY_BUDGET_EXHAUSTED:
        return RetryBudgetExhausted(message, request=request)
    return DeadlineExceeded(message, request=request)
