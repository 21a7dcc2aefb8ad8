"""Whether the demo can run: the shop's files, the packages, the policy files."""

from __future__ import annotations

from pathlib import Path

from mesh_middleware.demo.preflight import check_policies, missing_apps, missing_modules
from mesh_middleware.demo.shop import REPO, SHOP_APPS


def test_the_checkout_has_every_app_and_policy_of_the_shop() -> None:
    """gateway, orders, inventory and payments: app.py and policy.yaml each."""
    assert missing_apps(REPO) == []


def test_an_empty_directory_misses_all_eight_files(tmp_path: Path) -> None:
    """Each file is named once, though inventory and payments run several instances."""
    missing = missing_apps(tmp_path)
    assert len(missing) == 8
    assert "sample_apps/inventory/app.py" in missing
    assert "sample_apps/payments/policy.yaml" in missing


def test_missing_modules_names_only_what_is_not_installed() -> None:
    """Installed packages pass; an absent one is named."""
    assert missing_modules(("json", "no_such_module_for_the_demo")) == [
        "no_such_module_for_the_demo"
    ]


def test_the_shop_policies_pass_and_say_what_the_gateway_mirrors() -> None:
    """Four policy files compile; the gateway mirrors a share of inventory calls to v2."""
    preflight = check_policies(REPO)
    assert preflight.problems == []
    assert set(preflight.policies) == {"gateway", "orders", "inventory", "payments"}
    assert len(preflight.lines) == 4
    assert preflight.mirror_percent is not None and preflight.mirror_percent > 0


def test_a_broken_policy_is_a_problem_with_its_file_and_line(tmp_path: Path) -> None:
    """An invalid file is reported like `mesh policy check` reports it."""
    (tmp_path / "sample_apps/orders").mkdir(parents=True)
    (tmp_path / "sample_apps/orders/policy.yaml").write_text("service: orders\nnope: 1\n")
    preflight = check_policies(tmp_path, [spec for spec in SHOP_APPS if spec.service == "orders"])
    assert preflight.policies == {}
    assert any("nope" in problem for problem in preflight.problems)
