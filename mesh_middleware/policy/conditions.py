"""Compiled request conditions shared by authorization rules, faults and routes.

Within a condition set all given fields must hold (AND); the values of one field are
alternatives (OR); ``not_*`` fields exclude. Callers are service names, ``None`` for an
anonymous caller; ``anonymous`` in a ``from`` list names that caller, ``*`` any authenticated one.
End users are matched by their principal as Istio's ``requestPrincipals`` are (issuer and
subject each on its own: :mod:`mesh_middleware.policy.principals`), ``None`` when anonymous,
and by their token's claims.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from mesh_middleware.policy.claims import ClaimMatcher
from mesh_middleware.policy.patterns import StringMatcher
from mesh_middleware.policy.principals import PrincipalMatcher
from mesh_middleware.policy.schema import HeaderCondition

if TYPE_CHECKING:
    from mesh_middleware.identity.end_user import EndUser

__all__ = ["ANONYMOUS", "CallerMatcher", "Conditions", "HeaderMatcher"]

ANONYMOUS = "anonymous"


class CallerMatcher:
    """Matches a caller (a service name, or ``None`` for anonymous) against ``from`` patterns."""

    __slots__ = ("anonymous", "services")

    def __init__(self, patterns: list[str]) -> None:
        self.anonymous = ANONYMOUS in patterns
        self.services = StringMatcher([p for p in patterns if p != ANONYMOUS])

    def matches(self, caller: str | None) -> bool:
        if caller is None:
            return self.anonymous
        return self.services.matches(caller)


class HeaderMatcher:
    """One compiled header condition; a missing header fails ``values`` and holds ``not_values``."""

    __slots__ = ("matcher", "name", "negate", "present")

    def __init__(self, name: str, condition: HeaderCondition) -> None:
        self.name = name
        self.present = condition.present
        self.negate = condition.not_values is not None
        patterns = condition.values if condition.values is not None else condition.not_values
        self.matcher = StringMatcher(patterns or [])

    def holds(self, headers: Mapping[str, str]) -> bool:
        value = headers.get(self.name)
        if self.present is not None:
            return (value is not None) is self.present
        if value is None:
            return self.negate
        return self.matcher.matches(value) is not self.negate


class Conditions:
    """A compiled set of conditions on caller, method, path and headers."""

    __slots__ = (
        "claims",
        "from_",
        "headers",
        "methods",
        "not_from",
        "not_methods",
        "not_paths",
        "not_users",
        "paths",
        "per_request",
        "users",
    )

    def __init__(
        self,
        *,
        from_: list[str] | None = None,
        not_from: list[str] | None = None,
        methods: list[str] | None = None,
        not_methods: list[str] | None = None,
        paths: list[str] | None = None,
        not_paths: list[str] | None = None,
        headers: Mapping[str, HeaderCondition] | None = None,
        users: list[str] | None = None,
        not_users: list[str] | None = None,
        claims: Mapping[str, list[str]] | None = None,
        not_claims: Mapping[str, list[str]] | None = None,
    ) -> None:
        self.from_ = CallerMatcher(from_) if from_ else None
        self.not_from = CallerMatcher(not_from) if not_from else None
        self.methods = StringMatcher(methods) if methods else None
        self.not_methods = StringMatcher(not_methods) if not_methods else None
        self.paths = StringMatcher(paths) if paths else None
        self.not_paths = StringMatcher(not_paths) if not_paths else None
        self.headers = tuple(HeaderMatcher(n, c) for n, c in (headers or {}).items())
        self.users = PrincipalMatcher(users) if users else None
        self.not_users = PrincipalMatcher(not_users) if not_users else None
        self.claims = tuple(ClaimMatcher(k, v) for k, v in (claims or {}).items()) + tuple(
            ClaimMatcher(k, v, negate=True) for k, v in (not_claims or {}).items()
        )
        self.per_request = bool(self.headers) or self.uses_user
        """Whether the request's headers or end user must be looked at, past caller, method
        and path."""

    @property
    def uses_headers(self) -> bool:
        return bool(self.headers)

    @property
    def uses_user(self) -> bool:
        return self.users is not None or self.not_users is not None or bool(self.claims)

    def request_holds(self, headers: Mapping[str, str], user: EndUser | None) -> bool:
        """Whether the header and end-user conditions hold (true when there are none)."""
        for header in self.headers:
            if not header.holds(headers):
                return False
        if self.users is not None or self.not_users is not None or self.claims:
            return self.user_holds(user)
        return True

    def user_holds(self, user: EndUser | None) -> bool:
        """Whether the end-user conditions hold for ``user`` (``None``: anonymous).

        Remembered on the user: a verified user is one object for every request with its token
        (the verification cache), so its claims are matched once per rule, not per request.
        """
        if user is None:
            return self._user_holds(None)
        memo = user.memo
        held = memo.get(self)
        if held is None:
            held = memo[self] = self._user_holds(user)
        return held

    def _user_holds(self, user: EndUser | None) -> bool:
        if self.users is not None and not self.users.matches(user):
            return False
        if self.not_users is not None and self.not_users.matches(user):
            return False
        if self.claims:
            claims = user.claims if user is not None else None
            for claim in self.claims:
                if not claim.holds(claims):
                    return False
        return True

    def holds(
        self,
        caller: str | None,
        method: str,
        path: str,
        headers: Mapping[str, str],
        user: EndUser | None = None,
    ) -> bool:
        """Whether every given condition holds for this request."""
        return self.holds_without_headers(caller, method, path) and self.request_holds(
            headers, user
        )

    def headers_hold(self, headers: Mapping[str, str]) -> bool:
        """Whether every header condition holds (true when there are none)."""
        for header in self.headers:
            if not header.holds(headers):
                return False
        return True

    def holds_without_headers(self, caller: str | None, method: str, path: str) -> bool:
        """Whether the caller, method and path conditions hold."""
        if self.paths is not None and not self.paths.matches(path):
            return False
        if self.methods is not None and not self.methods.matches(method):
            return False
        if self.from_ is not None and not self.from_.matches(caller):
            return False
        if self.not_paths is not None and self.not_paths.matches(path):
            return False
        if self.not_methods is not None and self.not_methods.matches(method):
            return False
        return not (self.not_from is not None and self.not_from.matches(caller))
