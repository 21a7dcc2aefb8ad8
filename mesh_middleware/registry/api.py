"""The registry's HTTP API (docs/registry-api.md): handlers, credentials, errors.

Every answer is JSON; every refusal is ``{"error", "reason"}`` with a 4xx status. A failure of
the store is a 503. Nothing answers with a traceback.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mesh_middleware.policy.durations import parse_duration
from mesh_middleware.registry import metrics, settings, telemetry
from mesh_middleware.registry.ca import CertificateAuthority, CSRError, load_supplied_root
from mesh_middleware.registry.catalog import Catalog, TooManyWatches
from mesh_middleware.registry.identity import AdminToken, JoinTokens, KeyRing
from mesh_middleware.registry.models import (
    INSTANCE_ID,
    SERVICE_NAME,
    CertificateRequest,
    JoinTokenRequest,
    Registration,
    RootRotation,
    TokenRequest,
)
from mesh_middleware.registry.replicated import ReplicaBehind
from mesh_middleware.registry.store import InstanceRecord
from mesh_middleware.registry.telemetry import Telemetry, TelemetryReport

__all__ = ["ApiError", "RegistryState", "bearer_token", "can_read", "guarded", "routes"]

log = structlog.get_logger("mesh.registry")

Handler = Callable[[Request], Awaitable[Response]]


class ApiError(Exception):
    """A refusal with its status, code and reason."""

    def __init__(self, status: int, error: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.error = error
        self.reason = reason


@dataclass
class RegistryState:
    """Everything the handlers work on."""

    catalog: Catalog
    keys: KeyRing
    join_tokens: JoinTokens
    ca: CertificateAuthority
    admin: AdminToken
    viewer: AdminToken
    dev: bool
    store_url: str
    # Whether this registry runs health checks and rotations (one replica of several does).
    leads: Callable[[], bool] = lambda: True
    # What /healthz says about a replicated store (replica, leader, etcd endpoint, revision).
    store_status: Callable[[], dict[str, Any]] | None = None
    # Hands a report this replica took to the other replicas (they merge it too).
    share_report: Callable[[dict[str, Any]], None] | None = None
    # One encoded answer per (service, healthy filter): replaced when the index moves.
    rendered: dict[tuple[str, bool], tuple[float, int, bytes]] = field(default_factory=dict)
    # Rolling windows of edge reports (memory only: rebuilt from reports after a restart).
    telemetry: Telemetry = field(default_factory=Telemetry)


def _state(request: Request) -> RegistryState:
    state: RegistryState = request.app.state.registry
    return state


def bearer_token(request: Request) -> str | None:
    """The ``Authorization: Bearer`` token, ``None`` without the header (401 if malformed)."""
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "unauthenticated", "expected 'Authorization: Bearer <token>'")
    return token.strip()


def _require_admin(request: Request) -> None:
    token = bearer_token(request)
    if token is None:
        raise ApiError(401, "unauthenticated", "the admin token is required")
    if not _state(request).admin.matches(token):
        raise ApiError(401, "unauthenticated", "not the admin token")


def can_read(state: RegistryState, token: str | None) -> bool:
    """Whether ``token`` may read what the dashboard shows: the admin or the viewer token."""
    return token is not None and (state.admin.matches(token) or state.viewer.matches(token))


def _require_reader(request: Request) -> None:
    token = bearer_token(request)
    if token is None:
        raise ApiError(401, "unauthenticated", "the admin or the viewer token is required")
    if not can_read(_state(request), token):
        raise ApiError(401, "unauthenticated", "neither the admin nor the viewer token")


def _caller_service(request: Request, *, dev_service: str | None) -> str:
    """The service a request acts for: its join token's, the admin's choice, or (dev) any."""
    state = _state(request)
    token = bearer_token(request)
    if token is None:
        if state.dev and dev_service is not None:
            return dev_service
        raise ApiError(401, "unauthenticated", "a join token is required")
    if dev_service is not None and state.admin.matches(token):
        return dev_service
    service = state.join_tokens.service_of(token)
    if service is None:
        raise ApiError(401, "unauthenticated", "unknown or revoked join token")
    return service


def _acting_for(request: Request, named: str | None) -> str:
    """The service a token or certificate is for: the join token's, or (dev mode, no join
    token) the one the body names; a body naming another service than the token's is a 403."""
    if named is not None and not _state(request).dev and bearer_token(request) is None:
        raise ApiError(401, "unauthenticated", "a join token is required")
    service = _caller_service(request, dev_service=named)
    if named is not None and named != service:
        raise ApiError(403, "forbidden", f"this join token is for {service!r}, not {named!r}")
    return service


async def _json_body(request: Request) -> Any:
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > settings.MAX_BODY_BYTES):
        raise ApiError(413, "too_large", f"bodies are limited to {settings.MAX_BODY_BYTES} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > settings.MAX_BODY_BYTES:
            raise ApiError(
                413, "too_large", f"bodies are limited to {settings.MAX_BODY_BYTES} bytes"
            )
    try:
        return json.loads(body or b"null")
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ApiError(400, "bad_request", "the body is not valid JSON") from None


def _validated(model: Any, data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise ApiError(400, "bad_request", f"{where}: {first['msg']}") from None


def _path_name(request: Request, key: str, pattern: Any, what: str) -> str:
    value = str(request.path_params[key])
    if not pattern.match(value):
        raise ApiError(400, "bad_request", f"{value!r} is not a valid {what}")
    return value


# -- catalog ---------------------------------------------------------------------------------


async def register(request: Request) -> Response:
    service = _path_name(request, "service", SERVICE_NAME, "service name")
    instance_id = _path_name(request, "instance_id", INSTANCE_ID, "instance id")
    body: Registration = _validated(Registration, await _json_body(request))
    acting = _caller_service(request, dev_service=service)
    if acting != service:
        raise ApiError(403, "forbidden", f"this join token is for {acting!r}, not {service!r}")
    record = InstanceRecord(
        service=service,
        instance_id=instance_id,
        address=body.address,
        port=body.port,
        version=body.version,
        zone=body.zone,
        metadata=dict(body.metadata),
        ttl=float(body.ttl),
        check=body.check.model_dump() if body.check else None,
        modify_index=0,
    )
    catalog = _state(request).catalog
    instance, changed = await catalog.register(record)
    if changed:
        log.info("instance_registered", service=service, instance=instance_id)
    return _json({"instance": instance.view(time.monotonic()), "index": catalog.index})


async def deregister(request: Request) -> Response:
    service = _path_name(request, "service", SERVICE_NAME, "service name")
    instance_id = _path_name(request, "instance_id", INSTANCE_ID, "instance id")
    state = _state(request)
    token = bearer_token(request)
    if not (token is not None and state.admin.matches(token)):
        acting = _caller_service(request, dev_service=service)
        if acting != service:
            raise ApiError(403, "forbidden", f"this join token is for {acting!r}, not {service!r}")
    if not await state.catalog.deregister(service, instance_id):
        raise ApiError(404, "not_found", f"no instance {instance_id!r} of {service!r}")
    return _json({"index": state.catalog.index})


async def list_services(request: Request) -> Response:
    catalog = _state(request).catalog
    return _json({"index": catalog.index, "services": catalog.services()}, index=catalog.index)


async def service_instances(request: Request) -> Response:
    service = _path_name(request, "service", SERVICE_NAME, "service name")
    catalog = _state(request).catalog
    query = request.query_params
    healthy_only = _flag(query.get("healthy"))
    raw_index = query.get("index")
    if raw_index is not None:
        if not (raw_index.isascii() and raw_index.isdigit()) or len(raw_index) > 18:
            raise ApiError(400, "bad_request", "index must be a non-negative integer")
        wait = _wait(query.get("wait"))
        try:
            if not await _wait_unless_gone(request, catalog, service, int(raw_index), wait):
                return Response(status_code=204)  # the client left; nobody reads this
        except TooManyWatches:
            raise ApiError(503, "busy", "too many services are being watched") from None
        except ReplicaBehind:
            raise ApiError(
                503, "behind", "this replica has not caught up with that index: try another"
            ) from None
    index = catalog.service_index(service)
    return Response(
        _rendered(_state(request), service, index, healthy_only),
        media_type="application/json",
        headers={"x-mesh-index": str(index)},
    )


_RENDERED_FOR_SECONDS = 1.0


def _rendered(state: RegistryState, service: str, index: int, healthy_only: bool) -> bytes:
    """The answer for a service at an index, encoded once and shared for a second.

    A change wakes every watcher of a service at once; each would otherwise build and encode
    the same list (only ``expires_in`` moves, and by less than the sharing window).
    """
    key = (service, healthy_only)
    now = time.monotonic()
    rendered = state.rendered
    cached = rendered.get(key)
    if cached is not None and cached[1] == index and now - cached[0] < _RENDERED_FOR_SECONDS:
        return cached[2]
    body = json.dumps(
        {
            "service": service,
            "index": index,
            "instances": state.catalog.instances(service, healthy_only=healthy_only),
        },
        separators=(",", ":"),
    ).encode("utf-8")
    if len(rendered) >= 1024 and key not in rendered:
        rendered.clear()
    rendered[key] = (now, index, body)
    return body


async def _wait_unless_gone(
    request: Request, catalog: Catalog, service: str, after: int, wait: float
) -> bool:
    """Wait for a change as a watch does; ``False`` if the client disconnected first, so that a
    watcher that went away stops holding its place at once."""

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watching = asyncio.ensure_future(catalog.wait_for_change(service, after, wait))
    leaving = asyncio.ensure_future(gone())
    try:
        done, _ = await asyncio.wait({watching, leaving}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (watching, leaving):
            task.cancel()
    if watching in done:
        watching.result()  # raises TooManyWatches, ReplicaBehind
        return True
    return False


def _flag(value: str | None) -> bool:
    if value is None:
        return False
    if value.lower() in {"1", "true", "yes", ""}:
        return True
    if value.lower() in {"0", "false", "no"}:
        return False
    raise ApiError(400, "bad_request", "healthy must be true or false")


def _wait(value: str | None) -> float:
    if value is None:
        return settings.DEFAULT_WAIT
    try:
        seconds = float(value) if value.replace(".", "", 1).isdigit() else parse_duration(value)
    except ValueError:
        raise ApiError(400, "bad_request", "wait must be a duration like '30s'") from None
    return min(max(seconds, 0.0), settings.MAX_WAIT)


# -- identity --------------------------------------------------------------------------------


async def trust(request: Request) -> Response:
    keys = _state(request).keys
    return _json(
        {
            "trust_domain": keys.trust_domain,
            "issuer": keys.issuer,
            "jwks_uri": "/v1/identity/jwks",
            "token_lifetime": keys.token_lifetime,
        }
    )


async def jwks(request: Request) -> Response:
    return _json(_state(request).keys.jwks())


async def issue_token(request: Request) -> Response:
    body: TokenRequest = _validated(TokenRequest, await _json_body(request))
    state = _state(request)
    service = _acting_for(request, body.service)
    token, expires_at = state.keys.mint(service, body.audience, cnf=body.cnf)
    metrics.TOKENS_ISSUED.labels(service).inc()
    lifetime = state.keys.token_lifetime
    return _json(
        {
            "token": token,
            "expires_at": expires_at,
            "expires_in": lifetime,
            "service": service,
            "audience": body.audience,
        }
    )


async def issue_certificate(request: Request) -> Response:
    body: CertificateRequest = _validated(CertificateRequest, await _json_body(request))
    state = _state(request)
    service = _acting_for(request, body.service)
    ca = state.ca
    try:
        issued = ca.issue(body.csr, service)
    except CSRError as exc:
        raise ApiError(400, "bad_request", str(exc)) from None
    metrics.CERTIFICATES_ISSUED.labels(service).inc()
    log.info(
        "certificate_issued", service=service, serial=issued.serial, expires_at=issued.not_after
    )
    return _json(
        {
            "certificate": issued.certificate_pem,
            "serial": issued.serial,
            "spiffe_id": issued.spiffe_id,
            "not_before": issued.not_before,
            "expires_at": issued.not_after,
            "expires_in": round(issued.not_after - time.time(), 3),
            "bundle": ca.bundle(),
            "bundle_index": ca.index,
        }
    )


async def ca_bundle(request: Request) -> Response:
    ca = _state(request).ca
    roots = ca.roots()
    return _json(
        {
            "trust_domain": ca.trust_domain,
            "index": ca.index,
            "bundle": [root["certificate"] for root in roots],
            "roots": roots,
            "certificate_lifetime": ca.leaf_lifetime,
        },
        index=ca.index,
    )


# -- administration --------------------------------------------------------------------------


async def create_join_token(request: Request) -> Response:
    _require_admin(request)
    body: JoinTokenRequest = _validated(JoinTokenRequest, await _json_body(request))
    token, record = _state(request).join_tokens.create(body.service)
    log.info("join_token_created", service=body.service, id=record.token_id)
    return _json({"token": token, "id": record.token_id, "service": body.service}, status=201)


async def list_join_tokens(request: Request) -> Response:
    _require_admin(request)
    tokens = _state(request).join_tokens.list()
    return _json(
        {
            "join_tokens": [
                {"id": t.token_id, "service": t.service, "created_at": t.created_at} for t in tokens
            ]
        }
    )


async def revoke_join_token(request: Request) -> Response:
    _require_admin(request)
    token_id = str(request.path_params["token_id"])
    if not _state(request).join_tokens.revoke(token_id):
        raise ApiError(404, "not_found", f"no join token {token_id!r}")
    return _json({"revoked": token_id})


async def rotate_keys(request: Request) -> Response:
    _require_admin(request)
    record = _state(request).keys.rotate()
    return _json({"kid": record.kid, "signs_from": record.activate_at})


async def rotate_ca(request: Request) -> Response:
    _require_admin(request)
    body: RootRotation = _validated(RootRotation, await _json_body(request) or {})
    if (body.certificate is None) != (body.key is None):
        raise ApiError(400, "bad_request", "give both certificate and key, or neither")
    after: float | None = None
    if body.activate_after is not None:
        try:
            after = parse_duration(body.activate_after)
        except ValueError:
            raise ApiError(400, "bad_request", "activate_after must be a duration") from None
    try:
        supplied = (
            load_supplied_root(body.certificate, body.key)
            if body.certificate is not None and body.key is not None
            else None
        )
        record = _state(request).ca.rotate(supplied=supplied, activate_after=after)
    except ValueError as exc:
        raise ApiError(400, "bad_request", str(exc)) from None
    return _json({"root": record.root_id, "signs_from": record.activate_at})


# -- telemetry -------------------------------------------------------------------------------


async def telemetry_report(request: Request) -> Response:
    state = _state(request)
    try:
        # The credential is checked before a body of up to 2 MiB is read and parsed.
        token = bearer_token(request)
        if token is None and not state.dev:
            raise ApiError(401, "unauthenticated", "a join token is required")
        if (
            token is not None
            and not state.admin.matches(token)
            and state.join_tokens.service_of(token) is None
        ):
            raise ApiError(401, "unauthenticated", "unknown or revoked join token")
        raw = await _bounded_json(request, telemetry.MAX_REPORT_BYTES)
        report: TelemetryReport = _validated(TelemetryReport, raw)
        acting = _caller_service(request, dev_service=report.reporter)
        if acting != report.reporter:
            raise ApiError(
                403, "forbidden", f"this join token is for {acting!r}, not {report.reporter!r}"
            )
    except ApiError:
        telemetry.REPORTS.labels("rejected").inc()
        raise
    merged = state.telemetry.merge(report)
    if state.share_report is not None and not merged.stale:
        try:
            await asyncio.to_thread(state.share_report, raw)
        except OSError as exc:  # best effort: this replica has it; the others miss this one
            log.warning("telemetry_report_not_shared", error=str(exc))
    return _json(
        {"accepted": merged.accepted, "dropped": merged.dropped, "stale": merged.stale},
        status=202,
    )


async def telemetry_services(request: Request) -> Response:
    state = _state(request)
    window = _telemetry_window(request.query_params.get("window"))
    covered, services = state.telemetry.services(window, state.catalog.services())
    return _json({"window_seconds": window, "covered_seconds": covered, "services": services})


async def telemetry_topology(request: Request) -> Response:
    state = _state(request)
    window = _telemetry_window(request.query_params.get("window"))
    covered, nodes, edges = state.telemetry.topology(window, state.catalog.services())
    return _json(
        {"window_seconds": window, "covered_seconds": covered, "nodes": nodes, "edges": edges}
    )


async def telemetry_denials(request: Request) -> Response:
    # Callers and paths of refused requests: for the operators, not for every meshed app.
    _require_reader(request)
    state = _state(request)
    window = _telemetry_window(request.query_params.get("window") or "300s")
    return _json({"window_seconds": window, "denials": state.telemetry.denials(window)})


def _telemetry_window(value: str | None) -> float:
    """The window asked for (default 60s), rounded up to whole 10-second buckets."""
    if value is None:
        return 60.0
    try:
        seconds = float(value) if value.isascii() and value.isdigit() else parse_duration(value)
    except (ValueError, OverflowError):
        raise ApiError(400, "bad_request", "window must be a duration like '60s'") from None
    low, high = telemetry.BUCKET_SECONDS, telemetry.MAX_WINDOW_SECONDS
    if not 0 < seconds <= high:
        raise ApiError(400, "bad_request", f"window must be more than 0s and at most {high:g}s")
    return max(low, float(-(-seconds // low) * low))


async def _bounded_json(request: Request, limit: int) -> Any:
    """The JSON body, refused with a 413 beyond ``limit`` bytes."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise ApiError(413, "too_large", f"bodies here are limited to {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, "too_large", f"bodies here are limited to {limit} bytes")
    try:
        return json.loads(body or b"null")
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ApiError(400, "bad_request", "the body is not valid JSON") from None


# -- operations ------------------------------------------------------------------------------


async def healthz(request: Request) -> Response:
    state = _state(request)
    body: dict[str, Any] = {
        "ok": True,
        "dev_mode": state.dev,
        "store": state.store_url,
        "index": state.catalog.index,
        **({"replica": state.store_status()} if state.store_status else {}),
        "instances": state.catalog.count(),
    }
    if state.dev:
        body["warning"] = "DEV MODE: any caller may register and get tokens for any service"
    ca = state.ca
    warnings = ca.warnings()
    body["ca"] = {
        "signing_root": ca.signing_root_id(),
        "roots": [
            {k: root[k] for k in ("id", "state", "not_after", "signs_from", "retires_at")}
            for root in ca.roots()
        ],
        "certificate_lifetime": ca.leaf_lifetime,
        "warnings": warnings,
    }
    if warnings:
        body["warnings"] = warnings
    return _json(body)


def _json(body: Any, *, status: int = 200, index: int | None = None) -> JSONResponse:
    headers = {"x-mesh-index": str(index)} if index is not None else None
    return JSONResponse(body, status_code=status, headers=headers)


def guarded(name: str, handler: Handler) -> Handler:
    """``handler`` with its refusals and failures answered as JSON, and counted."""

    async def run(request: Request) -> Response:
        try:
            response = await handler(request)
        except ApiError as exc:
            response = JSONResponse({"error": exc.error, "reason": exc.reason}, exc.status)
        except OSError as exc:  # the store's disk
            log.error("store_failed", route=name, error=str(exc))
            response = JSONResponse({"error": "unavailable", "reason": "the store failed"}, 503)
        except Exception:
            log.exception("handler_failed", route=name)
            response = JSONResponse({"error": "unavailable", "reason": "internal failure"}, 503)
        metrics.REQUESTS.labels(name, str(response.status_code)).inc()
        return response

    return run


def routes() -> list[Route]:
    """Every API route, each wrapped so that refusals and failures become JSON answers."""
    table: list[tuple[str, Handler, list[str], str]] = [
        ("/v1/catalog/services", list_services, ["GET"], "services"),
        ("/v1/catalog/services/{service}", service_instances, ["GET"], "instances"),
        ("/v1/catalog/services/{service}/instances/{instance_id}", register, ["PUT"], "register"),
        (
            "/v1/catalog/services/{service}/instances/{instance_id}",
            deregister,
            ["DELETE"],
            "deregister",
        ),
        ("/v1/identity/trust", trust, ["GET"], "trust"),
        ("/v1/identity/jwks", jwks, ["GET"], "jwks"),
        ("/v1/identity/token", issue_token, ["POST"], "token"),
        ("/v1/ca/certificates", issue_certificate, ["POST"], "certificate"),
        ("/v1/ca/bundle", ca_bundle, ["GET"], "ca_bundle"),
        ("/v1/admin/join-tokens", create_join_token, ["POST"], "join_token_create"),
        ("/v1/admin/join-tokens", list_join_tokens, ["GET"], "join_token_list"),
        ("/v1/admin/join-tokens/{token_id}", revoke_join_token, ["DELETE"], "join_token_revoke"),
        ("/v1/admin/keys/rotate", rotate_keys, ["POST"], "rotate"),
        ("/v1/admin/ca/rotate", rotate_ca, ["POST"], "ca_rotate"),
        ("/v1/telemetry/reports", telemetry_report, ["POST"], "telemetry_report"),
        ("/v1/telemetry/services", telemetry_services, ["GET"], "telemetry_services"),
        ("/v1/telemetry/topology", telemetry_topology, ["GET"], "telemetry_topology"),
        ("/v1/telemetry/denials", telemetry_denials, ["GET"], "telemetry_denials"),
        ("/healthz", healthz, ["GET"], "healthz"),
    ]
    return [
        Route(path, guarded(name, handler), methods=methods, name=name)
        for path, handler, methods, name in table
    ]
