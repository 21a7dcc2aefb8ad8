"""End-user (JWT) authentication and authorization cases derived from Istio, run through explain.

Istio splits the job in two: a ``RequestAuthentication`` says which issuers' tokens a workload
accepts (an invalid token is 401, a request without one goes on without a request principal),
and an ``AuthorizationPolicy`` decides on ``requestPrincipals`` (``<iss>/<sub>``) and on
``when: request.auth.claims[...]`` conditions. Here the first is ``inbound.end_users`` and the
second the existing rules with ``users``, ``not_users``, ``claims`` and ``not_claims``.

Each case is one request and the decision ``mesh policy explain --json`` must print for it.
The same cases run against a real app with real tokens from a real OpenID Connect provider in
``tests/e2e/test_end_user_app.py``; a few describe a token explain cannot express (garbage,
a wrong signature, expired, sent where the policy does not look) and run only there.

Sources (cited per case group below as [tag]):

[authz-jwt]     istio.io docs/tasks/security/authorization/authz-jwt ("JWT Token" task):
                RequestAuthentication for ``testing@secure.istio.io``, invalid token 401, no
                token 200 without a policy, ``require-jwt`` with the principal
                ``testing@secure.istio.io/testing@secure.istio.io`` (no token → 403), then
                ``when: request.auth.claims[groups]`` ``["group1"]`` on a list-typed claim.
[authn-policy]  istio.io docs/tasks/security/authentication/authn-policy ("End-user
                authentication", "Require a valid token", "Require valid tokens per-path",
                expiring token → 401, end-user auth together with mutual TLS).
[ra-ref]        istio.io docs/reference/config/security/request_authentication
                (RequestAuthentication: invalid credentials rejected, none accepted without
                identity; examples: ``requestPrincipals: ["*"]``, ``issuer-foo``/``issuer-bar`` with
                ``issuer-foo/*``, "all paths except /healthz"; JWTRule: ``issuer`` (a JWT with
                another iss is rejected), ``audiences`` (any of them accepted), ``jwksUri``,
                ``jwks``, OIDC discovery without them, ``fromHeaders``/``JWTHeader.prefix``,
                ``fromCookies``; default location ``Authorization: Bearer``).
[ap-ref]        istio.io docs/reference/config/security/authorization-policy (Source:
                ``requestPrincipals``/``notRequestPrincipals`` in ``<ISS>/<SUB>`` form, every field
                of a source must hold; Rule.when Condition ``values``/``notValues``; exact, prefix,
                suffix and presence matching; the ``request.auth.claims[iss]`` example).
[conditions]    istio.io docs/reference/config/security/conditions (``request.auth.principal``,
                ``request.auth.audiences``, ``request.auth.presenter``, ``request.auth.claims``).
[examples]      istio.io docs/ops/configuration/security/security-policy-examples ("Require
                mandatory authorization check with DENY policy": ``notRequestPrincipals: ["*"]``;
                per-host issuers with ``requestPrincipals: ["*@example.com"]``).
[generator]     istio/istio pilot/pkg/security/authz/model/generator.go: a request principal is
                split at its last ``/`` (issuers may be URLs); claims are matched as a string or
                as a list whose any element matches; nested claims ``[a][b]`` (release note 21340
                "AuthorizationPolicy now supports nested JWT claims"); ``request.auth.audiences``
                reads claim ``aud``, ``request.auth.presenter`` claim ``azp``.
                ``requestPrincipalGenerator``: the issuer and the subject are matched each on
                its own (``iss/*`` is exactly that issuer, any subject; ``*/sub`` any issuer,
                exactly that subject), so no issuer can pass for a user of another.
[claim-types]   [conditions] on ``request.auth.claims``: "Note only support claim of type
                string or list of string" (a boolean or number claim never matches ``values``,
                so ``notValues`` holds for it).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from mesh_middleware.cli import main

# The issuers. TESTING is Istio's own test issuer; SHOP is a URL with a path, so the principal
# ``{SHOP}/alice`` has slashes in its issuer part ([generator]: split at the last ``/``).
TESTING = "testing@secure.istio.io"
SHOP = "https://accounts.example.com/realms/shop"

# Placeholders in the policies (and in case users), filled in by each test module:
# explain gets dummy values; the app test gets the running providers' real ones.
JWKS_URI_TESTING = "JWKS_URI_TESTING"  # the TESTING provider's JWKS URL
JWKS_URI_SHOP = "JWKS_URI_SHOP"  # the SHOP provider's JWKS URL
JWKS_INLINE_SHOP = "JWKS_INLINE_SHOP"  # the SHOP provider's JWKS document, inline JSON
ISSUER_DISCOVERY = "ISSUER_DISCOVERY"  # the URL of a provider found by OIDC discovery
PLACEHOLDERS = (JWKS_URI_TESTING, JWKS_URI_SHOP, JWKS_INLINE_SHOP, ISSUER_DISCOVERY)

_TESTING_ISSUER = f"""\
      - issuer: "{TESTING}"
        jwks_uri: "{JWKS_URI_TESTING}"
"""
_SHOP_ISSUER = f"""\
      - issuer: "{SHOP}"
        jwks_uri: "{JWKS_URI_SHOP}"
"""

POLICIES: dict[str, str] = {
    # [authz-jwt] steps 1-3 and [ra-ref]: a RequestAuthentication alone. Invalid tokens are
    # refused, requests without a token are accepted (no authorization policy).
    "jwt-only": f"""\
service: httpbin
inbound:
  authentication: permissive
  end_users:
    issuers:
{_TESTING_ISSUER}""",
    # [authz-jwt] "require-jwt": one exact request principal.
    "require-jwt": f"""\
service: httpbin
inbound:
  authentication: permissive
  end_users:
    issuers:
{_TESTING_ISSUER}  authorization:
    rules:
      - name: require-jwt
        action: allow
        users: ["{TESTING}/{TESTING}"]
""",
    # [authz-jwt] "require-jwt" updated with `when: request.auth.claims[groups]: ["group1"]`.
    "require-group": f"""\
service: httpbin
inbound:
  authentication: permissive
  end_users:
    issuers:
{_TESTING_ISSUER}  authorization:
    rules:
      - name: require-group1
        action: allow
        users: ["{TESTING}/{TESTING}"]
        claims:
          groups: [group1]
""",
    # [authn-policy] "Require valid tokens per-path": DENY notRequestPrincipals ["*"] on
    # /headers only; no ALLOW policy, so everything else is allowed.
    "per-path": f"""\
service: ingress
inbound:
  authentication: permissive
  end_users:
    issuers:
{_TESTING_ISSUER}  authorization:
    rules:
      - name: require-jwt-headers
        action: deny
        not_users: ["*"]
        paths: [/headers]
""",
    # [examples] "Require mandatory authorization check with DENY policy": a DENY on
    # notRequestPrincipals ["*"] cannot be bypassed by a more permissive ALLOW.
    "mandatory": f"""\
service: frontdoor
inbound:
  authentication: permissive
  end_users:
    issuers:
{_TESTING_ISSUER}  authorization:
    rules:
      - name: allow-everything
        action: allow
      - name: require-jwt
        action: deny
        not_users: ["*"]
""",
    # [ra-ref] issuer-foo / issuer-bar, each allowed on its own part (hosts there, paths
    # here) with `issuer/*`; "require JWT on all paths except /healthz"; [ap-ref]'s
    # `when: request.auth.claims[iss]` example; notRequestPrincipals with a prefix pattern.
    "multi-issuer": f"""\
service: bookstore
inbound:
  authentication: permissive
  end_users:
    issuers:
{_TESTING_ISSUER}{_SHOP_ISSUER}  authorization:
    rules:
      - name: testing-users
        action: allow
        users: ["{TESTING}/*"]
        paths: ["/foo/*"]
      - name: shop-users
        action: allow
        users: ["{SHOP}/*"]
        paths: ["/bar/*"]
      - name: healthz
        action: allow
        paths: [/healthz]
      - name: shop-issuer-claim
        action: allow
        methods: [GET]
        paths: ["/info*"]
        claims:
          iss: ["{SHOP}"]
      - name: only-shop-users-on-orders
        action: deny
        paths: ["/orders/*"]
        not_users: ["{SHOP}/*"]
      - name: orders-open
        action: allow
        paths: ["/orders/*"]
""",
    # [ra-ref] JWTRule.audiences (bookstore_android / bookstore_web: a JWT containing any of
    # them is accepted); [conditions] request.auth.audiences (claim aud) and
    # request.auth.presenter (claim azp), with notValues.
    "audiences": f"""\
service: bookstore
inbound:
  authentication: permissive
  end_users:
    issuers:
      - issuer: "{TESTING}"
        jwks_uri: "{JWKS_URI_TESTING}"
        audiences:
          - bookstore_android.apps.example.com
          - bookstore_web.apps.example.com
  authorization:
    rules:
      - name: web-only-admin
        action: deny
        paths: ["/admin/*"]
        not_claims:
          aud: [bookstore_web.apps.example.com]
      - name: android-presenter
        action: allow
        paths: ["/mobile/*"]
        claims:
          azp: ["*.android.example.com"]
      - name: any-user
        action: allow
        users: ["*"]
        not_paths: ["/mobile/*"]
""",
    # [conditions]/[ap-ref]/[generator]: claim conditions: nested claims in both bracket
    # spellings, prefix and suffix patterns, list claims, AND across claims, notValues.
    "claims": f"""\
service: orders
inbound:
  authentication: permissive
  end_users:
    issuers:
{_SHOP_ISSUER}  authorization:
    rules:
      - name: deny-suspended
        action: deny
        claims:
          "[status]": [suspended]
      - name: readers
        action: allow
        methods: [GET]
        paths: ["/orders/*"]
        claims:
          "[realm_access][roles]": [reader, "admin-*"]
      - name: writers
        action: allow
        methods: [POST]
        paths: ["/orders/*"]
        claims:
          "request.auth.claims[realm_access][roles]": [writer]
          azp: [orders-web]
      - name: staff-email
        action: allow
        paths: ["/staff/*"]
        claims:
          email: ["*@example.com"]
      - name: reports-not-contractors
        action: allow
        paths: ["/reports/*"]
        users: ["*"]
        not_claims:
          employment: [contractor]
""",
    # [ap-ref] Source: principals and requestPrincipals in one source must both hold;
    # [examples] ingress-gateway exception; requestPrincipals suffix pattern ("*-admin", like
    # "*@example.com") and notRequestPrincipals ["*"] for service-only callers.
    "services-and-users": f"""\
service: payments
inbound:
  authentication: permissive
  end_users:
    issuers:
{_TESTING_ISSUER}  authorization:
    rules:
      - name: deny-users-off-gateway
        action: deny
        users: ["*"]
        not_from: [gateway]
      - name: gateway-with-user
        action: allow
        from: [gateway]
        users: ["{TESTING}/*"]
        paths: ["/api/*"]
      - name: batch-without-user
        action: allow
        from: [batch]
        not_users: ["*"]
      - name: admins-by-suffix
        action: allow
        from: [gateway]
        users: ["*-admin"]
        methods: [DELETE]
""",
    # [authn-policy] "End-user authentication with mutual TLS": with peer authentication
    # strict, a plaintext (no mesh identity) request fails even with a valid end-user token.
    "strict": f"""\
service: reports
inbound:
  authentication: strict
  end_users:
    issuers:
{_TESTING_ISSUER}  authorization:
    rules:
      - name: frontend-users
        action: allow
        from: [frontend]
        users: ["{TESTING}/*"]
""",
    # [ra-ref] JWTRule.fromHeaders (JWTHeader name + prefix) and fromCookies: the token is
    # read there, and no longer from the default Authorization: Bearer.
    "locations": f"""\
service: httpbin
inbound:
  authentication: permissive
  end_users:
    issuers:
      - issuer: "{TESTING}"
        jwks_uri: "{JWKS_URI_TESTING}"
        from_headers:
          - {{name: x-jwt-assertion, prefix: ""}}
          - {{name: x-forwarded-authorization, prefix: "Bearer "}}
        from_cookies: [session]
  authorization:
    rules:
      - name: require-user
        action: allow
        users: ["*"]
""",
    # [ra-ref] "a request that does not contain any authentication credentials will be
    # accepted": without a RequestAuthentication, tokens are not validated at all.
    "no-end-users": """\
service: legacy
inbound:
  authentication: permissive
  authorization:
    rules:
      - name: open
        action: allow
        paths: ["/public/*"]
""",
    # [ra-ref] JWTRule.jwks: the key set inline instead of jwksUri.
    "inline-jwks": f"""\
service: catalog
inbound:
  authentication: permissive
  end_users:
    issuers:
      - issuer: "{SHOP}"
        jwks: '{JWKS_INLINE_SHOP}'
  authorization:
    rules:
      - name: shop-users
        action: allow
        users: ["{SHOP}/*"]
""",
    # [ra-ref] JWTRule.jwksUri is optional when the key set can be found by OpenID Connect
    # discovery of the issuer ({issuer}/.well-known/openid-configuration).
    "discovery": f"""\
service: profile
inbound:
  authentication: permissive
  end_users:
    issuers:
      - issuer: "{ISSUER_DISCOVERY}"
{_TESTING_ISSUER}  authorization:
    rules:
      - name: discovered-users
        action: allow
        users: ["{ISSUER_DISCOVERY}/*"]
""",
    # [generator] issuer and subject matched apart; [claim-types] strings only.
    "principal-parts": f"""\
service: tenants
inbound:
  authentication: permissive
  end_users:
    issuers:
{_TESTING_ISSUER}{_SHOP_ISSUER}  authorization:
    rules:
      - name: realms-issuer
        action: allow
        paths: ["/realms/*"]
        users: ["https://accounts.example.com/realms/*"]
      - name: team-alice
        action: allow
        paths: ["/team/*"]
        users: ["{SHOP}/team/alice"]
      - name: shop-any
        action: allow
        paths: ["/shop/*"]
        users: ["{SHOP}/*"]
      - name: alice-anywhere
        action: allow
        paths: ["/alice/*"]
        users: ["*/alice"]
      - name: verified-email
        action: allow
        paths: ["/verified/*"]
        claims:
          email_verified: ["true"]
      - name: level-five
        action: allow
        paths: ["/level/*"]
        claims:
          level: ["5"]
      - name: not-level-zero
        action: allow
        paths: ["/zero/*"]
        users: ["*"]
        not_claims:
          level: ["0"]
""",
}


# Token kinds a case may send (only "valid" can be expressed to explain).
VALID = "valid"
GARBAGE = "garbage"  # not a JWT at all ("invalidToken")
BAD_SIGNATURE = "bad-signature"  # the issuer's name, signed by a key not in its JWKS
TAMPERED = "tampered"  # a valid token whose payload was edited after signing
EXPIRED = "expired"  # exp 10 minutes ago
NOT_YET_VALID = "not-yet-valid"  # nbf 10 minutes ahead
TOKEN_KINDS = (VALID, GARBAGE, BAD_SIGNATURE, TAMPERED, EXPIRED, NOT_YET_VALID)


@dataclass(frozen=True)
class Case:
    """One request, the end-user token it carries, and the decision it must get.

    ``user`` is the token's ``iss/sub`` (None: no token); ``claims`` are its other claims
    (``aud`` included); ``claim_args`` spell them for explain when the automatic spelling (one
    ``--claim K=JSON`` per top-level claim) is not the point of the case. ``send`` is where
    the token travels: ``bearer`` (Authorization: Bearer), ``header:NAME[:PREFIX]``,
    ``cookie:NAME`` (the only cookie) or ``cookies:NAME`` (among other cookies). ``explain``
    is ``same`` (explain sees the token; for a policy without ``end_users`` it must ignore
    it), ``anonymous`` (the token is expected to be ignored, so explain runs without
    ``--user``) or ``skip`` (explain cannot express this token: app test only).
    """

    id: str
    policy: str
    caller: str
    method: str
    path: str
    decision: str
    status: int
    rule: str | None
    user: str | None = None
    claims: Mapping[str, Any] = field(default_factory=dict)
    claim_args: tuple[str, ...] | None = None
    token: str = VALID
    send: str = "bearer"
    explain: str = "same"


def _c(
    case_id: str,
    policy: str,
    caller: str,
    method: str,
    path: str,
    expect: tuple[str, int, str | None],
    *,
    user: str | None = None,
    claims: Mapping[str, Any] | None = None,
    claim_args: tuple[str, ...] | None = None,
    token: str = VALID,
    send: str = "bearer",
    explain: str = "same",
) -> Case:
    decision, status, rule = expect
    return Case(
        case_id,
        policy,
        caller,
        method,
        path,
        decision,
        status,
        rule,
        user,
        dict(claims or {}),
        claim_args,
        token,
        send,
        explain,
    )


def allow(rule: str | None = None) -> tuple[str, int, str | None]:
    """Expected outcome: allowed (200), by ``rule`` or by default."""
    return ("allow", 200, rule)


def deny(rule: str | None = None) -> tuple[str, int, str | None]:
    """Expected outcome: forbidden (403), by ``rule`` or by default."""
    return ("deny", 403, rule)


UNAUTHENTICATED = ("deny", 401, None)

# Istio's demo.jwt principal: iss and sub both testing@secure.istio.io ([authz-jwt]).
DEMO = f"{TESTING}/{TESTING}"
ALICE = f"{TESTING}/alice"
SHOP_ALICE = f"{SHOP}/alice"
# The two audiences of the JWTRule example ([ra-ref]).
ANDROID = "bookstore_android.apps.example.com"
WEB = "bookstore_web.apps.example.com"

CASES: list[Case] = [
    # --- jwt-only: [authz-jwt] steps 1-3, [ra-ref] RequestAuthentication semantics ---
    # "a request without a JWT is allowed because there is no authorization policy"
    _c("jwt-only-no-token-allowed", "jwt-only", "anonymous", "GET", "/headers", allow()),
    _c(
        "jwt-only-valid-token-allowed",
        "jwt-only",
        "anonymous",
        "GET",
        "/headers",
        allow(),
        user=DEMO,
    ),
    # A mesh service calling with a valid end-user token: both identities, no rules.
    _c("jwt-only-service-and-user", "jwt-only", "sleep", "GET", "/headers", allow(), user=ALICE),
    # "Authorization: Bearer invalidToken" → 401 ([authz-jwt] step 2).
    _c(
        "jwt-only-invalid-token-401",
        "jwt-only",
        "anonymous",
        "GET",
        "/headers",
        UNAUTHENTICATED,
        user=DEMO,
        token=GARBAGE,
        explain="skip",
    ),
    # Signed with a key that is not in the issuer's JWKS: invalid ([ra-ref] jwksUri is the key
    # set used to validate the signature).
    _c(
        "jwt-only-bad-signature-401",
        "jwt-only",
        "anonymous",
        "GET",
        "/headers",
        UNAUTHENTICATED,
        user=DEMO,
        token=BAD_SIGNATURE,
        explain="skip",
    ),
    # [authn-policy]: a token that expired is rejected with 401.
    _c(
        "jwt-only-expired-401",
        "jwt-only",
        "anonymous",
        "GET",
        "/headers",
        UNAUTHENTICATED,
        user=DEMO,
        token=EXPIRED,
        explain="skip",
    ),
    # [ra-ref] JWTRule.issuer: "A JWT with different iss claim will be rejected".
    _c(
        "jwt-only-unknown-issuer-401",
        "jwt-only",
        "anonymous",
        "GET",
        "/headers",
        UNAUTHENTICATED,
        user=SHOP_ALICE,
    ),
    # The issuer must match exactly: another spelling is another issuer.
    _c(
        "jwt-only-issuer-case-sensitive-401",
        "jwt-only",
        "anonymous",
        "GET",
        "/headers",
        UNAUTHENTICATED,
        user="TESTING@secure.istio.io/alice",
    ),
    # [ra-ref] JWTRule.audiences: when empty, the token's aud is not checked.
    _c(
        "jwt-only-any-audience-without-audiences",
        "jwt-only",
        "anonymous",
        "GET",
        "/headers",
        allow(),
        user=ALICE,
        claims={"aud": "some-other-api"},
    ),
    # The payload was changed after signing (sub alice → the demo subject): the signature no
    # longer verifies, so the token is invalid, not another user.
    _c(
        "jwt-only-tampered-payload-401",
        "jwt-only",
        "anonymous",
        "GET",
        "/headers",
        UNAUTHENTICATED,
        user=DEMO,
        token=TAMPERED,
        explain="skip",
    ),
    # Envoy's jwt_authn filter (what RequestAuthentication configures) checks the time
    # restrictions, nbf as well as exp.
    _c(
        "jwt-only-not-yet-valid-401",
        "jwt-only",
        "anonymous",
        "GET",
        "/headers",
        UNAUTHENTICATED,
        user=DEMO,
        token=NOT_YET_VALID,
        explain="skip",
    ),
    _c(
        "jwt-only-unknown-issuer-401-for-services-too",
        "jwt-only",
        "sleep",
        "GET",
        "/headers",
        UNAUTHENTICATED,
        user=f"{SHOP}/{TESTING}",
    ),
    # --- require-jwt: [authz-jwt] steps 4-7 ---
    _c(
        "require-jwt-valid-principal",
        "require-jwt",
        "anonymous",
        "GET",
        "/headers",
        allow("require-jwt"),
        user=DEMO,
    ),
    # "Verify that a request without a JWT is denied" → 403.
    _c("require-jwt-no-token-403", "require-jwt", "anonymous", "GET", "/headers", deny()),
    # A service identity is not a request principal ([ap-ref] principals vs requestPrincipals).
    _c("require-jwt-service-only-403", "require-jwt", "sleep", "GET", "/headers", deny()),
    _c(
        "require-jwt-other-subject-403",
        "require-jwt",
        "anonymous",
        "GET",
        "/headers",
        deny(),
        user=ALICE,
    ),
    # Exact match: a longer subject is another principal ([ap-ref] exact match).
    _c(
        "require-jwt-exact-not-prefix",
        "require-jwt",
        "anonymous",
        "GET",
        "/headers",
        deny(),
        user=f"{DEMO}.evil",
    ),
    _c(
        "require-jwt-invalid-token-401",
        "require-jwt",
        "anonymous",
        "GET",
        "/headers",
        UNAUTHENTICATED,
        user=DEMO,
        token=GARBAGE,
        explain="skip",
    ),
    # The same subject from an issuer the RequestAuthentication does not list: 401, not 403.
    _c(
        "require-jwt-same-sub-unknown-issuer-401",
        "require-jwt",
        "anonymous",
        "GET",
        "/headers",
        UNAUTHENTICATED,
        user=f"{SHOP}/{TESTING}",
    ),
    # --- require-group: [authz-jwt] steps 8-11, list-typed `groups` claim ---
    # groups-scope.jwt: groups ["group1", "group2"], scope ["scope1", "scope2"] → 200.
    _c(
        "group-list-contains-group1",
        "require-group",
        "anonymous",
        "GET",
        "/headers",
        allow("require-group1"),
        user=DEMO,
        claims={"groups": ["group1", "group2"], "scope": ["scope1", "scope2"]},
    ),
    # The same list built by repeating --claim (explain's spelling of a list claim).
    _c(
        "group-list-by-repeated-claim",
        "require-group",
        "anonymous",
        "GET",
        "/headers",
        allow("require-group1"),
        user=DEMO,
        claims={"groups": ["group2", "group1"]},
        claim_args=("groups=group2", "groups=group1"),
    ),
    # "supports both string typed and list-of-string typed JWT claims".
    _c(
        "group-string-claim",
        "require-group",
        "anonymous",
        "GET",
        "/headers",
        allow("require-group1"),
        user=DEMO,
        claims={"groups": "group1"},
    ),
    # demo.jwt has no groups claim → 403 ([authz-jwt] last step).
    _c(
        "group-claim-missing-403",
        "require-group",
        "anonymous",
        "GET",
        "/headers",
        deny(),
        user=DEMO,
    ),
    _c(
        "group-list-without-group1-403",
        "require-group",
        "anonymous",
        "GET",
        "/headers",
        deny(),
        user=DEMO,
        claims={"groups": ["group2", "group3"]},
    ),
    # Exact value match: neither a longer value nor another case matches.
    _c(
        "group-value-exact-not-prefix",
        "require-group",
        "anonymous",
        "GET",
        "/headers",
        deny(),
        user=DEMO,
        claims={"groups": ["group10"]},
    ),
    _c(
        "group-value-case-sensitive",
        "require-group",
        "anonymous",
        "GET",
        "/headers",
        deny(),
        user=DEMO,
        claims={"groups": ["Group1"]},
    ),
    # requestPrincipals and when must both hold ([ap-ref] Rule: from AND when).
    _c(
        "group-right-other-principal-403",
        "require-group",
        "anonymous",
        "GET",
        "/headers",
        deny(),
        user=ALICE,
        claims={"groups": ["group1"]},
    ),
    _c("group-no-token-403", "require-group", "anonymous", "GET", "/headers", deny()),
    # --- per-path: [authn-policy] "Require valid tokens per-path" ---
    _c(
        "per-path-no-token-denied",
        "per-path",
        "anonymous",
        "GET",
        "/headers",
        deny("require-jwt-headers"),
    ),
    _c("per-path-no-token-other-path", "per-path", "anonymous", "GET", "/ip", allow()),
    _c("per-path-valid-token", "per-path", "anonymous", "GET", "/headers", allow(), user=DEMO),
    # A service identity does not satisfy notRequestPrincipals ["*"].
    _c(
        "per-path-service-without-user-denied",
        "per-path",
        "sleep",
        "GET",
        "/headers",
        deny("require-jwt-headers"),
    ),
    # An invalid token is refused even on a path no rule protects ([ra-ref]).
    _c(
        "per-path-invalid-token-other-path-401",
        "per-path",
        "anonymous",
        "GET",
        "/ip",
        UNAUTHENTICATED,
        user=DEMO,
        token=GARBAGE,
        explain="skip",
    ),
    _c(
        "per-path-unknown-issuer-other-path-401",
        "per-path",
        "anonymous",
        "GET",
        "/ip",
        UNAUTHENTICATED,
        user=SHOP_ALICE,
    ),
    # --- mandatory: [examples] DENY notRequestPrincipals ["*"] beats any ALLOW ---
    _c(
        "mandatory-deny-beats-allow",
        "mandatory",
        "anonymous",
        "GET",
        "/anything",
        deny("require-jwt"),
    ),
    _c(
        "mandatory-deny-beats-allow-for-services",
        "mandatory",
        "sleep",
        "POST",
        "/anything",
        deny("require-jwt"),
    ),
    _c(
        "mandatory-user-allowed",
        "mandatory",
        "anonymous",
        "GET",
        "/anything",
        allow("allow-everything"),
        user=ALICE,
    ),
    # --- multi-issuer: [ra-ref] issuer-foo/issuer-bar with `issuer/*` per part ---
    _c(
        "multi-first-issuer-own-part",
        "multi-issuer",
        "anonymous",
        "GET",
        "/foo/1",
        allow("testing-users"),
        user=ALICE,
    ),
    _c(
        "multi-first-issuer-other-part",
        "multi-issuer",
        "anonymous",
        "GET",
        "/bar/1",
        deny(),
        user=ALICE,
    ),
    # A URL issuer with a path: the principal is split at its last '/' ([generator]).
    _c(
        "multi-url-issuer-own-part",
        "multi-issuer",
        "anonymous",
        "GET",
        "/bar/1",
        allow("shop-users"),
        user=SHOP_ALICE,
    ),
    _c(
        "multi-url-issuer-other-part",
        "multi-issuer",
        "anonymous",
        "GET",
        "/foo/1",
        deny(),
        user=SHOP_ALICE,
    ),
    # "require JWT on all paths, except /healthz".
    _c(
        "multi-healthz-without-token",
        "multi-issuer",
        "anonymous",
        "GET",
        "/healthz",
        allow("healthz"),
    ),
    _c("multi-no-token-denied", "multi-issuer", "anonymous", "GET", "/foo/1", deny()),
    # ...but an invalid token is refused on /healthz too ([ra-ref]).
    _c(
        "multi-healthz-bad-signature-401",
        "multi-issuer",
        "anonymous",
        "GET",
        "/healthz",
        UNAUTHENTICATED,
        user=DEMO,
        token=BAD_SIGNATURE,
        explain="skip",
    ),
    # [ap-ref] `when: request.auth.claims[iss]`: the iss claim is a claim like any other.
    _c(
        "multi-iss-claim-matches",
        "multi-issuer",
        "anonymous",
        "GET",
        "/info/1",
        allow("shop-issuer-claim"),
        user=SHOP_ALICE,
    ),
    # notRequestPrincipals with a prefix: only the shop's users on /orders, no one else.
    _c(
        "multi-not-users-prefix-spares-shop",
        "multi-issuer",
        "anonymous",
        "GET",
        "/orders/1",
        allow("orders-open"),
        user=SHOP_ALICE,
    ),
    _c(
        "multi-not-users-prefix-denies-other-issuer",
        "multi-issuer",
        "anonymous",
        "GET",
        "/orders/1",
        deny("only-shop-users-on-orders"),
        user=ALICE,
    ),
    _c(
        "multi-not-users-prefix-denies-anonymous",
        "multi-issuer",
        "anonymous",
        "GET",
        "/orders/1",
        deny("only-shop-users-on-orders"),
    ),
    _c(
        "multi-iss-claim-other-issuer",
        "multi-issuer",
        "anonymous",
        "GET",
        "/info/1",
        deny(),
        user=ALICE,
    ),
    # --- audiences: [ra-ref] JWTRule.audiences, [conditions] audiences/presenter ---
    _c(
        "aud-first-accepted",
        "audiences",
        "anonymous",
        "GET",
        "/books/1",
        allow("any-user"),
        user=ALICE,
        claims={"aud": ANDROID},
    ),
    _c(
        "aud-second-accepted",
        "audiences",
        "anonymous",
        "GET",
        "/books/1",
        allow("any-user"),
        user=ALICE,
        claims={"aud": WEB},
    ),
    # "A JWT containing any of these audiences will be accepted": aud may be a list.
    _c(
        "aud-list-any-accepted",
        "audiences",
        "anonymous",
        "GET",
        "/books/1",
        allow("any-user"),
        user=ALICE,
        claims={"aud": ["other.example.com", WEB]},
        claim_args=("aud=other.example.com", f"aud={WEB}"),
    ),
    _c(
        "aud-not-accepted-401",
        "audiences",
        "anonymous",
        "GET",
        "/books/1",
        UNAUTHENTICATED,
        user=ALICE,
        claims={"aud": "other.example.com"},
    ),
    _c(
        "aud-list-none-accepted-401",
        "audiences",
        "anonymous",
        "GET",
        "/books/1",
        UNAUTHENTICATED,
        user=ALICE,
        claims={"aud": ["a.example.com", "b.example.com"]},
    ),
    # A token without aud contains none of the audiences (explain takes a token without
    # --claim aud as valid for the policy, so this one runs against the app only).
    _c(
        "aud-missing-401",
        "audiences",
        "anonymous",
        "GET",
        "/books/1",
        UNAUTHENTICATED,
        user=ALICE,
        explain="skip",
    ),
    _c("aud-no-token-403", "audiences", "anonymous", "GET", "/books/1", deny()),
    # notValues also holds when there is no token at all (no aud claim).
    _c(
        "aud-admin-no-token-denied-by-rule",
        "audiences",
        "anonymous",
        "GET",
        "/admin/users",
        deny("web-only-admin"),
    ),
    # request.auth.audiences notValues: only the web audience may reach /admin.
    _c(
        "aud-android-denied-admin",
        "audiences",
        "anonymous",
        "GET",
        "/admin/users",
        deny("web-only-admin"),
        user=ALICE,
        claims={"aud": ANDROID},
    ),
    _c(
        "aud-web-reaches-admin",
        "audiences",
        "anonymous",
        "GET",
        "/admin/users",
        allow("any-user"),
        user=ALICE,
        claims={"aud": WEB},
    ),
    # request.auth.presenter (azp) with a suffix pattern.
    _c(
        "presenter-suffix-matches",
        "audiences",
        "anonymous",
        "GET",
        "/mobile/feed",
        allow("android-presenter"),
        user=ALICE,
        claims={"aud": ANDROID, "azp": "app1.android.example.com"},
    ),
    _c(
        "presenter-other-denied",
        "audiences",
        "anonymous",
        "GET",
        "/mobile/feed",
        deny(),
        user=ALICE,
        claims={"aud": ANDROID, "azp": "web.example.com"},
    ),
    _c(
        "presenter-missing-denied",
        "audiences",
        "anonymous",
        "GET",
        "/mobile/feed",
        deny(),
        user=ALICE,
        claims={"aud": ANDROID},
    ),
    # --- claims: [conditions]/[generator] nested, patterns, lists, notValues ---
    # Nested claim by the bracket form on the command line too.
    _c(
        "nested-claim-bracket-form",
        "claims",
        "anonymous",
        "GET",
        "/orders/1",
        allow("readers"),
        user=SHOP_ALICE,
        claims={"realm_access": {"roles": ["reader"]}},
        claim_args=('[realm_access][roles]=["reader"]',),
    ),
    _c(
        "nested-claim-json-object",
        "claims",
        "anonymous",
        "GET",
        "/orders/1",
        allow("readers"),
        user=SHOP_ALICE,
        claims={"realm_access": {"roles": ["offline_access", "reader"]}},
    ),
    # A prefix pattern against a list: any element may match.
    _c(
        "nested-claim-prefix-in-list",
        "claims",
        "anonymous",
        "GET",
        "/orders/1",
        allow("readers"),
        user=SHOP_ALICE,
        claims={"realm_access": {"roles": ["viewer", "admin-eu"]}},
    ),
    _c(
        "nested-claim-no-match",
        "claims",
        "anonymous",
        "GET",
        "/orders/1",
        deny(),
        user=SHOP_ALICE,
        claims={"realm_access": {"roles": ["viewer"]}},
    ),
    _c(
        "nested-claim-missing",
        "claims",
        "anonymous",
        "GET",
        "/orders/1",
        deny(),
        user=SHOP_ALICE,
    ),
    # The nested path names realm_access.roles, not a top-level roles claim.
    _c(
        "nested-claim-top-level-is-not-nested",
        "claims",
        "anonymous",
        "GET",
        "/orders/1",
        deny(),
        user=SHOP_ALICE,
        claims={"roles": ["reader"]},
    ),
    _c(
        "nested-claim-case-sensitive",
        "claims",
        "anonymous",
        "GET",
        "/orders/1",
        deny(),
        user=SHOP_ALICE,
        claims={"realm_access": {"roles": ["Reader"]}},
    ),
    # `request.auth.claims[realm_access][roles]` verbatim AND `azp` (presenter) both hold.
    _c(
        "istio-key-form-and-presenter",
        "claims",
        "anonymous",
        "POST",
        "/orders/1",
        allow("writers"),
        user=SHOP_ALICE,
        claims={"realm_access": {"roles": ["writer"]}, "azp": "orders-web"},
    ),
    _c(
        "claims-and-other-presenter",
        "claims",
        "anonymous",
        "POST",
        "/orders/1",
        deny(),
        user=SHOP_ALICE,
        claims={"realm_access": {"roles": ["writer"]}, "azp": "orders-cli"},
    ),
    _c(
        "claims-and-presenter-missing",
        "claims",
        "anonymous",
        "POST",
        "/orders/1",
        deny(),
        user=SHOP_ALICE,
        claims={"realm_access": {"roles": ["writer"]}},
    ),
    _c(
        "claims-reader-cannot-write",
        "claims",
        "anonymous",
        "POST",
        "/orders/1",
        deny(),
        user=SHOP_ALICE,
        claims={"realm_access": {"roles": ["reader"]}, "azp": "orders-web"},
    ),
    # A DENY on a claim comes before the ALLOW the other claims earn.
    _c(
        "deny-claim-beats-allow",
        "claims",
        "anonymous",
        "GET",
        "/orders/1",
        deny("deny-suspended"),
        user=SHOP_ALICE,
        claims={"realm_access": {"roles": ["reader"]}, "status": "suspended"},
    ),
    _c(
        "deny-claim-other-value",
        "claims",
        "anonymous",
        "GET",
        "/orders/1",
        allow("readers"),
        user=SHOP_ALICE,
        claims={"realm_access": {"roles": ["reader"]}, "status": "active"},
    ),
    # [conditions] `request.auth.claims[iss]` values ["*@foo.com"]: suffix patterns.
    _c(
        "claim-suffix-pattern",
        "claims",
        "anonymous",
        "GET",
        "/staff/roster",
        allow("staff-email"),
        user=SHOP_ALICE,
        claims={"email": "alice@example.com"},
    ),
    _c(
        "claim-suffix-must-end",
        "claims",
        "anonymous",
        "GET",
        "/staff/roster",
        deny(),
        user=SHOP_ALICE,
        claims={"email": "alice@example.com.evil.org"},
    ),
    # notValues: holds for another value, and when the claim is absent.
    _c(
        "not-claim-other-value",
        "claims",
        "anonymous",
        "GET",
        "/reports/q1",
        allow("reports-not-contractors"),
        user=SHOP_ALICE,
        claims={"employment": "employee"},
    ),
    _c(
        "not-claim-absent-holds",
        "claims",
        "anonymous",
        "GET",
        "/reports/q1",
        allow("reports-not-contractors"),
        user=SHOP_ALICE,
    ),
    _c(
        "not-claim-listed-value",
        "claims",
        "anonymous",
        "GET",
        "/reports/q1",
        deny(),
        user=SHOP_ALICE,
        claims={"employment": "contractor"},
    ),
    # A list claim with any excluded element fails notValues.
    _c(
        "not-claim-list-with-listed-value",
        "claims",
        "anonymous",
        "GET",
        "/reports/q1",
        deny(),
        user=SHOP_ALICE,
        claims={"employment": ["employee", "contractor"]},
    ),
    # No token: no claims at all, and requestPrincipals ["*"] fails.
    _c("claims-no-token-denied", "claims", "anonymous", "GET", "/reports/q1", deny()),
    _c("claims-no-token-nested-denied", "claims", "anonymous", "GET", "/orders/1", deny()),
    # --- services-and-users: [ap-ref] principals AND requestPrincipals; [examples] ---
    _c(
        "gateway-with-user-allowed",
        "services-and-users",
        "gateway",
        "GET",
        "/api/pay",
        allow("gateway-with-user"),
        user=ALICE,
    ),
    _c("gateway-without-user-denied", "services-and-users", "gateway", "GET", "/api/pay", deny()),
    # Users only through the gateway: deny requestPrincipals ["*"] AND notPrincipals [gateway].
    _c(
        "user-without-service-denied",
        "services-and-users",
        "anonymous",
        "GET",
        "/api/pay",
        deny("deny-users-off-gateway"),
        user=ALICE,
    ),
    _c(
        "user-via-other-service-denied",
        "services-and-users",
        "batch",
        "GET",
        "/api/pay",
        deny("deny-users-off-gateway"),
        user=ALICE,
    ),
    _c(
        "service-without-user-allowed",
        "services-and-users",
        "batch",
        "GET",
        "/api/pay",
        allow("batch-without-user"),
    ),
    # requestPrincipals suffix pattern (like [examples] "*@example.com").
    _c(
        "user-suffix-pattern",
        "services-and-users",
        "gateway",
        "DELETE",
        "/accounts/7",
        allow("admins-by-suffix"),
        user=f"{TESTING}/ops-admin",
    ),
    _c(
        "user-suffix-pattern-no-match",
        "services-and-users",
        "gateway",
        "DELETE",
        "/accounts/7",
        deny(),
        user=f"{TESTING}/admin-ops",
    ),
    _c(
        "gateway-unknown-issuer-401",
        "services-and-users",
        "gateway",
        "GET",
        "/api/pay",
        UNAUTHENTICATED,
        user=SHOP_ALICE,
    ),
    _c(
        "gateway-expired-token-401",
        "services-and-users",
        "gateway",
        "GET",
        "/api/pay",
        UNAUTHENTICATED,
        user=ALICE,
        token=EXPIRED,
        explain="skip",
    ),
    # --- strict: [authn-policy] end-user authentication with mutual TLS ---
    _c(
        "strict-user-without-service-401",
        "strict",
        "anonymous",
        "GET",
        "/q",
        UNAUTHENTICATED,
        user=ALICE,
    ),
    _c(
        "strict-service-and-user",
        "strict",
        "frontend",
        "GET",
        "/q",
        allow("frontend-users"),
        user=ALICE,
    ),
    _c("strict-service-without-user", "strict", "frontend", "GET", "/q", deny()),
    _c("strict-other-service-with-user", "strict", "billing", "GET", "/q", deny(), user=ALICE),
    _c(
        "strict-service-invalid-token-401",
        "strict",
        "frontend",
        "GET",
        "/q",
        UNAUTHENTICATED,
        user=ALICE,
        token=GARBAGE,
        explain="skip",
    ),
    # --- locations: [ra-ref] fromHeaders / JWTHeader.prefix / fromCookies ---
    _c(
        "header-without-prefix",
        "locations",
        "anonymous",
        "GET",
        "/headers",
        allow("require-user"),
        user=ALICE,
        send="header:x-jwt-assertion",
    ),
    _c(
        "header-with-prefix",
        "locations",
        "anonymous",
        "GET",
        "/headers",
        allow("require-user"),
        user=ALICE,
        send="header:x-forwarded-authorization:Bearer ",
    ),
    _c(
        "cookie",
        "locations",
        "anonymous",
        "GET",
        "/headers",
        allow("require-user"),
        user=ALICE,
        send="cookie:session",
    ),
    # The named cookie among others in the Cookie header.
    _c(
        "cookie-among-others",
        "locations",
        "anonymous",
        "GET",
        "/headers",
        allow("require-user"),
        user=ALICE,
        send="cookies:session",
    ),
    # With explicit locations the default Authorization: Bearer is not read: no token.
    _c(
        "default-location-not-read",
        "locations",
        "anonymous",
        "GET",
        "/headers",
        deny(),
        user=ALICE,
        send="bearer",
        explain="anonymous",
    ),
    _c(
        "other-cookie-not-read",
        "locations",
        "anonymous",
        "GET",
        "/headers",
        deny(),
        user=ALICE,
        send="cookie:token",
        explain="anonymous",
    ),
    _c(
        "header-garbage-401",
        "locations",
        "anonymous",
        "GET",
        "/headers",
        UNAUTHENTICATED,
        user=ALICE,
        token=GARBAGE,
        send="header:x-jwt-assertion",
        explain="skip",
    ),
    _c(
        "cookie-garbage-401",
        "locations",
        "anonymous",
        "GET",
        "/headers",
        UNAUTHENTICATED,
        user=ALICE,
        token=GARBAGE,
        send="cookie:session",
        explain="skip",
    ),
    _c("locations-no-token-403", "locations", "anonymous", "GET", "/headers", deny()),
    # --- no-end-users: [ra-ref] without RequestAuthentication tokens are not looked at ---
    _c(
        "no-end-users-token-ignored",
        "no-end-users",
        "anonymous",
        "GET",
        "/public/x",
        allow("open"),
        user=ALICE,
    ),
    _c(
        "no-end-users-garbage-not-401",
        "no-end-users",
        "anonymous",
        "GET",
        "/public/x",
        allow("open"),
        user=ALICE,
        token=GARBAGE,
        explain="anonymous",
    ),
    _c(
        "no-end-users-token-grants-nothing",
        "no-end-users",
        "anonymous",
        "GET",
        "/private/x",
        deny(),
        user=ALICE,
    ),
    # --- inline-jwks: [ra-ref] JWTRule.jwks ---
    _c(
        "inline-jwks-valid",
        "inline-jwks",
        "anonymous",
        "GET",
        "/items",
        allow("shop-users"),
        user=SHOP_ALICE,
    ),
    _c(
        "inline-jwks-other-issuer-401",
        "inline-jwks",
        "anonymous",
        "GET",
        "/items",
        UNAUTHENTICATED,
        user=ALICE,
    ),
    _c("inline-jwks-no-token", "inline-jwks", "anonymous", "GET", "/items", deny()),
    # --- discovery: [ra-ref] keys by OpenID Connect discovery of the issuer ---
    _c(
        "discovery-valid",
        "discovery",
        "anonymous",
        "GET",
        "/me",
        allow("discovered-users"),
        user=f"{ISSUER_DISCOVERY}/alice",
    ),
    # The second issuer of the same policy is accepted, but not named by the rule.
    _c("discovery-other-issuer-403", "discovery", "anonymous", "GET", "/me", deny(), user=ALICE),
    _c("discovery-no-token", "discovery", "anonymous", "GET", "/me", deny()),
    # --- principal-parts: [generator] issuer and subject matched apart; [claim-types] ---
    # `https://accounts.example.com/realms/*` is that issuer exactly: SHOP's URL extends it,
    # but SHOP is another issuer.
    _c(
        "parts-longer-issuer-is-not-the-issuer",
        "principal-parts",
        "anonymous",
        "GET",
        "/realms/x",
        deny(),
        user=SHOP_ALICE,
    ),
    # `{SHOP}/team/alice` names issuer `{SHOP}/team`: a SHOP token whose sub is `team/alice`
    # is not that user.
    _c(
        "parts-subject-with-slash-is-not-another-issuer",
        "principal-parts",
        "anonymous",
        "GET",
        "/team/x",
        deny(),
        user=f"{SHOP}/team/alice",
    ),
    _c(
        "parts-subject-with-slash-under-its-issuer",
        "principal-parts",
        "anonymous",
        "GET",
        "/shop/x",
        allow("shop-any"),
        user=f"{SHOP}/team/alice",
    ),
    _c(
        "parts-issuer-star-names-that-issuer",
        "principal-parts",
        "anonymous",
        "GET",
        "/shop/x",
        allow("shop-any"),
        user=SHOP_ALICE,
    ),
    _c(
        "parts-other-issuer-not-in-issuer-star",
        "principal-parts",
        "anonymous",
        "GET",
        "/shop/x",
        deny(),
        user=ALICE,
    ),
    _c(
        "parts-star-slash-sub-any-issuer",
        "principal-parts",
        "anonymous",
        "GET",
        "/alice/x",
        allow("alice-anywhere"),
        user=ALICE,
    ),
    _c(
        "parts-star-slash-sub-is-exact",
        "principal-parts",
        "anonymous",
        "GET",
        "/alice/x",
        deny(),
        user=f"{SHOP}/team/alice",
    ),
    # [claim-types]: the boolean true is not the string "true"; the string is.
    _c(
        "claim-boolean-never-matches-values",
        "principal-parts",
        "anonymous",
        "GET",
        "/verified/x",
        deny(),
        user=SHOP_ALICE,
        claims={"email_verified": True},
        claim_args=("email_verified:=true",),
    ),
    _c(
        "claim-string-true-matches",
        "principal-parts",
        "anonymous",
        "GET",
        "/verified/x",
        allow("verified-email"),
        user=SHOP_ALICE,
        claims={"email_verified": "true"},
    ),
    _c(
        "claim-number-never-matches-values",
        "principal-parts",
        "anonymous",
        "GET",
        "/level/x",
        deny(),
        user=SHOP_ALICE,
        claims={"level": 5},
        claim_args=("level:=5",),
    ),
    _c(
        "claim-number-list-element-never-matches",
        "principal-parts",
        "anonymous",
        "GET",
        "/level/x",
        deny(),
        user=SHOP_ALICE,
        claims={"level": [5, 6]},
    ),
    # notValues holds for a claim that is not a string: the number 0 is not "0".
    _c(
        "claim-number-holds-not-values",
        "principal-parts",
        "anonymous",
        "GET",
        "/zero/x",
        allow("not-level-zero"),
        user=SHOP_ALICE,
        claims={"level": 0},
        claim_args=("level:=0",),
    ),
    _c(
        "claim-string-fails-not-values",
        "principal-parts",
        "anonymous",
        "GET",
        "/zero/x",
        deny(),
        user=SHOP_ALICE,
        claims={"level": "0"},
    ),
]

SUBPROCESS_CASES = [
    "require-jwt-valid-principal",
    "jwt-only-unknown-issuer-401",
    "group-list-by-repeated-claim",
    "nested-claim-bracket-form",
    "aud-not-accepted-401",
]


def render(text: str, values: Mapping[str, str]) -> str:
    """``text`` with every placeholder replaced by its value."""
    for name in PLACEHOLDERS:
        text = text.replace(name, values[name])
    return text


def explain_claim_args(case: Case) -> list[str]:
    """The ``--claim`` arguments for a case's claims."""
    if case.claim_args is not None:
        return list(case.claim_args)
    args = []
    for name, value in case.claims.items():
        args.append(f"{name}={value if isinstance(value, str) else json.dumps(value)}")
    return args


def _dummy_jwks() -> str:
    from joserfc.jwk import RSAKey

    key = RSAKey.generate_key(2048, private=True)
    public = key.as_dict(private=False)
    public.update(kid="dummy", alg="RS256", use="sig")
    return json.dumps({"keys": [public]})


EXPLAIN_VALUES = {
    JWKS_URI_TESTING: "http://127.0.0.1:9/testing/jwks",
    JWKS_URI_SHOP: "http://127.0.0.1:9/shop/jwks",
    ISSUER_DISCOVERY: "http://127.0.0.1:9",
}

EXPLAINED = [c for c in CASES if c.explain != "skip"]


@pytest.fixture(scope="module")
def policy_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every policy above, with dummy key locations, written once to its own file."""
    root = tmp_path_factory.mktemp("end-user-policies")
    values = {**EXPLAIN_VALUES, JWKS_INLINE_SHOP: _dummy_jwks()}
    files: dict[str, Path] = {}
    for name, text in POLICIES.items():
        path = root / f"{name}.yaml"
        path.write_text(render(text, values))
        files[name] = path
    return files


def _explain_user(case: Case) -> str | None:
    if case.explain == "anonymous" or case.user is None:
        return None
    return render(case.user, {**EXPLAIN_VALUES, JWKS_INLINE_SHOP: ""})


def _argv(case: Case, file: Path) -> list[str]:
    argv = [
        "policy",
        "explain",
        str(file),
        "--from",
        case.caller,
        "--method",
        case.method,
        "--path",
        case.path,
        "--json",
    ]
    user = _explain_user(case)
    if user is not None:
        argv += ["--user", user]
        for arg in explain_claim_args(case):
            argv += ["--claim", arg]
    return argv


def rule_line(policy: str, rule: str) -> int:
    """The 1-based line of ``- name: <rule>`` in the policy text."""
    text = POLICIES[policy]
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip() == f"- name: {rule}":
            # Placeholders never span lines, so rendering keeps the numbering.
            return number
    raise AssertionError(f"rule {rule!r} is not in policy {policy!r}")


def _check(case: Case, file: Path, result: Any) -> None:
    assert isinstance(result, dict)
    assert {"decision", "status", "rule", "reason"} <= set(result), result
    has_end_users = "end_users:" in POLICIES[case.policy]
    assert (result["decision"], result["status"], result["rule"]) == (
        case.decision,
        case.status,
        case.rule,
    ), result["reason"]
    assert isinstance(result["reason"], str)
    assert result["reason"].strip()
    if case.rule is not None:
        assert f"{file}:{rule_line(case.policy, case.rule)}" in result["reason"]
    if has_end_users and case.status != 401:
        # Who the end user is, when the policy reads end-user tokens at all (without
        # `end_users` a token is ignored, as without a RequestAuthentication).
        assert result["user"] == (_explain_user(case) or "anonymous")


def test_case_count() -> None:
    """At least 40 cases (most of them explainable), unique ids, every policy used."""
    assert len(CASES) >= 40
    assert len(EXPLAINED) >= 40
    assert len({c.id for c in CASES}) == len(CASES)
    assert {c.policy for c in CASES} == set(POLICIES)
    assert set(SUBPROCESS_CASES) <= {c.id for c in EXPLAINED}
    for case in CASES:
        assert case.explain in ("same", "anonymous", "skip"), case.id
        assert case.token in TOKEN_KINDS, case.id
        assert case.token == VALID or case.explain != "same", case.id
        assert case.user is not None or (not case.claims and case.token == VALID), case.id


@pytest.mark.parametrize("case", EXPLAINED, ids=[c.id for c in EXPLAINED])
def test_explain_in_process(
    case: Case, policy_files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """`mesh policy explain --json` (in-process) prints the Istio-consistent decision."""
    file = policy_files[case.policy]
    assert main(_argv(case, file)) == 0
    out = capsys.readouterr().out
    _check(case, file, json.loads(out))


def test_claims_need_a_user(policy_files: dict[str, Path]) -> None:
    """Claims without an end user (`--user`) are a usage error: exit status 2."""
    argv = ["policy", "explain", str(policy_files["require-group"]), "--from", "anonymous"]
    argv += ["--method", "GET", "--path", "/headers", "--claim", "groups=group1", "--json"]
    try:
        status = main(argv)
    except SystemExit as exc:  # argparse-style usage errors exit
        status = exc.code
    assert status == 2


def _mesh_command() -> list[str]:
    script = Path(sys.executable).parent / "mesh"
    if script.exists():
        return [str(script)]
    found = shutil.which("mesh")
    return [found] if found else [sys.executable, "-m", "mesh_middleware"]


@pytest.mark.parametrize(
    "case", [c for c in EXPLAINED if c.id in SUBPROCESS_CASES], ids=lambda c: c.id
)
def test_explain_subprocess(case: Case, policy_files: dict[str, Path]) -> None:
    """The real `mesh` executable prints the same decision as JSON on stdout."""
    file = policy_files[case.policy]
    done = subprocess.run(
        [*_mesh_command(), *_argv(case, file)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    _check(case, file, json.loads(done.stdout))
