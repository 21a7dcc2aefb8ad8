"""`inbound.end_users`, rule conditions on end users and `outbound.forward_user` in policy files:
what they accept, and errors that name file, line and field."""

from __future__ import annotations

import pytest

from mesh_middleware.errors import PolicyError
from mesh_middleware.identity.end_user import EndUser
from mesh_middleware.policy.claims import ClaimMatcher, parse_claim_path
from mesh_middleware.policy.compiled import compile_policy_text
from mesh_middleware.policy.loader import parse_policy

FULL = """\
service: orders
inbound:
  end_users:
    issuers:
      - issuer: https://idp.example.com
        audiences: [orders-api]
        algorithms: [RS256, ES256]
        clock_skew: 30s
      - issuer: testing@secure.istio.io
        jwks_uri: https://raw.example.com/jwks.json
        from_headers: [{name: x-jwt-assertion, prefix: ""}]
        from_cookies: [session]
    forwarded_from: [gateway]
  authorization:
    rules:
      - name: admins
        action: allow
        users: ["https://idp.example.com/*"]
        not_users: [https://idp.example.com/mallory]
        claims:
          groups: admin
          "[realm_access][roles]": [reader, writer]
        not_claims:
          request.auth.claims[banned]: ["true"]
outbound:
  forward_user:
    to: [inventory, "pay*"]
    claims: [email, groups]
"""


def _issues(text: str) -> list[str]:
    with pytest.raises(PolicyError) as caught:
        parse_policy(text, "p.yaml")
    return [str(issue) for issue in caught.value.issues]


def test_a_full_end_user_policy_compiles() -> None:
    """Every field loads; defaults are Istio's (Authorization: Bearer, 60 s skew)."""
    compiled = compile_policy_text(FULL)
    assert compiled.end_users is not None
    first, second = compiled.end_users.settings.issuers
    assert first.clock_skew == 30.0 and first.algorithms == ["RS256", "ES256"]
    assert [(h.name, h.prefix) for h in first.locations] == [("authorization", "Bearer ")]
    assert [(h.name, h.prefix) for h in second.locations] == [("x-jwt-assertion", "")]
    assert second.clock_skew == 60.0
    assert compiled.forwarded_from is not None and compiled.forwarded_from.matches("gateway")
    assert compiled.forward_user_to is not None and compiled.forward_user_to.matches("payments")
    assert compiled.forward_user_claims == ("email", "groups")
    alice = EndUser(
        issuer="https://idp.example.com",
        subject="alice",
        claims={"groups": ["admin"], "realm_access": {"roles": ["reader"]}},
        expires_at=2e9,
    )
    decision = compiled.authorizer.decide("web", "GET", "/", {}, alice)
    assert decision.allowed and decision.rule == "admins"
    banned = EndUser(
        issuer=alice.issuer,
        subject="alice",
        claims={**alice.claims, "banned": "true"},
        expires_at=2e9,
    )
    assert not compiled.authorizer.decide("web", "GET", "/", {}, banned).allowed
    # As in Istio, only string claims are matched: the boolean true is not the string "true".
    boolean = EndUser(
        issuer=alice.issuer, subject="bob", claims={**alice.claims, "banned": True}, expires_at=2e9
    )
    assert compiled.authorizer.decide("web", "GET", "/", {}, boolean).allowed
    assert not compiled.authorizer.decide("web", "GET", "/", {}, None).allowed


@pytest.mark.parametrize(
    ("issuer", "expected"),
    [
        (
            "{issuer: https://idp.example.com, jwks_uri: 'http://keys.example.com/jwks'}",
            "p.yaml:5: inbound.end_users.issuers[0].jwks_uri: "
            "'http://keys.example.com/jwks': keys are fetched over https",
        ),
        (
            "{issuer: testing@secure.istio.io}",
            "p.yaml:5: inbound.end_users.issuers[0]: without 'jwks_uri' or 'jwks'",
        ),
        (
            "{issuer: https://a.example, jwks_uri: 'https://a.example/k', jwks: '{\"keys\": []}'}",
            "p.yaml:5: inbound.end_users.issuers[0]: give 'jwks' or 'jwks_uri'",
        ),
        (
            "{issuer: https://a.example, algorithms: [HS256]}",
            "p.yaml:5: inbound.end_users.issuers[0].algorithms[0]: ",
        ),
        (
            "{issuer: https://a.example, algorithms: [none]}",
            "p.yaml:5: inbound.end_users.issuers[0].algorithms[0]: ",
        ),
        (
            "{issuer: https://a.example, clock_skew: 1h}",
            "p.yaml:5: inbound.end_users.issuers[0].clock_skew: clock skew is at",
        ),
        (
            "{issuer: https://a.example, jwks: 'not json'}",
            "p.yaml:5: inbound.end_users.issuers[0].jwks: 'jwks' is a JWKS",
        ),
        (
            "{issuer: https://a.example, from_cookies: ['a b']}",
            "p.yaml:5: inbound.end_users.issuers[0].from_cookies[0]: ",
        ),
    ],
)
def test_issuer_errors_name_line_and_field(issuer: str, expected: str) -> None:
    """Keys over plain http off loopback, no way to find keys, symmetric or `none` algorithms,
    a skew past 10 minutes, a bad inline JWKS, a bad cookie name: each a clear error."""
    text = f"service: a\ninbound:\n  end_users:\n    issuers:\n      - {issuer}\n"
    issues = _issues(text)
    assert any(issue.startswith(expected) for issue in issues), issues


def test_plain_http_keys_are_fine_on_loopback() -> None:
    """Discovery and JWKS over http are allowed on this machine only (tests, local providers)."""
    text = (
        "service: a\ninbound:\n  end_users:\n    issuers:\n"
        "      - {issuer: 'http://127.0.0.1:9000', jwks_uri: 'http://localhost:9000/jwks'}\n"
    )
    assert parse_policy(text, "p.yaml").policy.inbound.end_users is not None


def test_an_issuer_listed_twice_is_an_error() -> None:
    text = (
        "service: a\ninbound:\n  end_users:\n    issuers:\n"
        "      - {issuer: 'https://a.example'}\n      - {issuer: 'https://a.example'}\n"
    )
    (issue,) = _issues(text)
    assert "issuer 'https://a.example' is listed twice" in issue


@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        ("claims: {'[a]b': [x]}", "expected [claim] or [outer][inner]"),
        ("claims: {'a[b]': [x]}", "write a nested claim as [outer][inner]"),
        ("claims: {groups: []}", "at least 1 item"),
        ("claims: {groups: ['a*b']}", "'*' may only stand at the start or the end"),
        ("users: ['']", "empty pattern"),
    ],
)
def test_rule_condition_errors(condition: str, expected: str) -> None:
    text = (
        "service: a\ninbound:\n  end_users: {issuers: [{issuer: 'https://a.example'}]}\n"
        "  authorization:\n    rules:\n"
        f"      - {{name: r, action: allow, {condition}}}\n"
    )
    issues = _issues(text)
    assert any(issue.startswith("p.yaml:6: inbound.authorization.rules[0].") for issue in issues)
    assert any(expected in issue for issue in issues), issues


def test_user_conditions_without_end_users_are_an_error() -> None:
    """A rule on end users in a policy that reads no end-user tokens could never be meant."""
    text = (
        "service: a\ninbound:\n  authorization:\n    rules:\n"
        "      - {name: admins, action: allow, claims: {groups: admin}}\n"
    )
    (issue,) = _issues(text)
    assert "rule 'admins' has claims but the policy has no inbound.end_users" in issue


def test_users_anonymous_needs_no_end_users() -> None:
    """`users: [anonymous]` is meaningful anywhere: without end users every user is."""
    text = (
        "service: a\ninbound:\n  authorization:\n    rules:\n"
        "      - {name: anon, action: allow, users: [anonymous]}\n"
    )
    assert parse_policy(text, "p.yaml").policy.inbound.authorization.rules[0].users


def test_forward_user_claims_are_top_level() -> None:
    text = "service: a\noutbound:\n  forward_user: {claims: ['[a][b]']}\n"
    issues = _issues(text)
    assert any("name a top-level claim" in issue for issue in issues), issues


@pytest.mark.parametrize(
    ("key", "path"),
    [
        ("groups", ("groups",)),
        ("https://example.com/roles", ("https://example.com/roles",)),
        ("[groups]", ("groups",)),
        ("[realm_access][roles]", ("realm_access", "roles")),
        ("request.auth.claims[nested][key]", ("nested", "key")),
        ("request.auth.audiences", ("aud",)),
        ("request.auth.presenter", ("azp",)),
    ],
)
def test_claim_keys(key: str, path: tuple[str, ...]) -> None:
    """Plain names (dots and slashes included: URL claims), Istio's bracket form, and Istio's
    attributes that are claims."""
    assert parse_claim_path(key) == path


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        ("request.auth.principal", "matched by `users` / `not_users`"),
        ("request.auth.claims.groups", "not a claim"),
        ("request.auth.claims", "not a claim"),
        ("request.headers[x-user]", "not a claim"),
    ],
)
def test_other_istio_attributes_are_policy_errors(key: str, problem: str) -> None:
    """Pasted from an Istio policy, they would otherwise be claims no token has: rules that
    silently never hold."""
    text = (
        "service: a\ninbound:\n  end_users:\n    issuers: [{issuer: 'https://idp.example'}]\n"
        "  authorization:\n    rules:\n"
        f"      - {{name: r, action: allow, claims: {{'{key}': [x]}}}}\n"
    )
    issues = _issues(text)
    assert any(problem in issue and ":7:" in issue for issue in issues), issues


@pytest.mark.parametrize(
    ("value", "values", "not_values"),
    [
        ("admin", True, False),
        (["ops", "admin"], True, False),
        (["ops"], False, True),
        ([], False, True),
        (None, False, True),
        ({"admin": 1}, False, True),
        (True, False, True),
        (["admin", {"x": 1}], True, False),
    ],
)
def test_claim_matching(value: object, values: bool, not_values: bool) -> None:
    """A list matches if any element does; objects never match; absent holds not_values."""
    claims = {} if value is None else {"groups": value}
    assert ClaimMatcher("groups", ["admin"]).holds(claims) is values
    assert ClaimMatcher("groups", ["admin"], negate=True).holds(claims) is not_values
    assert ClaimMatcher("groups", ["admin"]).holds(None) is False
    assert ClaimMatcher("groups", ["admin"], negate=True).holds(None) is True


def test_only_string_claims_match_as_in_istio() -> None:
    """Istio matches string and list-of-string claims only: a number or boolean never holds
    `values` and always holds `not_values`; a list's other elements are passed over."""
    assert not ClaimMatcher("verified", ["true"]).holds({"verified": True})
    assert ClaimMatcher("verified", ["true"], negate=True).holds({"verified": True})
    assert not ClaimMatcher("level", ["3"]).holds({"level": 3})
    assert ClaimMatcher("level", ["0"], negate=True).holds({"level": 0})
    assert ClaimMatcher("level", ["3"]).holds({"level": "3"})
    assert ClaimMatcher("groups", ["3"]).holds({"groups": [3, "3"]})
    assert not ClaimMatcher("groups", ["3"]).holds({"groups": [3, True, None]})


@pytest.mark.parametrize("audience", [[{"orders-api": 1}], {"orders-api": 1}, [7, "orders-api"], 7])
def test_explain_refuses_an_audience_that_is_not_strings_as_the_verifier_does(
    audience: object,
) -> None:
    """401 with a reason, as a real token with that `aud` gets (never a traceback)."""
    from mesh_middleware.policy.explain import explain

    result = explain(
        compile_policy_text(FULL),
        caller="web",
        method="GET",
        path="/",
        user="https://idp.example.com/alice",
        claims={"aud": audience},
    )
    assert result["status"] == 401
    assert "audience (aud) is not a string" in result["reason"]


def test_explain_splits_a_principal_after_a_known_issuer() -> None:
    """A subject may hold "/": the principal is split after the policy's issuer."""
    from mesh_middleware.policy.explain import split_principal

    issuers = ["https://idp.example.com", "https://idp.example.com/tenant2"]
    assert split_principal("https://idp.example.com/team/alice", issuers) == (
        "https://idp.example.com",
        "team/alice",
    )
    assert split_principal("https://idp.example.com/tenant2/bob", issuers) == (
        "https://idp.example.com/tenant2",
        "bob",
    )
    assert split_principal("https://other.example/team/alice", issuers) == (
        "https://other.example/team",
        "alice",
    )
