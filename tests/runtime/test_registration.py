"""The Mesh runtime against a registry: registration, leases, trust, outages, shutdown.

The registry here is a small fake served by a real HTTP server on 127.0.0.1 (see
fake_registry.py), so it can be stopped and brought back on the same port.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from structlog.testing import capture_logs

from mesh_middleware import Mesh, MeshMiddleware, MeshWSGIMiddleware, TokenIssuer, get_caller
from mesh_middleware.runtime.registry_client import TrustBundle
from mesh_middleware.telemetry import metrics
from tests.conftest import PolicyWriter
from tests.runtime.fake_registry import FakeRegistry
from tests.support.policies import SERVER_POLICY
from tests.support.servers import REPO, free_port, stop, uvicorn_argv

POLICY = """\
service: inventory
version: v2
zone: eu-1
inbound:
  authentication: strict
  public: [/healthz]
outbound:
  services:
    orders: {}
"""

JOIN_TOKEN = "jt-inventory"


@pytest.fixture
def registry(issuer: TokenIssuer) -> Iterator[FakeRegistry]:
    fake = FakeRegistry(issuer, join_tokens={JOIN_TOKEN: "inventory"}).start()
    yield fake
    fake.stop()


MeshFactory = Callable[..., Mesh]


@pytest.fixture
def registry_mesh(write_policy: PolicyWriter) -> Iterator[MeshFactory]:
    """Build Meshes that talk to a registry (closed after the test)."""
    made: list[Mesh] = []

    def make(registry: FakeRegistry, **options: Any) -> Mesh:
        options.setdefault("join_token", JOIN_TOKEN)
        options.setdefault("advertise", "127.0.0.1:8123")
        policy = options.pop("policy", None) or write_policy(POLICY)
        mesh = Mesh(policy, registry_url=registry.url, **options)
        made.append(mesh)
        return mesh

    yield make
    for mesh in made:
        mesh.close()


def _app(mesh: Mesh, events: list[str], *, fail_startup: bool = False) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        events.append("startup")
        if fail_startup:
            raise RuntimeError("the app could not start")
        yield
        events.append("shutdown")

    async def items(request: Request) -> JSONResponse:
        caller = get_caller(request)
        return JSONResponse({"caller": caller.service if caller else None})

    app = Starlette(routes=[Route("/items", items)], lifespan=lifespan)
    app.add_middleware(MeshMiddleware, mesh=mesh)
    return app


class _Served:
    """An app served by uvicorn in a thread, with a client for it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5)

    def get(self, path: str, token: str | None = None) -> httpx.Response:
        headers = {"x-mesh-identity": token} if token else {}
        return self.http.get(path, headers=headers)


@contextlib.contextmanager
def serving(app: Starlette, *, lifespan: str = "on") -> Iterator[_Served]:
    """Serve ``app`` with uvicorn in a thread: real lifespan startup and shutdown."""
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, lifespan=lifespan, log_level="critical"
    )
    server = uvicorn.Server(config)

    def run() -> None:
        with contextlib.suppress(SystemExit):  # uvicorn exits when the app fails to start
            server.run()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        _wait(lambda: server.started or not thread.is_alive(), 10.0)
        if not server.started:
            raise RuntimeError("the app did not start")
        served = _Served(port)
        with served.http:
            yield served
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def _wait(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


INSTANCE = ("inventory", "inventory-127.0.0.1-8123")
INSTANCE_PATH = "/v1/catalog/services/inventory/instances/inventory-127.0.0.1-8123"


def test_lifespan_registers_within_two_seconds_renews_and_deregisters(
    registry: FakeRegistry, registry_mesh: MeshFactory, issuer: TokenIssuer
) -> None:
    """Startup registers (join token, policy's version and zone, pid, TTL), renewals follow
    every third of the TTL, shutdown deregisters; the app's own lifespan runs unchanged."""
    mesh = registry_mesh(registry, registration_ttl="3s")
    events: list[str] = []
    started = time.monotonic()
    with serving(_app(mesh, events)) as client:
        assert events == ["startup"]
        assert registry.wait_for(lambda: registry.calls_to("PUT"), 2.0)
        first = registry.calls_to("PUT")[0]
        assert first.at - started < 2.0  # uvicorn's own startup included
        assert first.path == INSTANCE_PATH
        assert first.authorization == f"Bearer {JOIN_TOKEN}"
        body = dict(first.body)
        metadata = body.pop("metadata")
        assert body == {
            "address": "127.0.0.1",
            "port": 8123,
            "version": "v2",
            "zone": "eu-1",
            "ttl": "3s",
        }
        assert metadata["pid"] == str(os.getpid())
        assert set(metadata) == {"pid", "framework"}
        assert mesh.instance_id == INSTANCE[1]
        assert mesh.registry_connected
        assert mesh.registry_stale_seconds == 0.0
        # Renewals: the same call every ttl/3 (0.8-1 s here).
        assert registry.wait_for(lambda: len(registry.calls_to("PUT")) >= 4, 5.0)
        times = [c.at for c in registry.calls_to("PUT")]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert all(0.5 < gap < 1.7 for gap in gaps), gaps
        assert {c.path for c in registry.calls_to("PUT")} == {INSTANCE_PATH}
        token = issuer.mint("orders", "inventory")
        answer = client.get("/items", token)
        assert answer.status_code == 200
        assert answer.json() == {"caller": "orders"}
    assert events == ["startup", "shutdown"]
    assert [(c.path, c.status) for c in registry.calls_to("DELETE")] == [(INSTANCE_PATH, 200)]
    assert INSTANCE not in registry.instances
    renewals = len(registry.calls_to("PUT"))
    time.sleep(1.5)
    assert len(registry.calls_to("PUT")) == renewals  # nothing runs after shutdown


def test_a_second_lifespan_registers_again(
    registry: FakeRegistry, registry_mesh: MeshFactory
) -> None:
    """stop() then start() (a server restarting its app in-process) registers once more."""
    mesh = registry_mesh(registry)
    for _ in range(2):
        with serving(_app(mesh, [])):
            assert registry.wait_for(lambda: INSTANCE in registry.instances, 2.0)
        assert INSTANCE not in registry.instances
    assert len(registry.calls_to("DELETE")) == 2


def test_an_app_that_fails_to_start_is_never_registered(
    registry: FakeRegistry, registry_mesh: MeshFactory
) -> None:
    """Registration waits for lifespan.startup.complete: no instance for a broken app."""
    mesh = registry_mesh(registry)
    events: list[str] = []
    with (
        pytest.raises(RuntimeError, match="did not start"),
        serving(_app(mesh, events, fail_startup=True)),
    ):
        pass
    assert events == ["startup"]
    time.sleep(1.0)
    assert registry.calls_to("PUT") == []


def test_without_lifespan_the_first_request_starts_it(
    registry: FakeRegistry, registry_mesh: MeshFactory
) -> None:
    """A server with lifespan off: nothing is registered until the first request."""
    mesh = registry_mesh(registry)
    with serving(_app(mesh, []), lifespan="off") as client:
        time.sleep(0.7)
        assert registry.calls_to("PUT") == []
        assert client.get("/healthz").status_code == 404
        assert registry.wait_for(lambda: INSTANCE in registry.instances, 2.0)


def test_a_wsgi_app_registers_without_waiting_for_a_request(
    registry: FakeRegistry, registry_mesh: MeshFactory
) -> None:
    """WSGI has no startup hook: wrapping the app starts the runtime."""
    mesh = registry_mesh(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        start_response("200 OK", [])
        return [b"ok"]

    MeshWSGIMiddleware(app, mesh=mesh)
    assert registry.wait_for(lambda: INSTANCE in registry.instances, 2.0)
    mesh.stop()
    assert INSTANCE not in registry.instances


def test_a_dev_registry_gets_no_authorization_header(
    registry: FakeRegistry, registry_mesh: MeshFactory
) -> None:
    """Without a join token the header is left out, and token requests name the service."""
    registry.join_tokens.clear()  # dev mode: any service, no credential
    mesh = registry_mesh(registry, join_token=None)
    mesh.start()
    assert registry.wait_for(lambda: INSTANCE in registry.instances, 2.0)
    assert registry.wait_for(lambda: registry.calls_to("POST"), 2.0)
    assert all(c.authorization is None for c in registry.calls)
    body = dict(registry.calls_to("POST")[0].body)
    # The token binds this process's key for forwarding end users (cnf): public parts only.
    assert set(body.pop("cnf")) == {"kty", "crv", "x"}
    assert body == {"audience": "orders", "service": "inventory"}


def test_a_refused_join_token_is_logged_once_and_retried(
    registry: FakeRegistry, registry_mesh: MeshFactory
) -> None:
    """A 401 is a configuration problem, not an outage: logged once, retried slowly."""
    with capture_logs() as logs:
        mesh = registry_mesh(registry, join_token="wrong")
        mesh.start()
        assert registry.wait_for(lambda: len(registry.calls_to("PUT")) >= 1, 2.0)
        time.sleep(1.0)
    refused = [e for e in logs if e["event"] == "registry_refused" and e["call"] == "register"]
    assert len(refused) == 1
    assert refused[0]["status"] == 401
    assert len(registry.calls_to("PUT")) == 1  # retried after the backoff cap, not every tick
    assert mesh.registry_connected
    assert mesh.instance_id is None


def test_nothing_verifies_until_the_registry_first_answers(
    write_policy: PolicyWriter,
) -> None:
    """Fail closed: no trust, no keys, 401 — until the registry answers; then its trust
    domain, issuer and JWKS are used, without a restart."""
    issuer = TokenIssuer(trust_domain="shop.internal")
    registry = FakeRegistry(issuer, trust_domain="shop.internal")  # not started yet
    mesh = Mesh(write_policy(POLICY), registry_url=registry.url, advertise="127.0.0.1:8123")
    try:
        token = issuer.mint("orders", "inventory")
        with serving(_app(mesh, [])) as client:
            assert client.get("/items", token).status_code == 401
            assert not mesh.registry_connected
            assert mesh.registry_stale_seconds > 0
            registry.start()
            assert _wait(lambda: mesh.registry_connected, 12.0)
            assert mesh.spiffe_id == "spiffe://shop.internal/svc/inventory"
            assert _wait(lambda: client.get("/items", token).status_code == 200, 2.0)
    finally:
        mesh.close()
        registry.stop()


def test_an_outage_keeps_serving_and_the_instance_comes_back(
    registry: FakeRegistry, registry_mesh: MeshFactory, issuer: TokenIssuer
) -> None:
    """Registry down: cached keys keep verifying (even tokens never seen), the outage is
    logged once and shows as stale; registry back with an empty store: re-registered."""
    mesh = registry_mesh(registry, registration_ttl="3s")
    connected = metrics.REGISTRY_CONNECTED.labels("inventory")
    stale = metrics.REGISTRY_STALE_SECONDS.labels("inventory")
    with capture_logs() as logs, serving(_app(mesh, [])) as client:
        assert registry.wait_for(lambda: INSTANCE in registry.instances, 2.0)
        assert _wait(lambda: connected._value.get() == 1, 2.0)
        registry.stop()
        assert _wait(lambda: not mesh.registry_connected, 3.0)
        fresh = issuer.mint("orders", "inventory")
        assert client.get("/items", fresh).status_code == 200
        time.sleep(2.0)
        assert mesh.registry_stale_seconds >= 1.5
        assert connected._value.get() == 0
        assert stale._value.get() >= 1.0
        registry.forget()
        registry.start()
        assert registry.wait_for(lambda: INSTANCE in registry.instances, 12.0)
        assert _wait(lambda: mesh.registry_connected, 2.0)
        assert mesh.registry_stale_seconds == 0.0
    unreachable = [e for e in logs if e["event"] == "registry_unreachable"]
    assert len(unreachable) == 1
    assert unreachable[0]["log_level"] == "warning"
    assert [e for e in logs if e["event"] == "registry_reconnected"]


def test_a_reload_naming_another_service_moves_the_registration(
    registry: FakeRegistry, registry_mesh: MeshFactory, write_policy: PolicyWriter
) -> None:
    """The instance follows the policy: the old service's instance is removed."""
    registry.join_tokens.clear()
    path = write_policy(POLICY)
    mesh = registry_mesh(registry, join_token=None, policy=path)
    mesh.start()
    assert registry.wait_for(lambda: INSTANCE in registry.instances, 2.0)
    path.write_text(POLICY.replace("service: inventory", "service: stock"))
    assert mesh.reload_policy()
    moved = ("stock", "stock-127.0.0.1-8123")
    assert registry.wait_for(lambda: moved in registry.instances, 2.0)
    assert INSTANCE not in registry.instances


def test_from_env_reads_the_registry_variables(
    monkeypatch: pytest.MonkeyPatch, registry: FakeRegistry, write_policy: PolicyWriter
) -> None:
    """MESH_REGISTRY_URL, MESH_JOIN_TOKEN and MESH_ADVERTISE configure the registry link."""
    monkeypatch.setenv("MESH_POLICY", str(write_policy(POLICY)))
    monkeypatch.setenv("MESH_REGISTRY_URL", registry.url)
    monkeypatch.setenv("MESH_JOIN_TOKEN", JOIN_TOKEN)
    monkeypatch.setenv("MESH_ADVERTISE", "10.1.2.3:9000")
    with Mesh.from_env() as mesh:
        assert mesh.registry_url == registry.url
        mesh.start()
        key = ("inventory", "inventory-10.1.2.3-9000")
        assert registry.wait_for(lambda: key in registry.instances, 2.0)
        assert registry.calls_to("PUT")[0].authorization == f"Bearer {JOIN_TOKEN}"
    assert key not in registry.instances  # close() deregisters


def test_a_bad_advertise_value_stops_the_app_from_starting(write_policy: PolicyWriter) -> None:
    """Configuration errors surface at construction, not in a background log."""
    with pytest.raises(ValueError, match="MESH_ADVERTISE"):
        Mesh(write_policy(POLICY), registry_url="http://127.0.0.1:1", advertise="nonsense")
    with pytest.raises(ValueError, match="http"):
        Mesh(write_policy(POLICY), registry_url="127.0.0.1:7400")


def test_standalone_meshes_do_none_of_this(
    write_policy: PolicyWriter, make_mesh: MeshFactory
) -> None:
    """Without a registry, start/stop are no-ops and the policy watch keeps running."""
    mesh = make_mesh(write_policy(POLICY))
    mesh.start()
    mesh.stop()
    assert mesh._loop is not None and mesh._loop.running
    assert not mesh.registry_connected
    assert mesh.registry_stale_seconds == 0.0
    assert mesh.identity_token("orders") is None
    assert mesh.instance_id is None


# -- a real app process --------------------------------------------------------------------


@pytest.mark.slow
def test_a_real_app_keeps_serving_through_a_registry_restart(
    tmp_path: Path, registry: FakeRegistry, issuer: TokenIssuer
) -> None:
    """uvicorn + FastAPI configured only by MESH_* variables: registered within 2 s of
    answering; serves authorized calls while the registry is down; re-registered when it is
    back with an empty store — without restarting the app."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(SERVER_POLICY)
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "MESH_POLICY": str(policy),
        "MESH_REGISTRY_URL": registry.url,
        "MESH_JOIN_TOKEN": JOIN_TOKEN,
    }
    env.pop("MESH_ADVERTISE", None)
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            uvicorn_argv("tests.support.asgi_app:app", port),
            env=env,
            cwd=REPO,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    key = ("inventory", f"inventory-127.0.0.1-{port}")
    url = f"http://127.0.0.1:{port}/items/1"

    def get(token: str) -> int:
        return httpx.get(url, headers={"x-mesh-identity": token}, timeout=5).status_code

    try:
        assert registry.wait_for(lambda: key in registry.instances, 20), log.read_text()
        assert get(issuer.mint("gateway", "inventory")) == 200
        registry.stop()
        assert _wait(lambda: "registry_unreachable" in log.read_text(), 10.0)
        for _ in range(5):
            assert get(issuer.mint("gateway", "inventory")) == 200  # keys cached, not tokens
        registry.forget()
        registry.start()
        assert registry.wait_for(lambda: key in registry.instances, 15), log.read_text()
        assert get(issuer.mint("gateway", "inventory")) == 200
        assert proc.poll() is None
        assert log.read_text().count("registry_unreachable") == 1
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
        assert key not in registry.instances
    finally:
        stop(proc)


def test_a_url_that_is_not_a_registry_is_an_outage_not_a_crash(
    registry: FakeRegistry, write_policy: PolicyWriter
) -> None:
    """A 404 for the trust description: logged once as unreachable, retried with backoff."""
    with capture_logs() as logs:
        mesh = Mesh(write_policy(POLICY), registry_url=registry.url + "/not-here")
        try:
            mesh.start()
            time.sleep(1.5)
            assert not mesh.registry_connected
        finally:
            mesh.close()
    events = [e["event"] for e in logs]
    assert events.count("registry_unreachable") == 1
    assert "background_tick_failed" not in events
    assert (
        "mesh registry?" in next(e for e in logs if e["event"] == "registry_unreachable")["error"]
    )
    runtime_calls = [c for c in registry.calls if "/v1/catalog/services/" not in c.path]
    assert len(runtime_calls) <= 4  # 0.5 s, 1 s, ... not every tick (watches back off alike)
    watch_calls = [c for c in registry.calls if "/v1/catalog/services/" in c.path]
    assert len(watch_calls) <= 4


def test_backoff_doubles_with_jitter_up_to_its_cap() -> None:
    """Each delay lies in [d/2, d] for d = 0.5 s doubling to 10 s; success starts over."""
    from mesh_middleware.runtime.backoff import Backoff

    backoff = Backoff()
    ceilings = [0.5, 1, 2, 4, 8, 10, 10]
    for ceiling in ceilings:
        assert ceiling / 2 <= backoff.next() <= ceiling
    backoff.reset()
    assert backoff.next() <= 0.5


def test_the_registrys_trust_is_in_force_before_the_link_counts_as_connected(
    write_policy: PolicyWriter,
) -> None:
    """Whoever sees `registry_connected` sees the registry's trust domain too (no window)."""
    issuer = TokenIssuer(trust_domain="shop.internal")
    registry = FakeRegistry(issuer, trust_domain="shop.internal")
    mesh = Mesh(write_policy(POLICY), registry_url=registry.url, advertise="127.0.0.1:8123")
    link = mesh._link
    assert link is not None
    seen_connected: list[bool] = []
    apply = link._apply_trust

    def watched(bundle: TrustBundle) -> None:
        seen_connected.append(mesh.registry_connected)
        apply(bundle)

    link._apply_trust = watched
    try:
        registry.start()
        mesh.start()
        assert _wait(lambda: mesh.registry_connected, 12.0)
        assert seen_connected == [False]
        assert mesh.spiffe_id == "spiffe://shop.internal/svc/inventory"
    finally:
        mesh.close()
        registry.stop()
