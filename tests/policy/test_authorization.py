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
