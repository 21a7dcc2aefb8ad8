"""Explain what a policy decides for a hypothetical request, before deploying it.

The same steps the inbound middleware takes: normalize the path (400), public paths,
authentication (401 for a strict policy and an anonymous caller), then authorization.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mesh_middleware.errors import PathError
from mesh_middleware.policy.compiled import CompiledPolicy
from mesh_middleware.policy.conditions import ANONYMOUS
from mesh_middleware.policy.paths import encode_path, normalize_path

__all__ = ["explain"]


def explain(
    compiled: CompiledPolicy,
    *,
    caller: str,
    method: str,
    path: str,
    headers: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Return ``{"decision", "status", "rule", "reason"}`` for one request.

    ``caller`` is the calling service's name, or ``"anonymous"`` for a caller with no identity.

    >>> explain(policy, caller="orders", method="POST", path="/reserve")  # doctest: +SKIP
    {'decision': 'allow', 'status': 200, 'rule': 'orders-reserve', 'reason': "allowed by ..."}
    """
    lowered = {k.lower(): v for k, v in (headers or {}).items()}
    try:
        # A path typed on a command line may hold characters a client would percent-encode.
        normalized = normalize_path(encode_path(path))
    except PathError as exc:
        return _result("deny", 400, None, f"bad request: {exc.reason}")
    if compiled.is_public(normalized):
        return _result(
            "allow", 200, None, f"public path {normalized!r}: no identity or rules apply"
        )
    who = None if caller == ANONYMOUS else caller
    if who is None and compiled.strict:
        return _result(
            "deny", 401, None, "authentication is strict and the caller has no mesh identity"
        )
    decision = compiled.authorizer.decide(who, method.upper(), normalized, lowered)
    return _result(decision.decision, decision.status, decision.rule, decision.reason)


def _result(decision: str, status: int, rule: str | None, reason: str) -> dict[str, Any]:
    return {"decision": decision, "status": status, "rule": rule, "reason": reason}
