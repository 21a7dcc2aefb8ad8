"""The registry's dashboard in a real browser: Debian's Chromium (``/usr/bin/chromium``,
headless), driven by Playwright for Python, against the sample shop with the demo's traffic.

What a user would check by looking: every running service is in the graph, a denial is listed
with its rule, a fault injected by editing a policy turns its edge's success rate down within
seconds, a service's instances and an edge's latency chart open on a click; and what a user
would not see but must hold: the page asks nothing of any host but the registry, and an idle
page makes almost no requests. Screenshots are kept in ``$MESH_TEST_ARTIFACTS`` (default
``test-artifacts/`` in the checkout).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.sync_api import Browser, Page, Playwright, sync_playwright

from mesh_middleware.demo.shop import SHOP_APPS, AppSpec, Shop
from mesh_middleware.demo.traffic import TrafficGenerator
from mesh_middleware.telemetry.reports import EdgeReporter
from tests.registry.support import Registry, body, instance_path, start_registry

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
# Without the background-networking switches Chromium calls Google's hosts at start.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
]
VIEWPORT = {"width": 1400, "height": 900}
TRAFFIC_SECONDS = 150.0  # a cap: the fixture stops it when the module is done
FAULT = """
  faults:
    - name: outage-drill
      match:
        from: [gateway]
        paths: [/items/*]
      abort: {status: 503, percent: 100}
"""


def artifacts() -> Path:
    where = Path(os.environ.get("MESH_TEST_ARTIFACTS") or REPO / "test-artifacts")
    where.mkdir(parents=True, exist_ok=True)
    return where


@dataclass(frozen=True, slots=True)
class _OwnPolicy(AppSpec):
    """An app of the shop whose policy file is a copy the test may edit."""

    policy_file: str = ""

    @property
    def policy(self) -> str:
        return self.policy_file


@dataclass
class Running:
    shop: Shop
    inventory_policy: Path
    traffic: TrafficGenerator


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    work = tmp_path_factory.mktemp("dashboard-shop")
    policy = work / "inventory-policy.yaml"
    policy.write_text((REPO / "sample_apps/inventory/policy.yaml").read_text())
    apps = [
        _OwnPolicy(s.name, s.service, s.module, s.version, s.workers, str(policy))
        if s.service == "inventory"
        else s
        for s in SHOP_APPS
    ]
    with Shop.start(work / "shop", apps=apps) as shop:
        traffic = TrafficGenerator(shop.gateway_url, rate=20.0)
        traffic.start(TRAFFIC_SECONDS)
        try:
            yield Running(shop, policy, traffic)
        finally:
            traffic.stop()
    assert shop.leftover() == []


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert os.access(CHROMIUM, os.X_OK), f"{CHROMIUM} is missing: apt-get install chromium"
    with sync_playwright() as playwright:
        yield _launch(playwright)


def _launch(playwright: Playwright) -> Browser:
    return playwright.chromium.launch(
        executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS, timeout=60_000
    )


class Watched:
    """A page and every request it made, with the errors it logged."""

    def __init__(self, browser: Browser) -> None:
        self.context = browser.new_context(viewport=VIEWPORT)  # type: ignore[arg-type]
        self.page: Page = self.context.new_page()
        self.requests: list[tuple[float, str]] = []
        self.errors: list[str] = []
        self.page.on("request", lambda r: self.requests.append((time.monotonic(), r.url)))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)

    def close(self) -> None:
        self.context.close()

    def hosts(self) -> set[str]:
        return {urlsplit(url).netloc for _, url in self.requests if not url.startswith("data:")}

    def since(self, moment: float) -> list[str]:
        return [url for at, url in self.requests if at >= moment]


def _open(browser: Browser, registry_url: str, login_url: str) -> Watched:
    watched = Watched(browser)
    watched.page.goto(login_url)
    watched.page.wait_for_selector("#topology g.node", timeout=20_000)
    assert watched.page.url == f"{registry_url}/ui/"  # the token left the address bar
    return watched


def _edge(page: Page, source: str, destination: str) -> Any:
    return page.locator(f'g.edge[data-source="{source}"][data-destination="{destination}"]')


def test_the_shop_live_in_the_dashboard(running: Running, browser: Browser) -> None:
    shop = running.shop
    registry = shop.registry_url
    watched = _open(browser, registry, shop.dashboard_url)  # the link `mesh demo` prints
    page = watched.page
    try:
        # Every service of the shop is in the graph, and the anonymous customers calling in.
        for service in sorted({spec.service for spec in SHOP_APPS} | {"anonymous"}):
            page.wait_for_selector(f'g.node[data-service="{service}"]', timeout=20_000)
        # The gateway's reserve-direct calls are refused by inventory's deny rule.
        denial = page.wait_for_selector(
            '#denials tr[data-rule="reserve-only-orders"]', timeout=20_000
        )
        assert denial is not None and "reserve-only-orders" in denial.inner_text()
        gateway_inventory = _edge(page, "gateway", "inventory")
        gateway_inventory.wait_for(timeout=20_000)
        before = float(gateway_inventory.get_attribute("data-success-rate") or "nan")
        assert before >= 0.99, f"gateway -> inventory before the fault: {before}"

        # An idle page (no clicks): its one event stream stays open and nothing else is asked.
        quiet_from = time.monotonic()
        time.sleep(20)
        idle = watched.since(quiet_from)
        assert len(idle) <= 1, idle

        # Inject a failure: inventory aborts every item read of the gateway's.
        injected = time.monotonic()
        with running.inventory_policy.open("a") as policy:
            policy.write(FAULT)
        page.wait_for_function(
            """() => {
                const edge = document.querySelector(
                    'g.edge[data-source="gateway"][data-destination="inventory"]');
                const rate = edge && edge.getAttribute('data-success-rate');
                return rate !== null && rate !== '' && Number(rate) < 0.95;
            }""",
            timeout=30_000,
            polling=250,
        )
        took = time.monotonic() - injected
        print(f"\ngateway -> inventory went below 95% success {took:.1f} s after the fault")
        assert took < 15
        assert "bad" in (gateway_inventory.get_attribute("class") or "")
        faults = page.wait_for_selector(
            '#faults tr[data-source="gateway"][data-destination="inventory"]', timeout=10_000
        )
        assert faults is not None

        # A service's instances, with version, zone, health and lease age.
        page.click('g.node[data-service="inventory"]')
        detail = page.wait_for_selector("#service-detail", state="visible")
        assert detail is not None
        text = detail.inner_text()
        for word in ("v1", "v2", "renewed"):
            assert word in text, text
        assert len(shop.registered("inventory")) == 3
        # An edge's golden metrics and latency chart.
        gateway_inventory.locator("text.edge-label").click()
        edge_detail = page.wait_for_selector("#edge-detail", state="visible")
        assert edge_detail is not None and "5xx" in edge_detail.inner_text()
        page.wait_for_selector("#edge-detail svg.latency-chart path.series")
        shot = artifacts() / "dashboard.png"
        page.screenshot(path=str(shot), full_page=True)
        print(f"screenshot: {shot}")

        assert watched.hosts() == {urlsplit(registry).netloc}, watched.hosts()
        assert watched.errors == []
    finally:
        watched.close()


def test_fifty_services_stay_legible(tmp_path: Path, browser: Browser) -> None:
    """50 registered services with 100 edges: every node is drawn, inside the graph, without
    overlapping another, and the page is up within seconds."""
    names = [f"svc-{i:02d}" for i in range(50)]
    with start_registry(tmp_path / "data") as registry, httpx.Client(timeout=10) as http:
        _populate(http, registry, names)
        began = time.monotonic()
        login = f"{registry.url}/ui/login?token={registry.viewer_token}"
        watched = _open(browser, registry.url, login)
        try:
            page = watched.page
            page.wait_for_function("document.querySelectorAll('#topology g.node').length >= 50")
            took = time.monotonic() - began
            assert took < 10
            boxes = [
                page.locator(f'g.node[data-service="{name}"]').bounding_box() for name in names
            ]
            # Never shrunk to illegible: at least 80% of its natural 156 px (scrolls instead).
            assert all(box is not None and box["width"] >= 124 for box in boxes), boxes
            for i, a in enumerate(boxes):
                for b in boxes[i + 1 :]:
                    assert a is not None and b is not None
                    assert not _overlap(a, b), (a, b)
            assert page.locator("#topology g.edge").count() == 100
            page.screenshot(path=str(artifacts() / "dashboard-50-services.png"))
            assert watched.errors == []
        finally:
            watched.close()


def _populate(http: httpx.Client, registry: Registry, names: list[str]) -> None:
    admin = registry.admin()
    for i, name in enumerate(names):
        answer = http.put(
            f"{registry.url}{instance_path(name, f'{name}-1')}",
            json=body(9000 + i, version="v1", zone=f"zone-{i % 3}", ttl=600),
            headers=admin,
        )
        assert answer.status_code == 200, answer.text
    for i, name in enumerate(names):
        reporter = EdgeReporter(lambda body: None, service=name)
        for step in (1, 7):  # two callees each: 100 edges
            callee = names[(i + step) % len(names)]
            for n in range(20):
                reporter.record(name, callee, 503 if n < i % 4 else 200, 0.01 * step)
        report = reporter.flush()
        answer = http.post(f"{registry.url}/v1/telemetry/reports", json=report, headers=admin)
        assert answer.status_code == 202, answer.text


def _overlap(a: Any, b: Any) -> bool:
    return bool(
        a["x"] < b["x"] + b["width"]
        and b["x"] < a["x"] + a["width"]
        and a["y"] < b["y"] + b["height"]
        and b["y"] < a["y"] + a["height"]
    )
