"""Authorization cases derived from Istio's AuthorizationPolicy, run through `mesh policy explain`.

Each case is a request against one of the policy files below and the full JSON the CLI must
print: decision, status, rule (or null), and a reason that cites ``FILE:LINE`` when a rule
decided. The semantics are Istio's (DENY before ALLOW; no ALLOW rules → allow; ALLOW rules that
do not match → deny; AND across fields, OR within a list; exact, ``prefix*``, ``*suffix`` and
``*`` matching) as DESIGN §2 adopts them, including where DESIGN differs (slashes are merged).
Most cases run in-process through :func:`mesh_middleware.cli.main`; a few run the real ``mesh``
executable in a subprocess.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from mesh_middleware.cli import main

POLICIES: dict[str, str] = {
    # Strict authentication, public paths, deny rules before allow rules, caller/method/path
    # patterns, a header deny rule.
    "gateway": """\
service: inventory
inbound:
  authentication: strict
  public: [/healthz, /metrics, /public/*]
  authorization:
    mode: enforce
    rules:
      - name: deny-admin
        action: deny
        paths: [/admin, /admin/*]
        not_from: [ops]
      - name: deny-debug-header
        action: deny
        headers:
          x-debug: {values: ["on"]}
      - name: orders-reserve
        action: allow
        from: [orders]
        methods: [POST]
        paths: [/reserve, /items/*]
      - name: readers
        action: allow
        from: [gateway, "web-*"]
        methods: [GET, HEAD]
        paths: ["/items/*", "*.json"]
      - name: ops-admin
        action: allow
        from: [ops]
        paths: [/admin, /admin/*]
""",
    # Permissive authentication: anonymous callers go on to the rules; `from: [anonymous]`
    # names them and `from: ["*"]` means any authenticated caller only.
    "permissive": """\
service: catalog
inbound:
  authentication: permissive
  authorization:
    rules:
      - name: anon-browse
        action: allow
        from: [anonymous]
        methods: [GET]
        paths: [/browse/*]
      - name: authenticated-api
        action: allow
        from: ["*"]
        paths: [/api/*]
      - name: deny-anon-writes
        action: deny
        from: [anonymous]
        not_methods: [GET, HEAD, OPTIONS]
""",
    # Only deny rules: everything they do not deny is allowed (Istio: no ALLOW policy → allow).
    "deny-only": """\
service: ledger
inbound:
  authentication: permissive
  authorization:
    rules:
      - name: block-unauthenticated-writes
        action: deny
        not_from: ["*"]
        methods: [POST, PUT, DELETE, PATCH]
      - name: block-internal
        action: deny
        paths: ["/internal/*"]
        not_from: [ops, "*-admin"]
      - name: block-tenant
        action: deny
        paths: ["/tenants/*"]
        headers:
          x-tenant: {not_values: [acme, globex]}
      - name: need-trace
        action: deny
        paths: ["/traced/*"]
        headers:
          x-trace: {present: false}
""",
    # Header conditions: values with patterns, "*" presence, not_values, AND across headers.
    "headers": """\
service: billing
inbound:
  authentication: strict
  authorization:
    rules:
      - name: tenant-values
        action: allow
        paths: [/invoices/*]
        headers:
          x-tenant: {values: [acme, "glob*", "*-corp"]}
      - name: needs-auth-header
        action: allow
        paths: [/reports/*]
        headers:
          authorization: {values: ["*"]}
          x-region: {values: ["eu-*"]}
      - name: not-beta
        action: allow
        paths: [/features/*]
        headers:
          x-channel: {not_values: ["beta*"]}
""",
    # Audit mode: evaluates the same way, never denies, reports what it would have done.
    "audit": """\
service: search
inbound:
  authentication: strict
  authorization:
    mode: audit
    rules:
      - name: deny-export
        action: deny
        paths: [/export]
      - name: allow-query
        action: allow
        from: [frontend]
        methods: [GET]
        paths: [/query]
""",
    # A rule with no conditions matches every request; not_paths/not_methods exclude.
    "catch-all": """\
service: vault
inbound:
  authentication: permissive
  authorization:
    rules:
      - name: allow-all
        action: allow
      - name: deny-all-but-health
        action: deny
        not_paths: [/health, "/status/*"]
        not_methods: [OPTIONS]
""",
    # No authorization section at all: strict authentication by default, then allow.
    "no-rules": """\
service: plain
""",
    # Several rules match: the first in file order decides, and a deny anywhere beats an allow.
    "ordering": """\
service: orders
inbound:
  authentication: permissive
  authorization:
    rules:
      - name: allow-broad
        action: allow
        paths: ["/v1/*"]
      - name: allow-narrow
        action: allow
        paths: [/v1/items]
      - name: deny-first
        action: deny
        paths: ["/v1/secret*"]
      - name: deny-second
        action: deny
        paths: ["*secret"]
""",
}


@dataclass(frozen=True)
class Case:
    """One request and the decision `mesh policy explain --json` must print for it."""

    id: str
    policy: str
    caller: str
    method: str
    path: str
    decision: str
    status: int
    rule: str | None
    headers: dict[str, str] = field(default_factory=dict)


def _c(
    case_id: str,
    policy: str,
    caller: str,
    method: str,
    path: str,
    expect: tuple[str, int, str | None],
    headers: dict[str, str] | None = None,
) -> Case:
    decision, status, rule = expect
    return Case(case_id, policy, caller, method, path, decision, status, rule, headers or {})


def allow(rule: str | None = None) -> tuple[str, int, str | None]:
    """Expected outcome: allowed (200), by ``rule`` or by default."""
    return ("allow", 200, rule)


def deny(rule: str | None = None) -> tuple[str, int, str | None]:
    """Expected outcome: forbidden (403), by ``rule`` or by default."""
    return ("deny", 403, rule)


BAD_REQUEST = ("deny", 400, None)
UNAUTHENTICATED = ("deny", 401, None)


CASES: list[Case] = [
    # --- gateway: allow rules, AND across fields, OR within a list ---
    _c("allow-exact-path", "gateway", "orders", "POST", "/reserve", allow("orders-reserve")),
    _c("allow-prefix-path", "gateway", "orders", "POST", "/items/42", allow("orders-reserve")),
    _c(
        "prefix-matches-bare-prefix",
        "gateway",
        "orders",
        "POST",
        "/items/",
        allow("orders-reserve"),
    ),
    _c("method-and-path-must-both-hold", "gateway", "orders", "GET", "/reserve", deny()),
    _c("no-allow-rule-matches-default-deny", "gateway", "orders", "POST", "/other", deny()),
    _c("caller-not-listed-default-deny", "gateway", "billing", "GET", "/items/1", deny()),
    _c("second-caller-in-list", "gateway", "gateway", "GET", "/items/1", allow("readers")),
    _c("caller-prefix-pattern", "gateway", "web-frontend", "GET", "/items/1", allow("readers")),
    _c("caller-prefix-needs-whole-prefix", "gateway", "web", "GET", "/items/1", deny()),
    _c("second-method-in-list", "gateway", "gateway", "HEAD", "/items/1", allow("readers")),
    _c("method-not-listed", "gateway", "gateway", "POST", "/items/1", deny()),
    _c("lowercase-cli-method", "gateway", "gateway", "get", "/items/1", allow("readers")),
    _c("path-suffix-pattern", "gateway", "gateway", "GET", "/catalog.json", allow("readers")),
    _c("path-suffix-must-end", "gateway", "gateway", "GET", "/catalog.jsonx", deny()),
    _c("path-prefix-needs-slash", "gateway", "gateway", "GET", "/itemsx", deny()),
    _c("paths-are-case-sensitive", "gateway", "gateway", "GET", "/ADMIN", deny()),
    _c("exact-path-no-trailing-slash", "gateway", "orders", "POST", "/reserve/", deny()),
    # --- gateway: deny rules come first and name themselves ---
    _c("deny-rule-exact", "gateway", "gateway", "GET", "/admin", deny("deny-admin")),
    _c("deny-rule-prefix", "gateway", "gateway", "GET", "/admin/users", deny("deny-admin")),
    _c("not-from-excludes-caller", "gateway", "ops", "GET", "/admin/users", allow("ops-admin")),
    _c("not-from-excludes-caller-exact", "gateway", "ops", "DELETE", "/admin", allow("ops-admin")),
    _c(
        "deny-header-beats-allow",
        "gateway",
        "orders",
        "POST",
        "/reserve",
        deny("deny-debug-header"),
        {"x-debug": "on"},
    ),
    _c(
        "header-names-case-insensitive",
        "gateway",
        "gateway",
        "GET",
        "/items/1",
        deny("deny-debug-header"),
        {"X-Debug": "on"},
    ),
    _c(
        "header-values-case-sensitive",
        "gateway",
        "gateway",
        "GET",
        "/items/1",
        allow("readers"),
        {"x-debug": "ON"},
    ),
    _c(
        "deny-header-other-value",
        "gateway",
        "gateway",
        "GET",
        "/items/1",
        allow("readers"),
        {"x-debug": "off"},
    ),
    # --- gateway: normalization before matching (DESIGN §2) ---
    _c("dotdot-into-admin", "gateway", "gateway", "GET", "/public/../admin", deny("deny-admin")),
    _c("dotdot-from-items", "gateway", "gateway", "GET", "/items/../admin", deny("deny-admin")),
    _c("encoded-dotdot", "gateway", "gateway", "GET", "/%2e%2e/admin", deny("deny-admin")),
    _c("encoded-dotdot-upper", "gateway", "gateway", "GET", "/x/%2E%2E/admin", deny("deny-admin")),
    _c("double-slash-merged", "gateway", "gateway", "GET", "//admin", deny("deny-admin")),
    _c("many-slashes-merged", "gateway", "gateway", "GET", "///admin//users", deny("deny-admin")),
    _c("single-dot-removed", "gateway", "gateway", "GET", "/./admin", deny("deny-admin")),
    _c("dotdot-above-root", "gateway", "gateway", "GET", "/../../admin", deny("deny-admin")),
    _c("unreserved-escape-decoded", "gateway", "gateway", "GET", "/%61dmin", deny("deny-admin")),
    _c("query-stripped", "gateway", "gateway", "GET", "/admin?x=/items/1", deny("deny-admin")),
    _c("fragment-stripped", "gateway", "gateway", "GET", "/admin#top", deny("deny-admin")),
    _c("mixed-dot-escape", "gateway", "gateway", "GET", "/.%2e/admin", deny("deny-admin")),
    _c("encoded-single-dot", "gateway", "gateway", "GET", "/%2E/admin/x", deny("deny-admin")),
    _c("trailing-dot-segment", "gateway", "gateway", "GET", "/admin/.", deny("deny-admin")),
    _c(
        "public-encoded-dotdot-401",
        "gateway",
        "anonymous",
        "GET",
        "/public/%2e%2e/admin",
        UNAUTHENTICATED,
    ),
    _c(
        "healthz-dotdot-admin", "gateway", "gateway", "GET", "/healthz/../admin", deny("deny-admin")
    ),
    _c(
        "normalized-path-allowed",
        "gateway",
        "orders",
        "POST",
        "/x/../items/./7",
        allow("orders-reserve"),
    ),
    # --- gateway: malformed or unsafe paths → 400, before authentication ---
    _c("encoded-slash", "gateway", "gateway", "GET", "/items/..%2Fadmin", BAD_REQUEST),
    _c("encoded-slash-lower", "gateway", "gateway", "GET", "/items/%2f", BAD_REQUEST),
    _c("encoded-backslash", "gateway", "gateway", "GET", "/items/%5Cadmin", BAD_REQUEST),
    _c("encoded-backslash-lower", "gateway", "gateway", "GET", "/items/%5c", BAD_REQUEST),
    _c("raw-backslash", "gateway", "gateway", "GET", "/items\\..\\admin", BAD_REQUEST),
    _c("encoded-nul", "gateway", "gateway", "GET", "/items/%00", BAD_REQUEST),
    _c("malformed-escape", "gateway", "gateway", "GET", "/items/%zz", BAD_REQUEST),
    _c("truncated-escape", "gateway", "gateway", "GET", "/items/%4", BAD_REQUEST),
    _c("lone-percent", "gateway", "gateway", "GET", "/items/%", BAD_REQUEST),
    _c("relative-path", "gateway", "gateway", "GET", "items/1", BAD_REQUEST),
    _c("bad-path-before-401", "gateway", "anonymous", "GET", "/a%2Fb", BAD_REQUEST),
    _c("bad-path-on-public-prefix", "gateway", "anonymous", "GET", "/public/%2F", BAD_REQUEST),
    # --- gateway: strict authentication and public paths ---
    _c("strict-anonymous-401", "gateway", "anonymous", "GET", "/items/1", UNAUTHENTICATED),
    _c(
        "strict-anonymous-401-on-deny-path",
        "gateway",
        "anonymous",
        "GET",
        "/admin",
        UNAUTHENTICATED,
    ),
    _c("public-exact-anonymous", "gateway", "anonymous", "GET", "/healthz", allow()),
    _c("public-prefix-anonymous", "gateway", "anonymous", "GET", "/public/docs", allow()),
    _c("public-skips-rules", "gateway", "billing", "POST", "/metrics", allow()),
    _c("public-after-normalization", "gateway", "anonymous", "GET", "//healthz", allow()),
    _c("public-query-stripped", "gateway", "anonymous", "GET", "/healthz?full=1", allow()),
    _c(
        "public-dotdot-escape-401",
        "gateway",
        "anonymous",
        "GET",
        "/public/../admin",
        UNAUTHENTICATED,
    ),
    _c("public-not-a-prefix", "gateway", "anonymous", "GET", "/healthzx", UNAUTHENTICATED),
    # --- permissive: anonymous callers go on to the rules ---
    _c(
        "anonymous-named-in-from",
        "permissive",
        "anonymous",
        "GET",
        "/browse/x",
        allow("anon-browse"),
    ),
    _c("star-is-not-anonymous", "permissive", "anonymous", "GET", "/api/x", deny()),
    _c(
        "star-any-authenticated",
        "permissive",
        "orders",
        "GET",
        "/api/x",
        allow("authenticated-api"),
    ),
    _c("anonymous-only-rule-not-for-services", "permissive", "orders", "GET", "/browse/x", deny()),
    _c(
        "deny-anonymous-write",
        "permissive",
        "anonymous",
        "POST",
        "/browse/x",
        deny("deny-anon-writes"),
    ),
    _c("not-methods-excludes", "permissive", "anonymous", "HEAD", "/browse/x", deny()),
    _c(
        "deny-anonymous-write-not-services",
        "permissive",
        "orders",
        "POST",
        "/api/x",
        allow("authenticated-api"),
    ),
    _c("permissive-anonymous-no-match", "permissive", "anonymous", "GET", "/other", deny()),
    _c("permissive-dotdot", "permissive", "anonymous", "GET", "/browse/../api/x", deny()),
    _c(
        "deny-listed-last-still-first",
        "permissive",
        "anonymous",
        "DELETE",
        "/api/x",
        deny("deny-anon-writes"),
    ),
    # --- deny-only: no allow rules → allow what is not denied ---
    _c("no-allow-rules-default-allow", "deny-only", "anonymous", "GET", "/anything", allow()),
    _c(
        "not-from-star-denies-anonymous",
        "deny-only",
        "anonymous",
        "POST",
        "/x",
        deny("block-unauthenticated-writes"),
    ),
    _c("not-from-star-spares-services", "deny-only", "orders", "POST", "/x", allow()),
    _c("deny-internal", "deny-only", "orders", "GET", "/internal/a", deny("block-internal")),
    _c("not-from-exact-spared", "deny-only", "ops", "GET", "/internal/a", allow()),
    _c("not-from-suffix-spared", "deny-only", "billing-admin", "GET", "/internal/a", allow()),
    _c(
        "not-from-anonymous-not-spared",
        "deny-only",
        "anonymous",
        "GET",
        "/internal/a",
        deny("block-internal"),
    ),
    _c("prefix-pattern-not-bare-dir", "deny-only", "orders", "GET", "/internal", allow()),
    _c(
        "not-values-listed-value",
        "deny-only",
        "orders",
        "GET",
        "/tenants/1",
        allow(),
        {"x-tenant": "acme"},
    ),
    _c(
        "not-values-other-value",
        "deny-only",
        "orders",
        "GET",
        "/tenants/1",
        deny("block-tenant"),
        {"x-tenant": "initech"},
    ),
    _c(
        "not-values-missing-header-holds",
        "deny-only",
        "orders",
        "GET",
        "/tenants/1",
        deny("block-tenant"),
    ),
    _c("present-false-missing", "deny-only", "orders", "GET", "/traced/1", deny("need-trace")),
    _c(
        "present-false-given",
        "deny-only",
        "orders",
        "GET",
        "/traced/1",
        allow(),
        {"x-trace": "abc"},
    ),
    _c(
        "present-false-empty-value",
        "deny-only",
        "orders",
        "GET",
        "/traced/1",
        allow(),
        {"x-trace": ""},
    ),
    # --- headers: values, prefix/suffix/presence patterns, AND across headers ---
    _c(
        "header-exact",
        "headers",
        "orders",
        "GET",
        "/invoices/1",
        allow("tenant-values"),
        {"x-tenant": "acme"},
    ),
    _c(
        "header-prefix",
        "headers",
        "orders",
        "GET",
        "/invoices/1",
        allow("tenant-values"),
        {"x-tenant": "globex"},
    ),
    _c(
        "header-suffix",
        "headers",
        "orders",
        "GET",
        "/invoices/1",
        allow("tenant-values"),
        {"x-tenant": "initech-corp"},
    ),
    _c(
        "header-no-pattern-matches",
        "headers",
        "orders",
        "GET",
        "/invoices/1",
        deny(),
        {"x-tenant": "initech"},
    ),
    _c("header-missing-fails-values", "headers", "orders", "GET", "/invoices/1", deny()),
    _c(
        "header-value-case-sensitive",
        "headers",
        "orders",
        "GET",
        "/invoices/1",
        deny(),
        {"x-tenant": "ACME"},
    ),
    _c(
        "headers-all-hold",
        "headers",
        "orders",
        "GET",
        "/reports/q1",
        allow("needs-auth-header"),
        {"Authorization": "Bearer abc", "x-region": "eu-west"},
    ),
    _c(
        "presence-star-needs-non-empty",
        "headers",
        "orders",
        "GET",
        "/reports/q1",
        deny(),
        {"authorization": "", "x-region": "eu-west"},
    ),
    _c(
        "headers-and-one-missing",
        "headers",
        "orders",
        "GET",
        "/reports/q1",
        deny(),
        {"authorization": "x"},
    ),
    _c("not-values-missing-header", "headers", "orders", "GET", "/features/f", allow("not-beta")),
    _c(
        "not-values-prefix-excludes",
        "headers",
        "orders",
        "GET",
        "/features/f",
        deny(),
        {"x-channel": "beta-2"},
    ),
    _c(
        "not-values-other",
        "headers",
        "orders",
        "GET",
        "/features/f",
        allow("not-beta"),
        {"x-channel": "stable"},
    ),
    _c(
        "header-rules-strict-anonymous",
        "headers",
        "anonymous",
        "GET",
        "/invoices/1",
        UNAUTHENTICATED,
        {"x-tenant": "acme"},
    ),
    # --- audit: never denies, reports the would-be decision ---
    _c("audit-allow-rule", "audit", "frontend", "GET", "/query", allow("allow-query")),
    _c("audit-would-deny-by-rule", "audit", "frontend", "GET", "/export", allow("deny-export")),
    _c("audit-would-deny-by-default", "audit", "frontend", "GET", "/other", allow()),
    _c(
        "audit-deny-rule-normalized",
        "audit",
        "frontend",
        "GET",
        "/x/../export",
        allow("deny-export"),
    ),
    _c("audit-strict-anonymous-still-401", "audit", "anonymous", "GET", "/query", UNAUTHENTICATED),
    _c("audit-bad-path-still-400", "audit", "frontend", "GET", "/export%2F", BAD_REQUEST),
    # --- catch-all: empty rule matches everything; not_* exclusions ---
    _c("empty-rule-allows", "catch-all", "anonymous", "GET", "/health", allow("allow-all")),
    _c(
        "not-paths-and-not-methods-deny",
        "catch-all",
        "orders",
        "GET",
        "/secret",
        deny("deny-all-but-health"),
    ),
    _c("not-methods-spares", "catch-all", "orders", "OPTIONS", "/secret", allow("allow-all")),
    _c(
        "not-paths-prefix-spares", "catch-all", "anonymous", "POST", "/status/x", allow("allow-all")
    ),
    # --- no rules at all ---
    _c("no-rules-allow", "no-rules", "orders", "DELETE", "/x", allow()),
    _c("no-rules-default-strict", "no-rules", "anonymous", "GET", "/x", UNAUTHENTICATED),
    # --- ordering: first matching rule in file order decides ---
    _c("first-allow-in-file-order", "ordering", "orders", "GET", "/v1/items", allow("allow-broad")),
    _c("first-deny-in-file-order", "ordering", "orders", "GET", "/v1/secret", deny("deny-first")),
    _c("deny-suffix", "ordering", "anonymous", "GET", "/v2/top-secret", deny("deny-second")),
    _c("ordering-no-match", "ordering", "orders", "GET", "/v2/items", deny()),
]

SUBPROCESS_CASES = [
    "allow-exact-path",
    "encoded-dotdot",
    "strict-anonymous-401",
    "audit-would-deny-by-rule",
    "header-names-case-insensitive",
]


@pytest.fixture(scope="module")
def policy_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every policy above, written once to its own file."""
    root = tmp_path_factory.mktemp("istio-policies")
    files: dict[str, Path] = {}
    for name, text in POLICIES.items():
        path = root / f"{name}.yaml"
        path.write_text(text)
        files[name] = path
    return files


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
    for name, value in case.headers.items():
        argv += ["--header", f"{name}={value}"]
    return argv


def _rule_line(policy: str, rule: str) -> int:
    """The 1-based line of ``- name: <rule>`` in the policy text."""
    for number, line in enumerate(POLICIES[policy].splitlines(), start=1):
        if line.strip() == f"- name: {rule}":
            return number
    raise AssertionError(f"rule {rule!r} is not in policy {policy!r}")


def _check(case: Case, file: Path, result: Any) -> None:
    assert isinstance(result, dict)
    assert set(result) == {"decision", "status", "rule", "reason"}
    assert (result["decision"], result["status"], result["rule"]) == (
        case.decision,
        case.status,
        case.rule,
    ), result["reason"]
    assert isinstance(result["reason"], str)
    assert result["reason"].strip()
    if case.rule is not None:
        assert f"{file}:{_rule_line(case.policy, case.rule)}" in result["reason"]


def test_case_count() -> None:
    """There are at least 60 cases, with unique ids, over policies that all exist."""
    assert len(CASES) >= 60
    assert len({c.id for c in CASES}) == len(CASES)
    assert {c.policy for c in CASES} == set(POLICIES)
    assert set(SUBPROCESS_CASES) <= {c.id for c in CASES}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_explain_in_process(
    case: Case, policy_files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """`mesh policy explain --json` (in-process) prints the Istio-consistent decision."""
    file = policy_files[case.policy]
    assert main(_argv(case, file)) == 0
    out = capsys.readouterr().out
    _check(case, file, json.loads(out))


def _mesh_command() -> list[str]:
    script = Path(sys.executable).parent / "mesh"
    if script.exists():
        return [str(script)]
    found = shutil.which("mesh")
    return [found] if found else [sys.executable, "-m", "mesh_middleware"]


@pytest.mark.parametrize("case", [c for c in CASES if c.id in SUBPROCESS_CASES], ids=lambda c: c.id)
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
