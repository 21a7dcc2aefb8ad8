"""Which hosts are mesh destinations, and destinations kept across policy reloads."""

from __future__ import annotations

from mesh_middleware.discovery.catalog import Discovery
from mesh_middleware.outbound.engine import OutboundEngine
from mesh_middleware.policy.compiled import CompiledPolicy, compile_policy_text

POLICY = """service: orders
outbound:
  services:
    inventory:
      timeout: 2s
      endpoints: [{url: "http://127.0.0.1:9001"}]
    payments: {}
"""


class Holder:
    def __init__(self, text: str) -> None:
        self.policy = compile_policy_text(text)

    def __call__(self) -> CompiledPolicy:
        return self.policy


def engine(text: str = POLICY, *, registry: bool) -> tuple[OutboundEngine, Holder]:
    holder = Holder(text)
    return OutboundEngine(holder, Discovery(None), registry=registry), holder


def test_without_a_registry_only_listed_services_are_mesh_hosts() -> None:
    found, _ = engine(registry=False)
    assert found.destination("inventory") is not None
    assert found.destination("payments") is not None
    assert found.destination("shipping") is None
    assert found.destination("example.com") is None


def test_with_a_registry_bare_service_names_are_mesh_hosts() -> None:
    found, _ = engine(registry=True)
    shipping = found.destination("shipping")
    assert shipping is not None and shipping.service == "shipping"
    for host in ("localhost", "example.com", "127.0.0.1", "db.internal", "Bad_Name", "::1"):
        assert found.destination(host) is None, host


def test_host_names_are_case_insensitive() -> None:
    found, _ = engine(registry=False)
    upper = found.destination("INVENTORY")
    assert upper is not None and upper is found.destination("inventory")


def test_settings_come_from_the_service_then_the_defaults() -> None:
    found, _ = engine(registry=False)
    inventory, payments = found.destination("inventory"), found.destination("payments")
    assert inventory is not None and payments is not None
    assert inventory.timeout == 2.0 and payments.timeout == 5.0
    assert inventory.static and not payments.static


def test_static_endpoints_are_served_without_a_registry() -> None:
    found, _ = engine(registry=False)
    inventory = found.destination("inventory")
    assert inventory is not None
    endpoints = inventory.endpoints()
    assert endpoints is not None and [e.port for e in endpoints.endpoints] == [9001]


def test_a_reload_keeps_unchanged_destinations_and_rebuilds_changed_ones() -> None:
    found, holder = engine(registry=True)
    inventory, payments = found.destination("inventory"), found.destination("payments")
    holder.policy = compile_policy_text(POLICY.replace("payments: {}", "payments: {timeout: 1s}"))
    assert found.destination("inventory") is inventory  # same settings: state kept
    rebuilt = found.destination("payments")
    assert rebuilt is not payments and rebuilt is not None and rebuilt.timeout == 1.0


def test_a_reload_updates_static_endpoints() -> None:
    found, holder = engine(registry=False)
    holder.policy = compile_policy_text(POLICY.replace("9001", "9002"))
    inventory = found.destination("inventory")
    assert inventory is not None
    endpoints = inventory.endpoints()
    assert endpoints is not None and [e.port for e in endpoints.endpoints] == [9002]


def test_external_trace_context_follows_the_policy_switch() -> None:
    found, holder = engine(registry=False)
    assert found.trace_external
    holder.policy = compile_policy_text(
        POLICY + "  defaults: {trace_context_to_external_hosts: false}\n"
    )
    assert not found.trace_external
