"""The decisions of one outbound call: instance choice, retries, budget, deadline, limits."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from mesh_middleware.discovery.catalog import Discovery
from mesh_middleware.outbound import call as call_module
from mesh_middleware.outbound.call import Call, CallRefused, Next, Refusal
from mesh_middleware.outbound.destination import Destination, resolve_settings
from mesh_middleware.policy.compiled import compile_policy_text
from mesh_middleware.resilience.retry_policy import Failure

NOW = time.monotonic()


def destination(outbound: str, service: str = "inventory") -> tuple[Destination, Discovery]:
    policy = compile_policy_text(f"service: orders\noutbound:\n{outbound}").loaded.policy
    discovery = Discovery(None)
    services = policy.outbound.services
    discovery.set_static({n: s.endpoints for n, s in services.items() if s.endpoints})
    settings = resolve_settings(policy.outbound.defaults, services.get(service), policy.zone)
    return Destination(service, settings, discovery), discovery


THREE = """  services:
    inventory:
      retries: {attempts: 2, on: [connect-failure, reset, 503]}
      endpoints:
        - {url: "http://127.0.0.1:9001", version: v1}
        - {url: "http://127.0.0.1:9002", version: v1}
        - {url: "http://127.0.0.1:9003", version: v2}
"""


@pytest.fixture
def three() -> Iterator[Destination]:
    found, discovery = destination(THREE)
    yield found
    discovery.close()


def call(dest: Destination, method: str = "GET", **options: object) -> Call:
    headers = options.pop("headers", {})
    return Call(dest, method, "/items", headers, replayable=True, now=NOW, **options)  # type: ignore[arg-type]


def test_a_retry_goes_to_another_instance_first(three: Destination) -> None:
    c = call(three)
    first = c.pick(NOW)
    assert c.failed(first, Failure.CONNECT_FAILURE, NOW) is Next.RETRY
    second = c.pick(NOW)
    assert second is not first
    assert c.failed(second, Failure.CONNECT_FAILURE, NOW) is Next.RETRY
    third = c.pick(NOW)
    assert third not in (first, second)
    assert c.failed(third, Failure.CONNECT_FAILURE, NOW) is Next.DONE  # 2 retries: 3 tries
    c.finish()


def test_503_is_retried_only_when_listed_and_for_idempotent_methods(three: Destination) -> None:
    c = call(three)
    assert c.answered(c.pick(NOW), 503, None, NOW) is Next.RETRY
    assert c.answered(c.pick(NOW), 502, None, NOW) is Next.DONE  # not listed
    c.finish()
    post = call(three, "POST")
    assert post.answered(post.pick(NOW), 503, None, NOW) is Next.DONE
    post.finish()
    keyed = call(three, "POST", headers={"idempotency-key": "k1"})
    assert keyed.answered(keyed.pick(NOW), 503, None, NOW) is Next.RETRY
    keyed.finish()


def test_a_connect_failure_is_retried_for_any_method(three: Destination) -> None:
    """Nothing was sent, so nothing can be duplicated (urllib3 does the same)."""
    post = call(three, "POST")
    assert post.failed(post.pick(NOW), Failure.CONNECT_FAILURE, NOW) is Next.RETRY
    assert post.failed(post.pick(NOW), Failure.RESET, NOW) is Next.DONE
    post.finish()


def test_a_body_that_cannot_be_replayed_is_never_retried(three: Destination) -> None:
    c = Call(three, "PUT", "/items", {}, replayable=False, now=NOW)
    assert c.failed(c.pick(NOW), Failure.CONNECT_FAILURE, NOW) is Next.DONE
    c.finish()


def test_retry_after_is_waited_and_a_long_one_ends_retrying(three: Destination) -> None:
    c = call(three)
    assert c.answered(c.pick(NOW), 503, "1", NOW) is Next.RETRY
    assert c.delay >= 1
    assert c.answered(c.pick(NOW), 503, "60", NOW) is Next.DONE  # longer than the timeout
    c.finish()


def test_the_budget_stops_retries_under_a_total_outage(three: Destination) -> None:
    retried = 0
    spent = 0
    for _ in range(500):
        c = call(three)
        verdict = c.failed(c.pick(NOW), Failure.CONNECT_FAILURE, NOW)
        retried += verdict is Next.RETRY
        spent += verdict is Next.BUDGET
        c.finish()
    # 0.2 x 500 requests + 10/s x 10 s window, all at one instant
    assert retried <= 0.2 * 500 + 10 * 10
    assert spent == 500 - retried > 0


def test_no_time_left_means_no_retry_and_a_timeout_past_the_deadline_is_deadline(
    three: Destination, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The backoff is full jitter, uniform in [0, 25 ms): pin it to the middle, or 0.4% of runs
    # draw a wait under the 0.1 ms left and rightly retry.
    monkeypatch.setattr(call_module, "backoff", lambda retry: 0.0125)
    c = call(three, deadline=NOW + 0.001)
    assert c.failed(c.pick(NOW), Failure.CONNECT_FAILURE, NOW + 0.0009) is Next.DONE
    assert c.failed(c.pick(NOW), Failure.TIMEOUT, NOW + 0.002) is Next.DEADLINE
    c.finish()


def test_the_callers_deadline_shortens_the_timeout(three: Destination) -> None:
    assert call(three, deadline=NOW + 0.5).deadline == NOW + 0.5
    assert call(three, deadline=NOW + 500).deadline == NOW + three.timeout


def test_max_concurrent_refuses_at_once_and_frees_on_finish() -> None:
    dest, discovery = destination(THREE.replace("retries:", "max_concurrent: 2\n      retries:"))
    first, second = call(dest), call(dest)
    with pytest.raises(CallRefused) as refused:
        call(dest)
    assert refused.value.refusal is Refusal.CIRCUIT_OPEN
    first.finish()
    first.finish()  # idempotent: counted once
    third = call(dest)
    for c in (second, third):
        c.finish()
    assert dest.in_flight == 0
    discovery.close()


def test_a_version_with_no_instance_is_no_healthy_instances() -> None:
    dest, discovery = destination(THREE + "      routes:\n        - to: [{version: v9}]\n")
    c = call(dest)
    with pytest.raises(CallRefused) as refused:
        c.pick(NOW)
    assert refused.value.refusal is Refusal.NO_HEALTHY_INSTANCES
    assert "v9" in refused.value.message
    c.finish()
    discovery.close()


def test_routes_pick_the_subset(three: Destination) -> None:
    dest, discovery = destination(
        THREE
        + "      routes:\n"
        + "        - match: {headers: {x-canary: {values: [always]}}}\n"
        + "          to: [{version: v2}]\n"
        + "        - to: [{version: v1}]\n"
    )
    canary = call(dest, headers={"x-canary": "always"})
    assert canary.pick(NOW).version == "v2"
    plain = call(dest)
    assert {plain.pick(NOW).version for _ in range(2)} == {"v1"}
    for c in (canary, plain):
        c.finish()
    discovery.close()


def test_every_instance_ejected_still_routes_in_panic() -> None:
    dest, discovery = destination(
        THREE.replace(
            "retries:",
            "outlier_detection: {consecutive_failures: 1, max_ejection_percent: 100}\n"
            "      retries:",
        )
    )
    now = time.monotonic()  # ejected_count reads the real clock
    for _ in range(3):
        c = call(dest)
        c.failed(c.pick(now), Failure.CONNECT_FAILURE, now)
        c.finish()
    assert dest.outlier.ejected_count == 3
    c = call(dest)
    assert c.pick(now) is not None  # panic: every instance rather than none
    c.finish()
    discovery.close()


def test_calls_stay_in_the_callers_zone_and_spill_when_it_is_unhealthy() -> None:
    policy = compile_policy_text(
        "service: orders\nzone: eu-1\noutbound:\n  services:\n    inventory:\n"
        "      outlier_detection: {consecutive_failures: 1, max_ejection_percent: 100}\n"
        "      endpoints:\n"
        "        - {url: 'http://127.0.0.1:9001', zone: eu-1}\n"
        "        - {url: 'http://127.0.0.1:9002', zone: eu-2}\n"
        "        - {url: 'http://127.0.0.1:9003', zone: eu-2}\n"
    ).loaded.policy
    discovery = Discovery(None)
    discovery.set_static({"inventory": policy.outbound.services["inventory"].endpoints})
    settings = resolve_settings(
        policy.outbound.defaults, policy.outbound.services["inventory"], policy.zone
    )
    dest = Destination("inventory", settings, discovery)
    zones = []
    for _ in range(200):
        c = call(dest)
        endpoint = c.pick(NOW)
        zones.append(endpoint.zone)
        c.answered(endpoint, 200, None, NOW)
        c.finish()
    assert set(zones) == {"eu-1"}  # the local zone is healthy: everything stays there
    c = call(dest)
    local = c.pick(NOW)
    assert local.zone == "eu-1"
    c.failed(local, Failure.CONNECT_FAILURE, NOW)  # ejected: the local zone has nobody left
    c.finish()
    spilled = set()
    for _ in range(50):
        c = call(dest)
        spilled.add(c.pick(NOW).zone)
        c.finish()
    assert spilled == {"eu-2"}
    discovery.close()


def test_any_failure_once_the_deadline_has_passed_is_the_deadline(three: Destination) -> None:
    """A connect timeout at the deadline is DeadlineExceeded for the caller, not ConnectTimeout."""
    c = call(three, deadline=NOW + 0.5)
    assert c.failed(c.pick(NOW), Failure.CONNECT_FAILURE, NOW + 0.5) is Next.DEADLINE
    c.finish()


def test_an_abandoned_try_counts_against_nobody(three: Destination) -> None:
    """A caller's own cancellation neither ejects the instance nor looks like a slow answer."""
    dest, discovery = destination(
        THREE.replace("retries:", "outlier_detection: {consecutive_failures: 1}\n      retries:")
    )
    c = call(dest)
    endpoint = c.pick(NOW)
    assert endpoint.in_flight == 1
    c.broke(endpoint, NOW)
    c.finish()
    assert endpoint.in_flight == 0 and endpoint.consecutive_failures == 0
    assert endpoint.ewma == 0.0 and dest.outlier.ejected_count == 0
    discovery.close()


def test_the_deadline_header_is_the_tries_own_limit(three: Destination) -> None:
    c = call(three)
    assert c.header_deadline(NOW) == str(int(three.timeout * 1000))
    short = call(three, deadline=NOW + 0.25)
    assert short.header_deadline(NOW) == "250"
    for each in (c, short):
        each.finish()


def test_a_routes_mirror_replaces_the_destinations() -> None:
    """Envoy mirrors per route: reads mirrored to v2, writes not, over a destination default."""
    found, discovery = destination(
        """  services:
    inventory:
      mirror: {to: {version: v3}, percent: 100}
      routes:
        - match: {methods: [GET]}
          to: [{version: v1}]
          mirror: {to: {version: v2}, percent: 100}
        - match: {methods: [DELETE]}
          to: [{version: v1}]
          mirror: {to: {version: v2}, percent: 0}
      endpoints:
        - {url: "http://127.0.0.1:9001", version: v1}
        - {url: "http://127.0.0.1:9002", version: v2}
"""
    )
    reads, deletes, writes = call(found, "GET"), call(found, "DELETE"), call(found, "POST")
    assert (reads.mirrored, reads.mirror_version) == (True, "v2")
    assert not deletes.mirrored  # the route's own 0% wins over the destination's 100%
    assert (writes.mirrored, writes.mirror_version) == (True, "v3")  # no route: the default
    for made in (reads, deletes, writes):
        made.finish()
    discovery.close()
