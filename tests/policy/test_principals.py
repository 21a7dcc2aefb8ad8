"""``users`` / ``not_users`` patterns read as Istio reads ``requestPrincipals``: split at the
last ``/``, issuer and subject matched each on its own (istio/istio,
pilot/pkg/security/authz/model/generator.go, ``requestPrincipalGenerator``)."""

from __future__ import annotations

import pytest

from mesh_middleware.identity.end_user import EndUser
from mesh_middleware.policy.principals import PrincipalMatcher


def _user(issuer: str, subject: str) -> EndUser:
    return EndUser(issuer=issuer, subject=subject, claims={}, expires_at=2e9)


IDP = "https://idp.example.com"
TENANT = "https://idp.example.com/tenant2"


@pytest.mark.parametrize(
    ("pattern", "issuer", "subject", "matches"),
    [
        ("*", IDP, "alice", True),
        (f"{IDP}/alice", IDP, "alice", True),
        (f"{IDP}/alice", IDP, "alicex", False),
        # A pattern names one issuer: another whose URL extends it is not that issuer.
        (f"{IDP}/*", IDP, "bob", True),
        (f"{IDP}/*", TENANT, "bob", False),
        # Nor can an issuer take on another's principal with a subject holding "/".
        (f"{TENANT}/bob", TENANT, "bob", True),
        (f"{TENANT}/bob", IDP, "tenant2/bob", False),
        # Istio's own example issuer, and a subject with "/" under it.
        ("testing@secure.istio.io/testing@secure.istio.io", "testing@secure.istio.io",
         "testing@secure.istio.io", True),
        ("testing@secure.istio.io/team/alice", "testing@secure.istio.io", "team/alice", False),
        (f"{IDP}/al*", IDP, "alice", True),
        (f"{IDP}/al*", IDP, "bob", False),
        (f"{IDP}/al*", TENANT, "alice", False),
        ("*/bob", IDP, "bob", True),
        ("*/bob", TENANT, "bob", True),
        ("*/bob", IDP, "tenant2/bob", False),
        ("*example.com/bob", IDP, "bob", True),
        ("*example.com/bob", TENANT, "bob", False),
        # Without "/": a suffix of the subject (any issuer), a prefix of the issuer (any subject).
        ("*ice", IDP, "alice", True),
        ("*ice", TENANT, "bob", False),
        ("idp.example*", "idp.example.com", "bob", True),
        ("idp.example*", "other.example", "bob", False),
        # "https://idp*" has a "/": issuer "https:/" exactly, a subject starting "idp". Nobody.
        ("https://idp*", TENANT, "bob", False),
        ("https://idp*", "https:/", "idp-user", True),
        # An exact pattern without "/" names an issuer with an empty subject: nobody.
        (IDP, IDP, "alice", False),
    ],
)  # fmt: skip
def test_patterns(pattern: str, issuer: str, subject: str, matches: bool) -> None:
    assert PrincipalMatcher([pattern]).matches(_user(issuer, subject)) is matches


def test_anonymous_is_a_request_without_a_user() -> None:
    assert PrincipalMatcher(["anonymous"]).matches(None)
    assert not PrincipalMatcher(["anonymous"]).matches(_user(IDP, "alice"))
    assert not PrincipalMatcher(["*"]).matches(None)
    assert PrincipalMatcher(["anonymous", f"{IDP}/alice"]).patterns == (f"{IDP}/alice",)
