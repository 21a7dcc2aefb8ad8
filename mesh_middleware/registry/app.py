"""The registry as an ASGI app: state, background maintenance, and the routes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mesh_middleware.registry import metrics, settings
from mesh_middleware.registry.api import RegistryState, routes
from mesh_middleware.registry.ca import CertificateAuthority, load_supplied_root
from mesh_middleware.registry.catalog import Catalog
from mesh_middleware.registry.dashboard import Dashboard
from mesh_middleware.registry.health import HealthChecker
from mesh_middleware.registry.identity import AdminToken, JoinTokens, KeyRing
from mesh_middleware.registry.openapi import openapi_document
from mesh_middleware.registry.replicated import ReplicatedCatalog
from mesh_middleware.registry.settings import RegistrySettings
from mesh_middleware.registry.store import Store, open_store
from mesh_middleware.registry.store.etcd import EtcdStore
from mesh_middleware.registry.store.etcd_client import KeyValue, WatchEvent
from mesh_middleware.registry.telemetry import TelemetryReport

__all__ = ["create_registry_app"]

log = structlog.get_logger("mesh.registry")


def create_registry_app(config: RegistrySettings) -> Starlette:
    """Open the store, load the state, and return the app (its lifespan runs maintenance)."""
    config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    config.data_dir.chmod(0o700)  # also when it already existed: it holds the admin token
    store = open_store(config.store, store_key_file=config.store_key_file)
    state = RegistryState(
        catalog=ReplicatedCatalog(store) if isinstance(store, EtcdStore) else Catalog(store),
        keys=KeyRing(
            store,
            trust_domain=config.trust_domain,
            issuer=config.issuer,
            token_lifetime=config.token_lifetime,
            publish_lead=config.key_publish_lead,
            rotation=config.key_rotation,
        ),
        join_tokens=JoinTokens(store),
        ca=CertificateAuthority(
            store,
            trust_domain=config.trust_domain,
            leaf_lifetime=config.cert_lifetime,
            root_lifetime=config.ca_root_lifetime,
            activate_after=config.ca_activate_after,
            supplied=_supplied_root(config),
        ),
        admin=AdminToken(config.data_dir / "admin.token", shared=_shared(store, "admin")),
        viewer=AdminToken(
            config.data_dir / "viewer.token", prefix="mvt_", shared=_shared(store, "viewer")
        ),
        dev=config.dev,
        store_url=store.url,
    )
    if isinstance(store, EtcdStore):
        state.leads = store.leads
        state.store_status = store.status
        state.share_report = store.share_report
        for kv in store.take_initial_reports():
            _merge_shared(store, state, kv)

    dashboard = Dashboard(state)
    _publish_ca(state.ca, warn=True)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        checker = HealthChecker(state.catalog)
        if isinstance(store, EtcdStore):
            _follow(store, state, asyncio.get_running_loop())
        task = asyncio.create_task(_maintain(state, checker))
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await checker.close()
            if isinstance(state.catalog, ReplicatedCatalog):
                state.catalog.close()
            store.close()

    async def openapi(_: Request) -> Response:
        return JSONResponse(openapi_document())

    async def prometheus(_: Request) -> Response:
        return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)

    async def refused(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        reason = "no such route" if status == 404 else f"{request.method} is not allowed here"
        error = "not_found" if status == 404 else "method_not_allowed"
        return JSONResponse({"error": error, "reason": reason}, status_code=status)

    app = Starlette(
        exception_handlers={404: refused, 405: refused},
        routes=[
            *routes(),
            *dashboard.routes(),
            Route("/openapi.json", openapi, methods=["GET"]),
            Route("/metrics", prometheus, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    app.state.registry = state
    app.state.dashboard = dashboard
    return app


def _shared(store: Store, name: str) -> Callable[[str], str] | None:
    """Replicas share one admin (and viewer) token: the hash the first replica stored."""
    if not isinstance(store, EtcdStore):
        return None
    return lambda proposed: store.shared_secret(name, proposed)


def _follow(store: EtcdStore, state: RegistryState, loop: asyncio.AbstractEventLoop) -> None:
    """Apply what other replicas change, as etcd's watch reports it, on the event loop."""
    catalog = state.catalog
    assert isinstance(catalog, ReplicatedCatalog)

    def changed(revision: int, events: list[WatchEvent]) -> None:
        kinds = {store.kind_of(event.kv.key) for event in events}
        steps: list[tuple[str, Callable[[], None]]] = [
            ("catalog", lambda: catalog.apply(revision, events))
        ]
        if "telemetry" in kinds:
            steps.append(("telemetry", lambda: _merge_all(store, state, events)))
        if "keys" in kinds:
            steps.append(("keys", state.keys.reload))
        if "tokens" in kinds:
            steps.append(("tokens", state.join_tokens.reload))
        if "ca" in kinds:
            steps.append(("ca", lambda: _reload_ca(state.ca)))
        for name, step in steps:
            try:  # each on its own: a bad instance must not hold back a token's revocation
                step()
            except Exception:
                log.exception("replica_update_failed", part=name, revision=revision)

    def relisted(revision: int) -> None:
        catalog.resync(revision)
        state.keys.reload()
        state.join_tokens.reload()
        state.ca.reload()

    store.start(
        lambda revision, events: loop.call_soon_threadsafe(changed, revision, events),
        lambda revision: loop.call_soon_threadsafe(relisted, revision),
    )


def _reload_ca(ca: CertificateAuthority) -> None:
    ca.reload()
    _publish_ca(ca, warn=False)


def _merge_all(store: EtcdStore, state: RegistryState, events: list[WatchEvent]) -> None:
    for event in events:
        if not event.deleted and store.kind_of(event.kv.key) == "telemetry":
            _merge_shared(store, state, event.kv)


def _merge_shared(store: EtcdStore, state: RegistryState, kv: KeyValue) -> None:
    """Merge an edge report another replica took (one telemetry view on every replica)."""
    shared = store.shared_report(kv)
    if shared is None:
        return
    body, since = shared
    try:
        report = TelemetryReport.model_validate({**body, "age": float(body.get("age", 0)) + since})
    except ValueError:
        log.warning("telemetry_report_unreadable", key=kv.key)
        return
    state.telemetry.merge(report)


def _supplied_root(config: RegistrySettings) -> tuple[str, str] | None:
    if config.ca_certificate is None and config.ca_key is None:
        return None
    if config.ca_certificate is None or config.ca_key is None:
        raise ValueError("an operator's CA needs both its certificate and its key")
    return load_supplied_root(config.ca_certificate.read_text(), config.ca_key.read_text())


async def _maintain(state: RegistryState, checker: HealthChecker) -> None:
    """Expire leases, run health checks, retire and rotate keys; never stops on a failure."""
    ticks = 0
    while True:
        await asyncio.sleep(settings.SWEEP_SECONDS)
        ticks += 1
        try:
            await state.catalog.expire()
            state.telemetry.expire()
            if not state.leads():
                continue  # another replica checks health and rotates keys
            await checker.tick()
            if ticks % 20 == 0:
                state.keys.maintain()
                state.ca.maintain()
                _publish_ca(state.ca, warn=ticks % 7200 == 0)  # hourly (and once at start)
        except Exception:
            log.exception("maintenance_failed")


def _publish_ca(ca: CertificateAuthority, *, warn: bool) -> None:
    """The CA's state as metrics; its warnings logged at start and then hourly."""
    metrics.CA_ROOT_EXPIRY.clear()
    for root in ca.roots():
        metrics.CA_ROOT_EXPIRY.labels(root["id"][:16], root["state"]).set(root["not_after"])
    warnings = ca.warnings()
    metrics.CA_WARNINGS.set(len(warnings))
    if warn:
        for warning in warnings:
            log.warning("ca_warning", warning=warning)
