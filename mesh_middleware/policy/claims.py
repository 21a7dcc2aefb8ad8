"""Conditions on an end user's token claims, as Istio's ``request.auth.claims[...]`` has them.

A claim is named by its key (``groups``), or by a path into nested objects in Istio's bracket
form (``[realm_access][roles]``, also written ``request.auth.claims[realm_access][roles]``).
Istio's ``request.auth.audiences`` and ``request.auth.presenter`` are the ``aud`` and ``azp``
claims; any other ``request.`` attribute is an error rather than a claim no token has. As in
Istio, only strings are matched: a string claim matches a pattern, and a list claim matches when
any of its string elements does. An absent claim, and a number, boolean, object or null, never
matches ``values`` and always holds ``not_values``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from mesh_middleware.policy.patterns import StringMatcher

__all__ = ["ClaimMatcher", "claim_path_problem", "claim_strings", "parse_claim_path"]

_ISTIO_PREFIX = "request.auth.claims"
_ISTIO_CLAIM_ATTRIBUTES = {
    "request.auth.audiences": ("aud",),
    "request.auth.presenter": ("azp",),
}
_BRACKETS = re.compile(r"\[([^\[\]]+)\]")
_MAX_DEPTH = 8


def parse_claim_path(key: str) -> tuple[str, ...]:
    """The claim path a key names: ``groups`` → ``("groups",)``, ``[a][b]`` → ``("a", "b")``.

    Raises ``ValueError`` for a key that is neither a plain claim name nor the bracket form.
    """
    alias = _ISTIO_CLAIM_ATTRIBUTES.get(key)
    if alias is not None:
        return alias
    if key.startswith("request.") and not key.startswith(_ISTIO_PREFIX + "["):
        raise ValueError(_istio_attribute_problem(key))
    text = key[len(_ISTIO_PREFIX) :] if key.startswith(_ISTIO_PREFIX + "[") else key
    if not text:
        raise ValueError("empty claim name")
    if not text.startswith("["):
        if "[" in text or "]" in text:
            raise ValueError(f"{key!r}: write a nested claim as [outer][inner]")
        return (text,)
    parts = _BRACKETS.findall(text)
    if not parts or "".join(f"[{p}]" for p in parts) != text:
        raise ValueError(f"{key!r}: expected [claim] or [outer][inner]… (Istio's form)")
    if len(parts) > _MAX_DEPTH:
        raise ValueError(f"{key!r}: claims nest at most {_MAX_DEPTH} deep here")
    return tuple(parts)


def _istio_attribute_problem(key: str) -> str:
    # Taken as a plain claim name, it would name a claim no token has: a rule that never holds.
    if key == "request.auth.principal":
        return f"{key!r}: the end user's principal is matched by `users` / `not_users`"
    return (
        f"{key!r}: not a claim; write a claim as its name, [outer][inner] or "
        "request.auth.claims[name] (request.auth.audiences and request.auth.presenter are "
        "the aud and azp claims)"
    )


def claim_path_problem(key: str) -> str | None:
    """Why ``key`` names no claim, or ``None``."""
    try:
        parse_claim_path(key)
    except ValueError as exc:
        return str(exc)
    return None


def claim_strings(claims: Mapping[str, Any], path: tuple[str, ...]) -> list[str] | None:
    """The claim's strings to match (Istio matches string and list-of-string claims only), or
    ``None`` when the claim is absent or not one of those."""
    value: Any = claims
    for part in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
        if value is None:
            return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return None


class ClaimMatcher:
    """One compiled claim condition: ``values`` (any-of), or ``not_values`` when ``negate``."""

    __slots__ = ("key", "matcher", "negate", "path")

    def __init__(self, key: str, patterns: list[str], *, negate: bool = False) -> None:
        self.key = key
        self.path = parse_claim_path(key)
        self.matcher = StringMatcher(patterns)
        self.negate = negate

    def holds(self, claims: Mapping[str, Any] | None) -> bool:
        """Whether the condition holds for these claims (``None``: an anonymous user)."""
        values = claim_strings(claims, self.path) if claims is not None else None
        if not values:
            return self.negate
        matched = any(self.matcher.matches(v) for v in values)
        return matched is not self.negate

    def __repr__(self) -> str:
        word = "not_claims" if self.negate else "claims"
        return f"{word}[{self.key!r}]={list(self.matcher.patterns)!r}"
