"""Matching end users by principal, as Istio's ``requestPrincipals`` does.

A pattern is written ``iss/sub`` and split at its last ``/`` (issuers are often URLs); the
issuer and the subject are then matched each on its own, so ``https://idp.example/*`` is any
subject of that issuer and never a user of the issuer ``https://idp.example/tenant2``:

- ``*``: any user (a token that verified);
- ``*SUFFIX/sub`` (or ``*/sub``): an issuer ending in SUFFIX (any issuer), exactly that subject;
- ``iss/PREFIX*`` (or ``iss/*``): exactly that issuer, a subject starting with PREFIX (any);
- ``*SUFFIX`` and ``PREFIX*`` without a ``/``: any issuer and a subject ending in SUFFIX; an
  issuer starting with PREFIX and any subject;
- ``iss/sub``: exactly that issuer and subject. So a subject containing ``/`` cannot be named
  exactly, as in Istio, and no issuer can pass for a user of another.

``anonymous`` (ours, like ``from``'s) names a request without an end-user token.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mesh_middleware.identity.end_user import EndUser

__all__ = ["ANONYMOUS_USER", "PrincipalMatcher"]

ANONYMOUS_USER = "anonymous"

_ANY = 0
_EXACT = 1
_PREFIX = 2
_SUFFIX = 3

Part = tuple[int, str]
"""How one side (issuer or subject) is matched: (kind, text)."""


def _parts(pattern: str) -> tuple[Part, Part]:
    """The (issuer, subject) matchers of one pattern (Istio's reading of requestPrincipals)."""
    if pattern == "*":
        return (_ANY, ""), (_ANY, "")
    issuer, slash, subject = pattern.rpartition("/")
    if not slash:
        issuer, subject = pattern, ""
    if pattern.startswith("*"):
        if not slash:
            return (_ANY, ""), (_SUFFIX, pattern[1:])
        side: Part = (_ANY, "") if issuer == "*" else (_SUFFIX, issuer[1:])
        return side, (_EXACT, subject)
    if pattern.endswith("*"):
        if not slash:
            return (_PREFIX, pattern[:-1]), (_ANY, "")
        return (_EXACT, issuer), (_ANY, "") if subject == "*" else (_PREFIX, subject[:-1])
    return (_EXACT, issuer), (_EXACT, subject)


def _holds(part: Part, text: str) -> bool:
    kind, value = part
    if kind == _EXACT:
        return text == value
    if kind == _PREFIX:
        return text.startswith(value)
    if kind == _SUFFIX:
        return text.endswith(value)
    return text != ""


class PrincipalMatcher:
    """Matches an end user (``None`` for anonymous) against ``users`` patterns."""

    __slots__ = ("_parts", "anonymous", "patterns")

    def __init__(self, patterns: list[str]) -> None:
        self.anonymous = ANONYMOUS_USER in patterns
        self.patterns = tuple(p for p in patterns if p != ANONYMOUS_USER)
        self._parts = tuple(_parts(p) for p in self.patterns)

    def matches(self, user: EndUser | None) -> bool:
        if user is None:
            return self.anonymous
        issuer, subject = user.issuer, user.subject
        return any(_holds(i, issuer) and _holds(s, subject) for i, s in self._parts)
