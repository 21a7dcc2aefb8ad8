"""The authorizer's per-(caller, method, path) plans never change a decision."""

from __future__ import annotations

import itertools

from mesh_middleware.policy.compiled import compile_policy_text

POLICY = """\
service: inventory
inbound:
  authorization:
    rules:
      - {name: deny-blocked, action: deny, paths: [/items/*],
         headers: {x-tenant: {values: [blocked]}}}
      - {name: deny-admin, action: deny, paths: [/admin/*]}
      - {name: tenant-read, action: allow, methods: [GET], headers: {x-tenant: {values: [acme]}}}
      - {name: orders-any, action: allow, from: [orders]}
      - {name: probe, action: allow, paths: [/healthz], headers: {x-probe: {present: true}}}
"""


def test_cached_plans_agree_with_fresh_evaluation() -> None:
    """Every request, asked twice with varying headers, matches the uncached decision."""
    authorizer = compile_policy_text(POLICY).authorizer
    callers = [None, "orders", "gateway"]
    methods = ["GET", "POST"]
    paths = ["/items/1", "/admin/x", "/healthz", "/other"]
    header_sets = [{}, {"x-tenant": "blocked"}, {"x-tenant": "acme"}, {"x-probe": "1"}]
    for _ in range(2):
        for caller, method, path, headers in itertools.product(
            callers, methods, paths, header_sets
        ):
            cached = authorizer.decide(caller, method, path, headers)
            fresh = authorizer.decide_uncached(caller, method, path, headers)
            assert cached == fresh, (caller, method, path, headers)


def test_header_conditions_are_evaluated_per_request() -> None:
    """The same caller, method and path gets different answers for different headers."""
    authorizer = compile_policy_text(POLICY).authorizer
    assert authorizer.decide("orders", "GET", "/items/1", {}).rule == "orders-any"
    assert (
        authorizer.decide("orders", "GET", "/items/1", {"x-tenant": "blocked"}).rule
        == "deny-blocked"
    )
    assert (
        authorizer.decide("gateway", "GET", "/items/1", {"x-tenant": "acme"}).rule == "tenant-read"
    )
    assert not authorizer.decide("gateway", "GET", "/items/1", {}).allowed


def test_the_plan_cache_is_bounded() -> None:
    """Many distinct paths never grow the cache past its size."""
    authorizer = compile_policy_text(POLICY).authorizer
    for n in range(10_000):
        authorizer.decide("orders", "GET", f"/items/{n}", {})
    assert len(authorizer._plans) <= 4096


AUDITED_RULE = """\
service: orders
inbound:
  authorization:
    rules:
      - {name: no-anonymous-writes, action: deny, mode: audit, from: [anonymous],
         methods: [POST]}
      - {name: no-admin, action: deny, paths: [/admin/*]}
      - {name: gateway-orders, action: allow, from: [gateway, anonymous], paths: [/orders*]}
"""


def test_a_deny_rule_in_audit_mode_notes_what_it_would_deny_and_decides_nothing() -> None:
    authorizer = compile_policy_text(AUDITED_RULE).authorizer
    noted = authorizer.decide(None, "POST", "/orders", {})
    assert noted.allowed and noted.audit and noted.rule == "no-anonymous-writes"
    assert "would deny" in noted.reason
    assert noted.labels[2:] == ("deny", "audit")
    # The other rules still decide: what they deny stays denied, with their rule named.
    assert authorizer.decide(None, "POST", "/admin/x", {}).rule == "no-admin"
    assert not authorizer.decide(None, "POST", "/admin/x", {}).allowed
    elsewhere = authorizer.decide(None, "POST", "/other", {})
    assert not elsewhere.allowed and elsewhere.rule is None  # denied by default, not let through
    plain = authorizer.decide("gateway", "POST", "/orders", {})
    assert plain.allowed and not plain.audit and plain.rule == "gateway-orders"
    for caller, method, path in itertools.product(
        [None, "gateway", "orders"], ["GET", "POST"], ["/orders", "/admin/x", "/other"]
    ):
        cached = authorizer.decide(caller, method, path, {})
        assert cached == authorizer.decide_uncached(caller, method, path, {})
        # The same policy with the audited rule matching nobody decides the same way.
        without = compile_policy_text(
            AUDITED_RULE.replace("mode: audit, from: [anonymous]", "from: [nobody]")
        ).authorizer.decide(caller, method, path, {})
        assert cached.allowed == without.allowed, (caller, method, path)


def test_mode_is_for_deny_rules_only() -> None:
    import pytest

    from mesh_middleware.errors import PolicyError

    text = AUDITED_RULE.replace("action: allow, from", "action: allow, mode: audit, from")
    with pytest.raises(PolicyError, match="deny rules only") as caught:
        compile_policy_text(text, "p.yaml")
    assert "p.yaml:8: inbound.authorization.rules[2]" in str(caught.value)
