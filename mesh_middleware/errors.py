"""Exceptions raised by mesh-middleware.

Hierarchy::

    MeshError
    ├── PolicyError          a policy file is unreadable or invalid (carries every issue found)
    ├── IdentityError        a mesh identity or end-user token was rejected (carries the reason)
    │   ├── UnknownSigningKey   the token names a key id the verifier does not know (yet)
    │   │   └── UnknownUserSigningKey   … of an end-user issuer
    │   │       └── EndUserKeysPending     that issuer's first key fetch is under way
    │   └── EndUserKeysUnavailable      that issuer's keys were never fetched (503)
    └── RequestError         a request the mesh cannot judge safely (answered with 400)
        ├── PathError           its path cannot be normalized safely
        └── RepeatedHeader      a header a policy condition reads appears more than once
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = [
    "EndUserKeysPending",
    "EndUserKeysUnavailable",
    "IdentityError",
    "MeshError",
    "PathError",
    "PolicyError",
    "PolicyIssue",
    "UnknownSigningKey",
    "UnknownUserSigningKey",
]


class MeshError(Exception):
    """Base class of every error raised by mesh-middleware."""


@dataclass(frozen=True, slots=True)
class PolicyIssue:
    """One problem found in a policy file: where it is and what was expected."""

    file: str
    line: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        field = f" {self.field}:" if self.field else ""
        return f"{where}:{field} {self.message}"


class PolicyError(MeshError):
    """A policy file could not be loaded; ``issues`` lists every problem found."""

    def __init__(self, issues: list[PolicyIssue]) -> None:
        self.issues = issues
        super().__init__("\n".join(str(issue) for issue in issues))


class IdentityError(MeshError):
    """A mesh identity token was rejected; ``reason`` says why in words a client may see."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class UnknownSigningKey(IdentityError):
    """The token's ``kid`` is not in the key set; a refetch of the JWKS may find it."""

    def __init__(self, kid: str) -> None:
        self.kid = kid
        super().__init__(f"unknown signing key {kid!r}")


class UnknownUserSigningKey(UnknownSigningKey):
    """An end-user token names a key its issuer's key set lacks; ``keys`` (that issuer's
    :class:`~mesh_middleware.identity.oidc.IssuerKeys`) may find it on a refetch."""

    def __init__(self, kid: str, keys: Any) -> None:
        super().__init__(kid)
        self.keys = keys
        self.reason = f"end-user token signed with unknown key {kid!r}"


class EndUserKeysPending(UnknownUserSigningKey):
    """The issuer's first key fetch is under way: worth waiting for briefly, else 503."""

    def __init__(self, kid: str, keys: Any) -> None:
        super().__init__(kid, keys)
        self.reason = f"the keys of issuer {keys.issuer!r} are not available yet"


class EndUserKeysUnavailable(IdentityError):
    """No key of the token's issuer has ever been fetched: the request cannot be judged (503)."""


class RequestError(MeshError):
    """The request cannot be judged safely; it is answered with 400 and ``reason``."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class PathError(RequestError):
    """The request path is unsafe or malformed."""


class RepeatedHeader(RequestError):
    """A header that a policy condition reads appears more than once.

    Frameworks read the first value, Envoy joins them: rather than pick one reading and let the
    app act on the other, the request is refused.
    """

    def __init__(self, name: str) -> None:
        super().__init__(f"header {name!r} appears more than once")
