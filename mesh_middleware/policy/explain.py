"""Explain what a policy decides for a hypothetical request, before deploying it.

The same steps the inbound middleware takes: normalize the path (400), public paths,
authentication (401 for a strict policy and an anonymous caller), the end user (401 for a token
from an issuer the policy does not name, or for an audience it does not accept), then
authorization.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from mesh_middleware.errors import PathError
from mesh_middleware.identity.end_user import EndUser, audience_list
from mesh_middleware.policy.compiled import CompiledPolicy
from mesh_middleware.policy.conditions import ANONYMOUS, Conditions
from mesh_middleware.policy.paths import encode_path, normalize_path
from mesh_middleware.policy.principals import PrincipalMatcher

__all__ = ["explain", "split_principal"]


def split_principal(principal: str, issuers: Iterable[str] = ()) -> tuple[str, str]:
    """``iss/sub`` → ``(iss, sub)``: after the longest of ``issuers`` that the principal starts
    with (then ``/``), so that a subject may hold ``/``; otherwise at the last ``/`` (issuers
    are often URLs)."""
    known = [i for i in issuers if principal.startswith(i + "/") and len(principal) > len(i) + 1]
    if known:
        issuer = max(known, key=len)
        return issuer, principal[len(issuer) + 1 :]
    issuer, sep, subject = principal.rpartition("/")
    if not sep or not issuer or not subject:
        raise ValueError(f"{principal!r}: expected ISSUER/SUBJECT")
    return issuer, subject


def explain(
    compiled: CompiledPolicy,
    *,
    caller: str,
    method: str,
    path: str,
    headers: Mapping[str, str] | None = None,
    user: str | None = None,
    claims: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Return ``{"decision", "status", "rule", "reason", "user", …}`` for one request.

    ``caller`` is the calling service's name, or ``"anonymous"`` for a caller with no identity.
    ``user`` is the end user's principal (``ISSUER/SUBJECT``) when the request carries a valid
    end-user token, ``None`` for an anonymous user; ``claims`` are that token's other claims.
    The token is taken as valid (signature, expiry) unless its issuer is not one the policy
    names, or ``claims`` holds an ``aud`` the issuer does not accept.

    >>> explain(policy, caller="orders", method="POST", path="/reserve")  # doctest: +SKIP
    {'decision': 'allow', 'status': 200, 'rule': 'orders-reserve', 'reason': "allowed by ..."}
    """
    lowered = {k.lower(): v for k, v in (headers or {}).items()}
    # Only a policy with end users, or a question about one, gets told who the end user is.
    principal = user or ANONYMOUS if user is not None or compiled.end_users else None
    try:
        # A path typed on a command line may hold characters a client would percent-encode.
        normalized = normalize_path(encode_path(path))
    except PathError as exc:
        return _result("deny", 400, None, f"bad request: {exc.reason}", principal)
    if compiled.is_public(normalized):
        return _result(
            "allow",
            200,
            None,
            f"public path {normalized!r}: no identity or rules apply",
            principal,
        )
    who = None if caller == ANONYMOUS else caller
    if who is None and compiled.strict:
        return _result(
            "deny",
            401,
            None,
            "authentication is strict and the caller has no mesh identity",
            principal,
        )
    end_user, refused = _end_user(compiled, user, claims or {})
    if refused is not None:
        return _result("deny", 401, None, refused, principal)
    decision = compiled.authorizer.decide(who, method.upper(), normalized, lowered, end_user)
    result = _result(decision.decision, decision.status, decision.rule, decision.reason, principal)
    if end_user is None and user is not None:
        result["end_user"] = "ignored: the policy has no inbound.end_users, so no token is read"
    checks = _user_checks(
        compiled, decision.rule, who, method.upper(), normalized, lowered, end_user
    )
    if checks:
        result["user_conditions"] = checks
    return result


def _end_user(
    compiled: CompiledPolicy, user: str | None, claims: Mapping[str, Any]
) -> tuple[EndUser | None, str | None]:
    """The end user the request carries, or why its token would be refused (401)."""
    settings = compiled.end_users
    if user is None or settings is None:
        return None, None
    issuer, subject = split_principal(user, settings.issuers)
    spec = next((s for s in settings.settings.issuers if s.issuer == issuer), None)
    if spec is None:
        return None, f"end-user token issuer {issuer!r} is not trusted here (401)"
    audience = claims.get("aud")
    if audience is not None:
        given = audience_list(audience)
        if given is None:
            return None, "end-user token audience (aud) is not a string or a list of them (401)"
        if spec.audiences and not set(given) & set(spec.audiences):
            return None, "end-user token is for another audience (401)"
    full = {**claims, "iss": issuer, "sub": subject}
    return EndUser(issuer=issuer, subject=subject, claims=full, expires_at=math.inf), None


def _user_checks(
    compiled: CompiledPolicy,
    deciding: str | None,
    caller: str | None,
    method: str,
    path: str,
    headers: Mapping[str, str],
    user: EndUser | None,
) -> list[dict[str, Any]]:
    """How each rule that applies to this caller, method and path used the end user: the rule
    that decided, and the rules its end-user conditions alone kept from matching."""
    checks = []
    for rule in compiled.authorizer.rules:
        cond = rule.conditions
        if not cond.uses_user or not cond.holds_without_headers(caller, method, path):
            continue
        if not all(header.holds(headers) for header in cond.headers):
            continue
        held = cond.user_holds(user)
        if rule.name != deciding and held:
            continue  # it matched, but an earlier rule decided
        checks.append(
            {
                "rule": rule.name,
                "action": rule.action,
                "held": held,
                "conditions": _describe(cond, user),
            }
        )
    return checks


def _describe(cond: Conditions, user: EndUser | None) -> list[str]:
    principal = user.principal if user is not None else None
    lines = []
    if cond.users is not None:
        ok = cond.users.matches(user)
        lines.append(f"users {_patterns(cond.users)}: {_word(ok)} for {principal or ANONYMOUS}")
    if cond.not_users is not None:
        ok = not cond.not_users.matches(user)
        lines.append(
            f"not_users {_patterns(cond.not_users)}: {_word(ok)} for {principal or ANONYMOUS}"
        )
    for claim in cond.claims:
        ok = claim.holds(user.claims if user is not None else None)
        lines.append(f"{claim!r}: {_word(ok)}")
    return lines


def _patterns(matcher: PrincipalMatcher) -> list[str]:
    found = list(matcher.patterns)
    return [*found, ANONYMOUS] if matcher.anonymous else found


def _word(ok: bool) -> str:
    return "held" if ok else "did not hold"


def _result(
    decision: str, status: int, rule: str | None, reason: str, user: str | None
) -> dict[str, Any]:
    result: dict[str, Any] = {"decision": decision, "status": status, "rule": rule}
    result["reason"] = reason
    if user is not None:
        result["user"] = user
    return result
