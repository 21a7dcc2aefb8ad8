"""What the sample apps' tests share: policies with static endpoints, the real upstream
processes, an ASGI lifespan driver and a metrics reader."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from mesh_middleware import TokenIssuer
from tests.support.servers import free_port, gunicorn_argv, running, uvicorn_argv

REPO = Path(__file__).resolve().parents[2]
APPS = ("gateway", "orders", "inventory", "payments")
POLICIES = {name: REPO / "sample_apps" / name / "policy.yaml" for name in APPS}


class _Loader(yaml.SafeLoader):
    """YAML as the policy loader reads it: `on:` is a key (retries' `on`), not YAML 1.1's True."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|false|False)$"), list("tTfF")
)

LIFESPAN_SECONDS = 30.0
"""How long a lifespan startup or shutdown may take."""

Endpoints = Mapping[str, Sequence[tuple[str, str | None]]]
"""Per destination service: ``(url, version)`` of each static instance."""


def derive_policy(
    app: str,
    out: Path,
    endpoints: Endpoints | None = None,
    edit: Callable[[dict[str, Any]], None] | None = None,
) -> Path:
    """The app's real policy file with static ``endpoints`` added (and ``edit`` applied),
    written to ``out``: routes, retries and rules stay as the sample app ships them."""
    document = yaml.load(POLICIES[app].read_text(), Loader=_Loader)
    services = document.setdefault("outbound", {}).setdefault("services", {})
    for service, instances in (endpoints or {}).items():
        section = services.setdefault(service, {})
        section["endpoints"] = [
            {"url": url, **({"version": version} if version else {})} for url, version in instances
        ]
    if edit is not None:
        edit(document)
    out.write_text(yaml.safe_dump(document, sort_keys=False))
    return out


def chaos_percent(percent: int) -> Callable[[dict[str, Any]], None]:
    """An ``edit`` for payments' policy: its chaos fault aborts ``percent`` of the time."""

    def edit(document: dict[str, Any]) -> None:
        (fault,) = document["inbound"]["faults"]
        fault["abort"]["percent"] = percent

    return edit


def url(port: int) -> str:
    return f"http://127.0.0.1:{port}"


@asynccontextmanager
async def lifespan(app: Callable[..., Any]) -> AsyncIterator[None]:
    """Run an ASGI app's lifespan startup, then its shutdown on exit, as uvicorn does."""
    to_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    from_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    task = asyncio.create_task(app(scope, to_app.get, from_app.put))
    await to_app.put({"type": "lifespan.startup"})
    started = await asyncio.wait_for(from_app.get(), LIFESPAN_SECONDS)
    assert started["type"] == "lifespan.startup.complete", started
    try:
        yield
    finally:
        await to_app.put({"type": "lifespan.shutdown"})
        stopped = await asyncio.wait_for(from_app.get(), LIFESPAN_SECONDS)
        await asyncio.wait_for(task, LIFESPAN_SECONDS)
        assert stopped["type"] == "lifespan.shutdown.complete", stopped


def metric(page: str, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` on a metrics page whose labels include these."""
    total = 0.0
    for family in text_string_to_metric_families(page):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def scrape(port: int) -> str:
    """A server process's metrics page."""
    return httpx.get(f"{url(port)}/metrics", timeout=10).text


def pid_of(port: int) -> str:
    """The pid a server reports in ``/healthz``: the instance name when it has no registry."""
    return str(httpx.get(f"{url(port)}/healthz", timeout=10).json()["pid"])


@dataclass
class Shop:
    """Real upstream processes, all on 127.0.0.1, trusting tokens minted by ``issuer``.

    - ``inventory_v1`` / ``inventory_v2``: ``sample_apps.inventory.app`` with its real policy
      (strict), ``MESH_VERSION`` v1 and v2;
    - ``payments_steady`` / ``payments_chaos``: ``sample_apps.payments.app`` with its real
      policy, the chaos fault set to 0% and 100%;
    - ``orders``: the real orders app under gunicorn (2 workers), calling the two inventories
      and ``payments_chaos`` only.
    """

    issuer: TokenIssuer
    jwks: Path
    work: Path
    inventory_v1: int
    inventory_v2: int
    payments_steady: int
    payments_chaos: int
    orders: int

    def inventory_endpoints(self) -> list[tuple[str, str | None]]:
        return [(url(self.inventory_v1), "v1"), (url(self.inventory_v2), "v2")]


@contextmanager
def running_shop(work: Path) -> Iterator[Shop]:
    """Start the upstream processes of :class:`Shop`; stop them all on exit."""
    issuer = TokenIssuer()
    jwks = work / "jwks.json"
    jwks.write_text(json.dumps(issuer.jwks()))
    key = work / "issuer-key.json"
    issuer.save_private_key(key)
    ports = {name: free_port() for name in ("inv1", "inv2", "steady", "chaos", "orders")}
    trust = {"MESH_JWKS": str(jwks)}
    steady = derive_policy("payments", work / "payments-steady.yaml", edit=chaos_percent(0))
    chaos = derive_policy("payments", work / "payments-chaos.yaml", edit=chaos_percent(100))
    orders = derive_policy(
        "orders",
        work / "orders.yaml",
        {
            "inventory": [(url(ports["inv1"]), "v1"), (url(ports["inv2"]), "v2")],
            "payments": [(url(ports["chaos"]), None)],
        },
    )
    inventory = str(POLICIES["inventory"])
    processes = [
        ("inv1", "sample_apps.inventory.app:app", {"MESH_POLICY": inventory, "MESH_VERSION": "v1"}),
        ("inv2", "sample_apps.inventory.app:app", {"MESH_POLICY": inventory, "MESH_VERSION": "v2"}),
        ("steady", "sample_apps.payments.app:app", {"MESH_POLICY": str(steady)}),
        ("chaos", "sample_apps.payments.app:app", {"MESH_POLICY": str(chaos)}),
    ]
    with ExitStack() as stack:
        for name, app, env in processes:
            stack.enter_context(
                running(
                    uvicorn_argv(app, ports[name]),
                    port=ports[name],
                    env={**trust, **env},
                    log_path=work / f"{name}.log",
                )
            )
        orders_env = {**trust, "MESH_POLICY": str(orders), "SHOP_TEST_ISSUER_KEY": str(key)}
        stack.enter_context(
            running(
                gunicorn_argv("tests.sample_apps.orders_upstream:app", ports["orders"]),
                port=ports["orders"],
                env=orders_env,
                log_path=work / "orders.log",
            )
        )
        yield Shop(
            issuer=issuer,
            jwks=jwks,
            work=work,
            inventory_v1=ports["inv1"],
            inventory_v2=ports["inv2"],
            payments_steady=ports["steady"],
            payments_chaos=ports["chaos"],
            orders=ports["orders"],
        )
