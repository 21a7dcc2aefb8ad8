"""The sample shop's policy files: valid, and deciding what the shop contract says."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mesh_middleware.cli import main
from mesh_middleware.policy.compiled import compile_policy_file
from tests.sample_apps.shop import APPS, POLICIES, REPO


def test_every_policy_passes_mesh_policy_check() -> None:
    """`mesh policy check` (the real command) accepts all four policy files."""
    files = [str(POLICIES[app].relative_to(REPO)) for app in APPS]
    result = subprocess.run(
        [sys.executable, "-m", "mesh_middleware", "policy", "check", *files],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    for app, line in zip(APPS, result.stdout.splitlines(), strict=True):
        assert line.startswith(f"sample_apps/{app}/policy.yaml: ok (service {app},"), line


# app, caller, method, path, headers -> decision, status, rule
DECISIONS = [
    # gateway: the shop is open to anonymous callers; one rule only audits
    ("gateway", "anonymous", "GET", "/shop/items/1", {}, "allow", 200, "shop-is-open"),
    ("gateway", "anonymous", "POST", "/shop/reserve-direct", {}, "allow", 200, "shop-is-open"),
    ("gateway", "anonymous", "POST", "/shop/orders", {}, "allow", 200, "no-anonymous-orders"),
    ("gateway", "orders", "POST", "/shop/orders", {}, "allow", 200, "shop-is-open"),
    ("gateway", "anonymous", "GET", "/admin", {}, "deny", 403, None),
    ("gateway", "anonymous", "GET", "/healthz", {}, "allow", 200, None),
    # orders: only the gateway, with an identity
    ("orders", "gateway", "POST", "/orders", {}, "allow", 200, "gateway-places-orders"),
    ("orders", "gateway", "GET", "/orders/abc", {}, "allow", 200, "gateway-reads-orders"),
    ("orders", "anonymous", "POST", "/orders", {}, "deny", 401, None),
    ("orders", "inventory", "POST", "/orders", {}, "deny", 403, None),
    ("orders", "anonymous", "GET", "/metrics", {}, "allow", 200, None),
    # inventory: the named deny rule for the gateway's reserve, reads for both callers
    ("inventory", "gateway", "POST", "/reserve", {}, "deny", 403, "reserve-only-orders"),
    ("inventory", "payments", "POST", "/reserve", {}, "deny", 403, "reserve-only-orders"),
    ("inventory", "orders", "POST", "/reserve", {}, "allow", 200, "orders-reserve"),
    ("inventory", "gateway", "GET", "/items/3", {}, "allow", 200, "read-items"),
    ("inventory", "orders", "GET", "/items/3", {}, "allow", 200, "read-items"),
    ("inventory", "payments", "GET", "/items/3", {}, "deny", 403, None),
    ("inventory", "orders", "GET", "/admin/stats", {}, "deny", 403, "no-admin"),
    ("inventory", "anonymous", "GET", "/items/3", {}, "deny", 401, None),
    # payments: only orders charges, chaos or not (faults come after authorization)
    ("payments", "orders", "POST", "/charge", {}, "allow", 200, "only-orders-charge"),
    (
        "payments",
        "orders",
        "POST",
        "/charge",
        {"x-chaos": "on"},
        "allow",
        200,
        "only-orders-charge",
    ),
    ("payments", "gateway", "POST", "/charge", {}, "deny", 403, None),
]


@pytest.mark.parametrize(
    ("app", "caller", "method", "path", "headers", "decision", "status", "rule"), DECISIONS
)
def test_mesh_policy_explain_gives_the_contract_decision(
    capsys: pytest.CaptureFixture[str],
    app: str,
    caller: str,
    method: str,
    path: str,
    headers: dict[str, str],
    decision: str,
    status: int,
    rule: str | None,
) -> None:
    """`mesh policy explain --json` decides each request of the contract as intended."""
    argv = ["policy", "explain", str(POLICIES[app]), "--from", caller]
    argv += ["--method", method, "--path", path, "--json"]
    for name, value in headers.items():
        argv += ["--header", f"{name}={value}"]
    main(argv)
    answer = json.loads(capsys.readouterr().out)
    assert (answer["decision"], answer["status"], answer["rule"]) == (decision, status, rule)


def test_the_audit_rule_notes_without_denying(capsys: pytest.CaptureFixture[str]) -> None:
    """The gateway's anonymous order is let through, and the reason says it would be denied."""
    argv = ["policy", "explain", str(POLICIES["gateway"]), "--from", "anonymous"]
    main([*argv, "--method", "POST", "--path", "/shop/orders", "--json"])
    answer = json.loads(capsys.readouterr().out)
    assert answer["decision"] == "allow"
    assert answer["reason"].startswith("audit mode: would deny by rule 'no-anonymous-orders'")


def test_the_named_deny_rule_cites_its_file_and_line(capsys: pytest.CaptureFixture[str]) -> None:
    """The gateway's reserve is denied by `reserve-only-orders`, at its line of the file."""
    argv = ["policy", "explain", str(POLICIES["inventory"]), "--from", "gateway"]
    main([*argv, "--method", "POST", "--path", "/reserve"])
    output = capsys.readouterr().out
    lines = POLICIES["inventory"].read_text().splitlines()
    line = next(n for n, text in enumerate(lines, 1) if "name: reserve-only-orders" in text)
    assert "rule 'reserve-only-orders' (" in output
    assert f"policy.yaml:{line})" in output


def test_exactly_one_deny_rule_is_in_audit_mode() -> None:
    """Across the four files, one deny rule audits (the gateway's), and no file does as a whole."""
    audited = []
    for app in APPS:
        policy = compile_policy_file(POLICIES[app]).loaded.policy
        assert policy.inbound.authorization.mode == "enforce", app
        audited += [
            (app, rule.name) for rule in policy.inbound.authorization.rules if rule.mode == "audit"
        ]
    assert audited == [("gateway", "no-anonymous-orders")]


def test_outbound_sections_show_canary_mirror_retries_and_outlier_detection() -> None:
    """90/10 to inventory from gateway and orders; 20% of reads mirrored to v2; charges retried
    3 times on gateway errors; outlier detection on every destination with several instances."""
    gateway = compile_policy_file(POLICIES["gateway"]).loaded.policy.outbound.services
    orders = compile_policy_file(POLICIES["orders"]).loaded.policy.outbound.services
    for inventory in (gateway["inventory"], orders["inventory"]):
        for route in inventory.routes:
            assert [(d.version, d.weight) for d in route.to] == [("v1", 90), ("v2", 10)]
        assert inventory.outlier_detection is not None
        assert inventory.endpoints == []  # instances come from the registry
    reads, writes = gateway["inventory"].routes
    assert reads.match.methods == ["GET"] and writes.match.methods == []
    # Reads are mirrored (the route's own mirror); writes never are.
    assert reads.mirror is not None and writes.mirror is None
    assert (reads.mirror.to.version, reads.mirror.percent) == ("v2", 20)
    assert gateway["inventory"].mirror is None
    retries = orders["payments"].retries
    assert retries is not None
    assert retries.attempts == 3
    assert {"gateway-error", "connect-failure", "reset"} <= set(retries.on)
    assert orders["payments"].outlier_detection is not None


def test_payments_fault_aborts_a_quarter_of_chaos_charges() -> None:
    """One fault: 503 at 25%, only for `x-chaos: on`."""
    (fault,) = compile_policy_file(POLICIES["payments"]).loaded.policy.inbound.faults
    assert fault.abort is not None
    assert (fault.abort.status, fault.abort.percent) == (503, 25)
    assert fault.delay is None
    header = fault.match.headers["x-chaos"]
    assert header.values == ["on"]
