"""A requests ``HTTPAdapter`` that sends ``http://<service>/…`` through the mesh.

>>> session = mesh.requests_session()  # doctest: +SKIP
>>> session.get("http://inventory/items/1", timeout=2)  # doctest: +SKIP

Same behaviour as the httpx transports (routing, balancing, retries, identity, trace context,
deadline); the mesh's refusals are raised as requests' own exception types:
``requests.ConnectionError`` (no healthy instance), ``requests.HTTPError`` with a 503
``response`` (``max_concurrent`` reached), ``requests.exceptions.RetryError`` (retry budget
spent) and ``requests.Timeout`` (deadline passed).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Mapping
from functools import partial
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import NewConnectionError

from mesh_middleware import defaults
from mesh_middleware.discovery.endpoints import Endpoint
from mesh_middleware.identity.tls import SwappableContext
from mesh_middleware.outbound import mtls
from mesh_middleware.outbound.call import Call, CallRefused, Next, Refusal
from mesh_middleware.outbound.mirror import ShadowSender
from mesh_middleware.outbound.telemetry import FLAG_OF_FAILURE, FLAG_OF_REFUSAL, external_context
from mesh_middleware.resilience.retry_policy import Failure
from mesh_middleware.runtime.context import current_deadline
from mesh_middleware.telemetry import metrics
from mesh_middleware.telemetry.tracecontext import SpanContext

if TYPE_CHECKING:
    from mesh_middleware.runtime.mesh import Mesh

__all__ = ["MeshAdapter", "mesh_session"]

_IDENTITY = defaults.IDENTITY_HEADER
_FORWARDED_USER = defaults.FORWARDED_USER_HEADER
_DEADLINE = defaults.DEADLINE_HEADER
_FIRST_WAIT = defaults.DISCOVERY_FIRST_WAIT_SECONDS
_SHADOW = defaults.SHADOW_HEADER


def classify(exc: requests.RequestException) -> Failure | None:
    """The retry condition a requests failure is, or ``None`` when no retry can help."""
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return Failure.CONNECT_FAILURE
    if isinstance(exc, requests.exceptions.ReadTimeout):
        return Failure.TIMEOUT
    if isinstance(exc, requests.exceptions.SSLError | requests.exceptions.ProxyError):
        return None
    if isinstance(exc, requests.exceptions.ConnectionError):
        reason = exc.args[0] if exc.args else None
        cause = getattr(reason, "reason", reason)
        if isinstance(cause, NewConnectionError | ConnectionRefusedError):
            return Failure.CONNECT_FAILURE
        return Failure.RESET
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return Failure.RESET
    return None


def _requests_error(
    refused: CallRefused, request: requests.PreparedRequest
) -> requests.RequestException:
    message = refused.message
    refusal = refused.refusal
    if refusal is Refusal.NO_HEALTHY_INSTANCES:
        return requests.exceptions.ConnectionError(message, request=request)
    if refusal is Refusal.CIRCUIT_OPEN:
        response = requests.Response()
        response.status_code = 503
        response.reason = "Service Unavailable"
        response.headers["content-type"] = "application/json"
        response.headers["x-mesh-error"] = refusal.value
        response._content = json.dumps({"error": refusal.value, "reason": message}).encode()
        response.request = request
        response.url = request.url or ""
        return requests.exceptions.HTTPError(message, request=request, response=response)
    if refusal is Refusal.RETRY_BUDGET_EXHAUSTED:
        return requests.exceptions.RetryError(message, request=request)
    return requests.exceptions.Timeout(message, request=request)


def _trace(headers: Any, context: SpanContext) -> None:
    headers["traceparent"] = context.traceparent()
    if context.tracestate is not None:
        headers["tracestate"] = context.tracestate


def _size(body: object) -> int:
    return len(body) if isinstance(body, bytes | str) else 0


def _replayable(body: object) -> bool:
    return body is None or isinstance(body, bytes | str)


def _try_timeout(original: Any, seconds: float) -> tuple[float, float]:
    if isinstance(original, tuple):
        connect, read = original
    else:
        connect = read = original
    return (
        seconds if connect is None or connect > seconds else connect,
        seconds if read is None or read > seconds else read,
    )


class MeshAdapter(HTTPAdapter):
    """Mount on ``http://`` and ``https://``; non-mesh hosts are sent as HTTPAdapter would."""

    def __init__(self, mesh: Mesh, **options: Any) -> None:
        super().__init__(**options)
        self.mesh = mesh
        self.engine = mesh.outbound
        self._shadows = ShadowSender()

    def send(
        self,
        request: requests.PreparedRequest,
        stream: bool = False,
        timeout: Any = None,
        verify: Any = True,
        cert: Any = None,
        proxies: Mapping[str, str] | None = None,
    ) -> requests.Response:
        parts = urlsplit(request.url or "")
        destination = self.engine.destination(parts.hostname or "")
        headers = request.headers
        if destination is None:
            # Fail closed: a mesh token or deadline copied onto a request for another host (a
            # redirect a mesh service answered with, say) never leaves for that host.
            headers.pop(_IDENTITY, None)
            headers.pop(_DEADLINE, None)
            if self.engine.trace_external and "traceparent" not in headers:
                _trace(headers, external_context())
            return super().send(request, stream, timeout, verify, cert, proxies)
        inherited = current_deadline.get()
        now = time.monotonic()
        if inherited is not None and inherited.at <= now:
            raise requests.exceptions.Timeout(
                f"{destination.service}: the caller's deadline had already passed",
                request=request,
            )
        try:
            call = Call(
                destination,
                request.method or "GET",
                request.path_url,
                headers,
                replayable=_replayable(request.body),
                deadline=inherited.at if inherited is not None else None,
                now=now,
            )
        except CallRefused as refused:
            raise _requests_error(refused, request) from None
        original = request.url
        added: list[str] = []
        try:
            if call.endpoint_set is None:
                call.endpoint_set = destination.wait_for_endpoints(
                    min(_FIRST_WAIT, call.remaining(time.monotonic()))
                )
            token = self.mesh.identity_token(destination.service)
            if token is not None and _IDENTITY not in headers:
                headers[_IDENTITY] = token
                added.append(_IDENTITY)
                user = self.mesh.forwarded_user(destination.service)
                if user is not None and _FORWARDED_USER not in headers:
                    headers[_FORWARDED_USER] = user
                    added.append(_FORWARDED_USER)
            own_trace = "traceparent" in headers
            if "Host" not in headers:
                headers["Host"] = parts.netloc.rpartition("@")[2]  # the service, not the instance
                added.append("Host")
            added.append(_DEADLINE)
            target = parts.path or "/"
            if parts.query:
                target += "?" + parts.query
            if mtls.certificate_due(self.mesh, call.endpoint_set):
                self.mesh.client_tls()  # this instance's certificate, with a bounded wait
            if call.mirrored and call.replayable:
                self._mirror(call, request, target)
            telemetry = self.mesh.outbound_telemetry
            method = request.method or "GET"
            while True:
                now = time.monotonic()
                try:
                    endpoint = call.pick(now)
                except CallRefused as refused:
                    self._finish(call, method, 0, [FLAG_OF_REFUSAL[refused.refusal]], None)
                    raise _requests_error(refused, request) from None
                span = call.span = telemetry.try_span(call, method)
                if not own_trace:
                    _trace(headers, span.context)
                try:
                    request.url = self._aim(request, call, endpoint, target)
                except _NoMeshCertificate:
                    call.broke(endpoint, now)  # this side's failure: nothing held against it
                    self._finish(call, method, 0, [], None, error="NoMeshCertificate")
                    raise
                headers[_DEADLINE] = call.header_deadline(now)
                limits = _try_timeout(timeout, call.try_timeout(now))
                try:
                    response = super().send(request, stream, limits, verify, cert, None)
                except requests.RequestException as exc:
                    failure = classify(exc)
                    now = time.monotonic()
                    name = type(exc).__name__
                    if failure is None:
                        call.broke(endpoint, now)
                        self._finish(call, method, 0, [], endpoint, error=name)
                        raise
                    verdict = call.failed(endpoint, failure, now)
                    if verdict is Next.RETRY:
                        span.end(None, error=name)
                        telemetry.retried(call, failure.value)
                        time.sleep(call.delay)
                        continue
                    flags = [FLAG_OF_FAILURE[failure]]
                    if verdict is Next.DEADLINE:
                        flags.append(metrics.DEADLINE)
                    elif verdict is Next.BUDGET:
                        flags.append(metrics.BUDGET)
                    self._finish(call, method, 0, flags, endpoint, error=name)
                    if verdict is Next.DEADLINE:
                        raise requests.exceptions.Timeout(
                            f"{destination.service}: deadline exceeded after {call.attempt} tries",
                            request=request,
                        ) from exc
                    if verdict is Next.BUDGET:
                        raise requests.exceptions.RetryError(
                            f"{destination.service}: retry budget exhausted; not retrying "
                            f"{name}: {exc}",
                            request=request,
                        ) from exc
                    raise
                except BaseException:
                    call.broke(endpoint, time.monotonic())
                    raise
                status = response.status_code
                verdict = call.answered(
                    endpoint,
                    status,
                    response.headers.get("retry-after") if status >= 400 else None,
                    time.monotonic(),
                )
                if verdict is not Next.RETRY:
                    length = response.headers.get("content-length", "")
                    self._finish(
                        call,
                        method,
                        status,
                        [],
                        endpoint,
                        request_bytes=_size(request.body),
                        response_bytes=int(length) if length.isdigit() else 0,
                    )
                    response.url = original or ""  # redirects resolve against the service
                    return response
                span.end(status)
                telemetry.retried(call, str(status))
                response.close()
                time.sleep(call.delay)
        finally:
            call.finish()
            # What a redirect copies from this request is what the caller gave, nothing more.
            request.url = original
            for name in added:
                headers.pop(name, None)

    def _finish(
        self,
        call: Call,
        method: str,
        status: int,
        flags: list[str],
        endpoint: Endpoint | None,
        *,
        request_bytes: int = 0,
        response_bytes: int = 0,
        error: str | None = None,
    ) -> None:
        if call.panic:
            flags.append(metrics.EJECTED_PANIC)
        self.mesh.outbound_telemetry.finished(
            call,
            method=method,
            status=status,
            flags=flags,
            version=endpoint.version if endpoint is not None else None,
            upstream=endpoint.authority if endpoint is not None else None,
            span=call.span,
            request_bytes=request_bytes,
            response_bytes=response_bytes,
            error=error,
        )

    def _mirror(self, call: Call, request: requests.PreparedRequest, target: str) -> None:
        endpoint_set = call.endpoint_set
        subset = endpoint_set.subset(call.mirror_version) if endpoint_set is not None else ()
        if not subset:
            return
        shadow = request.copy()
        endpoint = random.choice(subset)
        try:
            shadow.url = self._aim(shadow, call, endpoint, target)
        except _NoMeshCertificate:
            return  # a shadow never affects the call it copies
        shadow.headers["Host"] = f"{call.destination.service}-shadow"
        shadow.headers[_SHADOW] = "1"
        seconds = call.try_timeout(time.monotonic())
        self._shadows.submit(partial(self._send_shadow, shadow, seconds))

    def _aim(
        self, request: requests.PreparedRequest, call: Call, endpoint: Endpoint, target: str
    ) -> str:
        """The URL of this try; to an instance serving mutual TLS, as
        ``outbound.mtls.over_tls`` decides (else ``_NoMeshCertificate``)."""
        if not endpoint.tls:
            setattr(request, _MESH_TLS, None)
            return f"{endpoint.scheme}://{endpoint.authority}{target}"
        service = call.destination.service
        try:
            secure = mtls.over_tls(self.mesh, service, endpoint)
        except mtls.NoCertificate as exc:
            raise _NoMeshCertificate(str(exc), request=request) from None
        if not secure:
            setattr(request, _MESH_TLS, None)
            host = f"[{endpoint.host}]" if ":" in endpoint.host else endpoint.host
            return f"http://{host}:{endpoint.plain_port}{target}"
        setattr(request, _MESH_TLS, service)
        return f"https://{endpoint.authority}{target}"

    def get_connection_with_tls_context(
        self,
        request: requests.PreparedRequest,
        verify: bool | str | None,
        proxies: Mapping[str, str] | None = None,
        cert: Any = None,
    ) -> Any:
        """A mutual-TLS try gets a pool per destination service that presents this instance's
        certificate and expects the service's SPIFFE ID (checked during the handshake)."""
        service = getattr(request, _MESH_TLS, None)
        if service is None:
            return super().get_connection_with_tls_context(request, verify, proxies, cert)
        parts = urlsplit(request.url or "")
        return self.poolmanager.connection_from_host(
            parts.hostname,
            parts.port,
            scheme="https",
            pool_kwargs={
                "ssl_context": mtls.client_context(self.mesh),
                "server_hostname": service,
                "assert_hostname": False,
            },
        )

    def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
        if isinstance(getattr(conn, "conn_kw", {}).get("ssl_context"), SwappableContext):
            return  # the mesh's own trust, never the caller's CA files or verify=False
        super().cert_verify(conn, url, verify, cert)  # type: ignore[no-untyped-call]

    def _send_shadow(self, shadow: requests.PreparedRequest, seconds: float) -> None:
        super().send(shadow, timeout=(seconds, seconds)).close()

    def close(self) -> None:
        self._shadows.close()
        super().close()


class _NoMeshCertificate(requests.exceptions.ConnectionError):
    """A mutual-TLS-only destination, and no certificate here to present (nothing was sent)."""


_MESH_TLS = "_mesh_tls_service"
"""Set on a prepared request for each try: the service a mutual-TLS try expects, else None."""


def mesh_session(mesh: Mesh) -> requests.Session:
    """A ``requests.Session`` sending through ``mesh`` (``Mesh.requests_session`` calls it)."""
    session = requests.Session()
    adapter = MeshAdapter(mesh)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session
