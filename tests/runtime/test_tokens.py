"""Identity tokens this service presents: prefetch, renewal at half-life, on-demand fetches."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from mesh_middleware import Mesh, TokenIssuer
from mesh_middleware.identity.keys import KeyStore
from mesh_middleware.identity.verifier import TokenVerifier
from mesh_middleware.runtime.registry_client import (
    IssuedToken,
    RegistryRefused,
    RegistryUnavailable,
)
from mesh_middleware.runtime.tokens import TokenCache
from tests.conftest import PolicyWriter
from tests.runtime.fake_registry import FakeRegistry

POLICY = """\
service: orders
outbound:
  services:
    inventory: {}
    payments: {}
"""


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _issued(audience: str, lifetime: float = 600.0, token: str = "t") -> IssuedToken:
    return IssuedToken(f"{token}-{audience}", audience, time.time() + lifetime, lifetime)


def _cache(fetch: Callable[[str, float | None], IssuedToken], clock: Clock) -> TokenCache:
    return TokenCache(fetch, clock=clock, uniform=lambda low, high: high, retry_seconds=10.0)


# -- the cache on its own ------------------------------------------------------------------


def test_a_token_is_due_again_at_half_its_lifetime_and_dropped_at_expiry() -> None:
    """Missing → due; fetched → not due until half-life; past its lifetime → not served."""
    clock = Clock()
    cache = _cache(lambda audience, _: _issued(audience, 100.0), clock)
    assert cache.due(["inventory"]) == ["inventory"]
    assert cache.get("inventory") is None
    assert cache.refresh("inventory") == "t-inventory"
    assert cache.due(["inventory"]) == []
    clock.now += 49.0
    assert cache.due(["inventory"]) == []
    clock.now += 1.0
    assert cache.due(["inventory"]) == ["inventory"]
    assert cache.get("inventory") == "t-inventory"  # still valid: served while renewing
    clock.now += 49.5
    assert cache.get("inventory") is None  # within a second of expiry: not handed out


def test_a_refused_audience_waits_before_it_is_asked_again() -> None:
    """A 4xx for one audience is retried after the retry delay, not every tick."""
    clock = Clock()

    def refuse(audience: str, _: float | None) -> IssuedToken:
        raise RegistryRefused(400, "bad audience")

    cache = _cache(refuse, clock)
    with pytest.raises(RegistryRefused):
        cache.refresh("Not-A-Service")
    assert cache.due(["Not-A-Service"]) == []
    clock.now += 10.0
    assert cache.due(["Not-A-Service"]) == ["Not-A-Service"]


def test_a_refused_audience_is_not_fetched_again_on_a_callers_thread() -> None:
    """After a refusal, on-demand callers get None at once until the retry delay has passed."""
    clock = Clock()
    calls: list[str] = []

    def refuse(audience: str, _: float | None) -> IssuedToken:
        calls.append(audience)
        raise RegistryRefused(403, "not yours")

    cache = _cache(refuse, clock)
    assert cache.fetch_now("inventory") is None
    for _ in range(50):
        assert cache.fetch_now("inventory") is None
    assert calls == ["inventory"]
    clock.now += 10.0
    assert cache.fetch_now("inventory") is None
    assert calls == ["inventory", "inventory"]


def test_an_outage_is_retried_at_the_link_s_pace() -> None:
    """Unavailable is not a refusal: the audience stays due (the link backs off instead)."""
    clock = Clock()

    def down(audience: str, _: float | None) -> IssuedToken:
        raise RegistryUnavailable("connection refused")

    cache = _cache(down, clock)
    assert cache.fetch_now("inventory") is None
    assert cache.due([]) == ["inventory"]  # asked for once: kept in the background set


def test_concurrent_callers_share_one_fetch() -> None:
    """Eight threads asking for one audience at once cause one call to the registry."""
    release = threading.Event()
    calls: list[str] = []

    def slow(audience: str, _: float | None) -> IssuedToken:
        calls.append(audience)
        release.wait(5)
        return _issued(audience)

    cache = TokenCache(slow)
    results: list[str | None] = []
    threads = [
        threading.Thread(target=lambda: results.append(cache.fetch_now("inventory", 5.0)))
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    time.sleep(0.2)
    release.set()
    for thread in threads:
        thread.join(5)
    assert calls == ["inventory"]
    assert results == ["t-inventory"] * 8


def test_a_caller_joining_a_slow_fetch_gives_up_after_its_wait() -> None:
    """The wait is bounded for callers who join a fetch under way, too."""
    release = threading.Event()

    def slow(audience: str, _: float | None) -> IssuedToken:
        release.wait(5)
        return _issued(audience)

    cache = TokenCache(slow)
    owner = threading.Thread(target=lambda: cache.fetch_now("inventory", 5.0))
    owner.start()
    time.sleep(0.05)
    started = time.monotonic()
    assert cache.fetch_now("inventory", 0.2) is None
    assert time.monotonic() - started < 0.5
    release.set()
    owner.join(5)
    assert cache.get("inventory") == "t-inventory"


# -- through the Mesh, against a registry -----------------------------------------------------


@pytest.fixture
def registry(issuer: TokenIssuer) -> Iterator[FakeRegistry]:
    fake = FakeRegistry(issuer, join_tokens={"jt-orders": "orders"}, token_lifetime=4).start()
    yield fake
    fake.stop()


@pytest.fixture
def mesh(registry: FakeRegistry, write_policy: PolicyWriter) -> Iterator[Mesh]:
    mesh = Mesh(
        write_policy(POLICY),
        registry_url=registry.url,
        join_token="jt-orders",
        advertise="127.0.0.1:8200",
    )
    yield mesh
    mesh.close()


def _posts(registry: FakeRegistry, audience: str) -> list[Any]:
    return [c for c in registry.calls_to("POST") if c.body["audience"] == audience]


def _claims(token: str, audience: str, issuer: TokenIssuer) -> str:
    keys = KeyStore(keys={issuer.kid: issuer.key})
    return TokenVerifier(keys).verify(token, f"spiffe://mesh.local/svc/{audience}").service


def test_outbound_audiences_are_prefetched_and_renewed_at_half_life(
    registry: FakeRegistry, mesh: Mesh, issuer: TokenIssuer
) -> None:
    """Every service under outbound.services gets a token at start, renewed at ~50%."""
    mesh.start()
    assert registry.wait_for(
        lambda: _posts(registry, "inventory") and _posts(registry, "payments"), 2.0
    )
    token = mesh.identity_token("inventory", wait=0)
    assert token is not None
    assert _claims(token, "inventory", issuer) == "orders"
    assert all(c.authorization == "Bearer jt-orders" for c in registry.calls_to("POST"))
    assert registry.wait_for(lambda: len(_posts(registry, "inventory")) >= 3, 6.0)
    times = [c.at for c in _posts(registry, "inventory")]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(1.5 <= gap <= 2.8 for gap in gaps), gaps  # 4 s lifetime: renewed at 1.8-2 s
    renewed = mesh.identity_token("inventory", wait=0)
    assert renewed is not None and renewed != token


def test_an_audience_not_cached_is_fetched_on_demand_and_then_renewed(
    registry: FakeRegistry, mesh: Mesh
) -> None:
    """identity_token() fetches what it does not hold, and keeps it fresh from then on."""
    token = mesh.identity_token("billing")
    assert token is not None
    assert len(_posts(registry, "billing")) == 1
    assert mesh.identity_token("billing") == token  # cached now
    mesh.start()
    assert registry.wait_for(lambda: len(_posts(registry, "billing")) >= 2, 3.0)


def test_an_on_demand_fetch_waits_only_briefly(registry: FakeRegistry, mesh: Mesh) -> None:
    """A slow registry: the caller gets None within about its wait; the background thread
    fetches the token later."""
    registry.token_delay = 1.0
    started = time.monotonic()
    assert mesh.identity_token("shipping", wait=0.3) is None
    assert time.monotonic() - started < 0.9
    mesh.start()
    assert registry.wait_for(lambda: mesh.identity_token("shipping", wait=0) is not None, 5.0)


def test_tokens_are_kept_through_an_outage(registry: FakeRegistry, mesh: Mesh) -> None:
    """Registry down: cached tokens are still handed out while valid; an uncached audience
    answers None at once instead of waiting on a registry known to be down."""
    registry.token_lifetime = 600
    mesh.start()
    assert registry.wait_for(lambda: mesh.identity_token("inventory", wait=0) is not None, 2.0)
    cached = mesh.identity_token("inventory")
    registry.stop()
    assert registry.wait_for(lambda: not mesh.registry_connected, 8.0)
    assert mesh.identity_token("inventory") == cached
    started = time.monotonic()
    assert mesh.identity_token("never-seen", wait=2.0) is None
    assert time.monotonic() - started < 0.1
    registry.start()
    assert registry.wait_for(lambda: mesh.identity_token("never-seen", wait=0) is not None, 12.0)


def test_a_process_that_only_calls_others_renews_its_tokens(
    registry: FakeRegistry, mesh: Mesh
) -> None:
    """No middleware, so never started (nothing to register): tokens its clients fetched are
    still renewed in the background at half-life, and it never registers."""
    token = mesh.identity_token("billing")
    assert token is not None
    assert registry.wait_for(lambda: len(_posts(registry, "billing")) >= 2, 4.0)
    assert mesh.identity_token("billing", wait=0) is not None
    assert not registry.calls_to("PUT")
