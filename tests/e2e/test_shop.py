"""The sample shop end to end: the registry and every app as real processes (``Shop``, the
launcher ``mesh demo`` uses), traffic through the gateway only, as a customer would send it.

One shop serves the whole module (starting it takes a few seconds per process on two cores).
The disturbing tests leave it as they found it: a killed instance is started again. Every load
loop is bounded by a count and a deadline.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mesh_middleware.demo.shop import Shop
from mesh_middleware.policy.compiled import compile_policy_file
from mesh_middleware.policy.explain import explain

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 10.0


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shop]:
    with Shop.start(tmp_path_factory.mktemp("shop")) as running:
        yield running
    assert running.leftover() == [], "the shop left processes running"


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=TIMEOUT, trust_env=False) as http:
        yield http


@dataclass
class Outcomes:
    """What a stream of requests got back."""

    statuses: Counter[int | str] = field(default_factory=Counter)
    answers: list[dict[str, Any]] = field(default_factory=list)
    answered_at: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def note(self, status: int | str, answer: dict[str, Any] | None = None) -> None:
        with self.lock:
            self.statuses[status] += 1
            if answer is not None:
                self.answers.append(answer)
                self.answered_at.append(time.monotonic())

    @property
    def total(self) -> int:
        return sum(self.statuses.values())

    def failures(self, ok: int) -> dict[int | str, int]:
        return {status: n for status, n in self.statuses.items() if status != ok}


def send(http: httpx.Client, method: str, url: str, outcomes: Outcomes, **options: Any) -> None:
    try:
        response = http.request(method, url, **options)
    except httpx.HTTPError as exc:
        outcomes.note(type(exc).__name__)
        return
    try:
        body = response.json()
    except ValueError:
        body = {"text": response.text[:200]}
    outcomes.note(response.status_code, body)


def load(
    calls: Callable[[int], tuple[str, str, dict[str, Any]]],
    count: int,
    *,
    seconds: float = 60.0,
    workers: int = 8,
    during: Callable[[], None] | None = None,
    pace: float = 0.0,
    stop: threading.Event | None = None,
) -> Outcomes:
    """``count`` calls (``calls(n)`` gives method, url and options), ``workers`` at a time, each
    worker waiting ``pace`` seconds after each call, stopping at ``seconds`` whatever is left;
    ``during`` runs in this thread meanwhile; no call starts once ``stop`` is set."""
    outcomes = Outcomes()
    deadline = time.monotonic() + seconds
    with httpx.Client(timeout=TIMEOUT, trust_env=False) as http:

        def one(n: int) -> None:
            if time.monotonic() < deadline and not (stop is not None and stop.is_set()):
                method, url, options = calls(n)
                send(http, method, url, outcomes, **options)
                time.sleep(pace)

        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(one, n) for n in range(count)]
            if during is not None:
                during()
            for future in futures:
                future.result()
    return outcomes


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                total += sample.value
    return total


def scrape(shop: Shop, name: str) -> str:
    return httpx.get(shop.metrics_url(name), timeout=TIMEOUT, trust_env=False).text


def wait_until(condition: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


def test_an_unauthorized_call_is_denied_with_its_rule_named(
    shop: Shop, client: httpx.Client
) -> None:
    """The gateway may only read inventory: its reservation is refused by inventory's policy,
    and the answer names the rule that `mesh policy explain` names for the same request."""
    expected = explain(
        compile_policy_file(REPO / "sample_apps" / "inventory" / "policy.yaml"),
        caller="gateway",
        method="POST",
        path="/reserve",
    )
    assert expected["decision"] == "deny" and expected["rule"]
    response = client.post(
        f"{shop.gateway_url}/shop/reserve-direct", json={"item": 1, "quantity": 1}
    )
    assert response.status_code == 403
    body = response.json()
    assert body["by"] == "inventory" and body["rule"] == expected["rule"]
    assert expected["rule"] in body["reason"]
    # The same reservation through orders, which may make it, goes through.
    placed = client.post(f"{shop.gateway_url}/shop/orders", json={"item": 1, "quantity": 1})
    assert placed.status_code == 201, placed.text


def test_the_canary_split_is_observed_within_bounds(shop: Shop) -> None:
    """90/10 between inventory v1 and v2: 800 reads put v2's share within 5-15% (the 10% share
    is more than 4 standard deviations from either bound at this count)."""
    outcomes = load(
        lambda n: ("GET", f"{shop.gateway_url}/shop/items/{n % 5 + 1}", {}), 800, seconds=120
    )
    assert outcomes.failures(200) == {}, outcomes.statuses
    versions = Counter(answer["inventory"]["version"] for answer in outcomes.answers)
    assert set(versions) == {"v1", "v2"}
    share = versions["v2"] / outcomes.total
    assert 0.05 <= share <= 0.15, versions


def test_injected_payment_failures_are_masked_by_retries_within_budget(shop: Shop) -> None:
    """Payments aborts a quarter of the charges that carry `x-chaos: on`; orders retries them
    (they carry an Idempotency-Key) on another instance, within its retry budget."""
    faults_before = sum(
        metric(scrape(shop, name), "mesh_faults_injected_total")
        for name in ("payments-a", "payments-b")
    )
    retries_before = metric(
        scrape(shop, "orders"), "mesh_outbound_retries_total", destination_service="payments"
    )
    orders = load(
        lambda n: (
            "POST",
            f"{shop.gateway_url}/shop/orders",
            {"json": {"item": n % 5 + 1, "quantity": 1}, "headers": {"x-chaos": "on"}},
        ),
        150,
        seconds=120,
        workers=6,
    )
    # Without retries about 38 of 150 would fail; with 3 retries about 0.6 are expected to.
    assert orders.statuses[201] >= 146, orders.statuses
    faults = sum(
        metric(scrape(shop, name), "mesh_faults_injected_total")
        for name in ("payments-a", "payments-b")
    )
    orders_metrics = scrape(shop, "orders")
    retries = metric(orders_metrics, "mesh_outbound_retries_total", destination_service="payments")
    assert faults - faults_before >= 15  # about 50 expected: the faults really were injected
    # Every fault was retried, except the last of an order whose every try failed (its answer
    # is then a 502 naming payments: one such order in 256).
    failed = orders.total - orders.statuses[201]
    assert retries - retries_before >= faults - faults_before - failed
    assert (
        metric(
            orders_metrics,
            "mesh_outbound_retry_budget_exhausted_total",
            destination_service="payments",
        )
        == 0
    )


def test_killing_an_inventory_instance_shifts_traffic_with_no_failed_gets(shop: Shop) -> None:
    """SIGKILL one of the two v1 instances mid-load: every read still succeeds (a connection
    refused or reset is retried on another instance) and its share moves to the other v1."""
    inventory = {i.name: i for i in shop.instances("inventory")}
    victim, other = inventory["inventory-v1-a"], inventory["inventory-v1-b"]
    killed_at: list[float] = []

    def kill_midway() -> None:
        time.sleep(3)
        shop.kill("inventory-v1-a")
        killed_at.append(time.monotonic())

    try:
        # About 80 reads a second for about 8 s: the kill lands in the middle.
        outcomes = load(
            lambda n: ("GET", f"{shop.gateway_url}/shop/items/{n % 5 + 1}", {}),
            640,
            seconds=60,
            workers=4,
            pace=0.05,
            during=kill_midway,
        )
        assert outcomes.failures(200) == {}, outcomes.statuses
        (killed,) = killed_at
        served = [
            (at, answer["inventory"]["instance"])
            for at, answer in zip(outcomes.answered_at, outcomes.answers, strict=True)
        ]
        names = {victim.instance_id: "v1-a", other.instance_id: "v1-b"}
        before = Counter(names.get(i, "v2") for at, i in served if at < killed - 0.5)
        after = Counter(names.get(i, "v2") for at, i in served if at > killed + 1.0)
        assert before["v1-a"] >= 20 and before["v1-b"] >= 20, before  # both served
        assert sum(after.values()) >= 100, "the load ended too soon after the kill"
        assert after["v1-a"] == 0, after
        # Its share went to the other v1 instance, not to the canary.
        assert after["v1-b"] >= 0.75 * sum(after.values()), after
    finally:
        shop.restart("inventory-v1-a")


def test_restarting_the_registry_interrupts_nothing(shop: Shop) -> None:
    """Apps keep serving on what they know while the registry is down and restarting, and
    renew their leases with it once it is back (its store survives restarts; a lease not
    renewed would lapse within the 15 s TTL)."""
    window: list[float] = []
    enough = threading.Event()

    def restart_midway() -> None:
        time.sleep(2)
        window.append(time.monotonic())
        shop.restart_registry()
        window.append(time.monotonic())
        time.sleep(3)  # and some calls after it is back
        enough.set()

    # About 80 calls a second from 2 s before the restart to 3 s after it (at most 90 s).
    outcomes = load(
        lambda n: (
            ("GET", f"{shop.gateway_url}/shop/items/{n % 5 + 1}", {})
            if n % 3
            else ("POST", f"{shop.gateway_url}/shop/orders", {"json": {"item": 2, "quantity": 1}})
        ),
        7200,
        seconds=90,
        workers=4,
        pace=0.05,
        during=restart_midway,
        stop=enough,
    )
    bad = {status: n for status, n in outcomes.statuses.items() if status not in (200, 201)}
    assert bad == {}, outcomes.statuses
    down, up = window
    answered = outcomes.answered_at
    assert sum(down <= at <= up for at in answered) >= 10, "no call overlapped the restart"
    assert sum(at > up + 1.0 for at in answered) >= 50, "the load ended with the restart"
    # Past a whole lease after the restart, every app instance is still registered: each
    # renewed its lease with the new registry process by itself.
    running = {i.instance_id for i in shop.instances()}
    time.sleep(16)
    for service in ("gateway", "orders", "inventory", "payments"):
        registered = {entry["id"] for entry in shop.registered(service)}
        assert {i for i in running if i and i.startswith(service)} <= registered, service
