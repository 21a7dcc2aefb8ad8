"""httpx transports that send ``http://<service>/…`` through the mesh (sync and async).

>>> async with mesh.async_client() as client:  # doctest: +SKIP
...     await client.get("http://inventory/items/1")
>>> transport = AsyncMeshTransport(mesh)  # or use the transport directly  # doctest: +SKIP
>>> client = httpx.AsyncClient(transport=transport)  # doctest: +SKIP

For a mesh destination each try picks an instance (route, subset, zone, outlier filter,
balancer), carries the caller's identity token for that service, the trace context and the
time left (``x-mesh-deadline-ms``), and is retried per the policy. Any other host goes straight
to the wrapped transport with only a ``traceparent`` added (unless the policy turns that off).
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import AsyncIterator, Iterator
from functools import partial
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread
import httpx

from mesh_middleware import defaults
from mesh_middleware.adapters.httpx_errors import (
    CircuitOpen,
    DeadlineExceeded,
    NoHealthyInstances,
    RetryBudgetExhausted,
    httpx_error,
)
from mesh_middleware.discovery.endpoints import Endpoint
from mesh_middleware.outbound import mtls
from mesh_middleware.outbound.call import Call, CallRefused, Next
from mesh_middleware.outbound.destination import Destination
from mesh_middleware.outbound.mirror import ShadowSender, mirror_slots
from mesh_middleware.outbound.telemetry import FLAG_OF_FAILURE, FLAG_OF_REFUSAL, external_context
from mesh_middleware.resilience.retry_policy import Failure
from mesh_middleware.runtime.context import current_deadline
from mesh_middleware.telemetry import metrics
from mesh_middleware.telemetry.tracecontext import SpanContext

if TYPE_CHECKING:
    from mesh_middleware.runtime.mesh import Mesh

__all__ = [
    "AsyncMeshTransport",
    "CircuitOpen",
    "DeadlineExceeded",
    "MeshTransport",
    "NoHealthyInstances",
    "RetryBudgetExhausted",
]


_IDENTITY = defaults.IDENTITY_HEADER.encode("latin-1")
_FORWARDED_USER = defaults.FORWARDED_USER_HEADER.encode("latin-1")
_DEADLINE = defaults.DEADLINE_HEADER.encode("latin-1")
_MESH_ONLY = frozenset((_IDENTITY, _DEADLINE))
_SHADOW = defaults.SHADOW_HEADER
_FIRST_WAIT = defaults.DISCOVERY_FIRST_WAIT_SECONDS


# -- pieces shared by both transports ------------------------------------------------------


def _fast_url_supported() -> bool:
    # Rewriting a URL with URL.copy_with costs ~35 µs (it re-validates every part); replacing
    # three fields of httpx's parsed form costs ~1 µs. Use it only if it gives the same URL.
    try:
        probe = httpx.URL("http://service/a/b?c=d")
        fast = _aim_fast(probe, "https", "127.0.0.1", 8443)
        return fast == probe.copy_with(scheme="https", host="127.0.0.1", port=8443)
    except Exception:
        return False


def _aim_fast(url: httpx.URL, scheme: str, host: str, port: int) -> httpx.URL:
    aimed = httpx.URL.__new__(httpx.URL)
    default = (scheme == "http" and port == 80) or (scheme == "https" and port == 443)
    aimed._uri_reference = url._uri_reference._replace(
        scheme=scheme, host=host, port=None if default else port
    )
    return aimed


_FAST_URL = _fast_url_supported()


def aim(url: httpx.URL, endpoint: Endpoint) -> httpx.URL:
    """``url`` sent to ``endpoint`` instead of the service name (same path and query)."""
    if _FAST_URL and ":" not in endpoint.host:
        return _aim_fast(url, endpoint.scheme, endpoint.host, endpoint.port)
    return url.copy_with(scheme=endpoint.scheme, host=endpoint.host, port=endpoint.port)


def aim_plain(url: httpx.URL, endpoint: Endpoint) -> httpx.URL:
    """``url`` sent to the plaintext port of an instance that also serves mutual TLS."""
    assert endpoint.plain_port is not None
    return url.copy_with(scheme="http", host=endpoint.host, port=endpoint.plain_port)


class NoMeshCertificate(httpx.ConnectError):
    """A mutual-TLS-only destination, and no certificate here to present (nothing was sent)."""


def _tls_transport_options(mesh: Mesh, options: dict[str, Any]) -> dict[str, Any]:
    """The options of the pool mutual-TLS tries go through: the transport's own, but for its
    trust, which is the mesh's (see ``outbound.mtls.client_context``)."""
    kept = {k: v for k, v in options.items() if k not in ("verify", "cert")}
    return {**kept, "verify": mtls.client_context(mesh)}


MESH_TLS = "mesh.tls"
"""Request extension: ``True`` when a try goes over mesh mutual TLS (the TLS transport)."""


def _header_list_supported() -> bool:
    # httpx.Headers' __contains__ and __setitem__ re-encode and rescan on every call (~3 µs
    # each); the request path edits its list of (raw name, lower name, value) directly when
    # that list behaves as expected, and uses the public methods otherwise.
    try:
        headers = httpx.Headers({"A": "1"})
        entries = headers._list
        if entries != [(b"A", b"a", b"1")]:
            return False
        entries.append((b"x-probe", b"x-probe", b"2"))
        return headers.get("x-probe") == "2" and headers.raw == [(b"A", b"1"), (b"x-probe", b"2")]
    except Exception:
        return False


_FAST_HEADERS = _header_list_supported()


def set_header(headers: httpx.Headers, name: bytes, value: str, *, keep: bool = False) -> None:
    """Set the lower-case header ``name``; with ``keep``, a value already there wins."""
    if not _FAST_HEADERS:
        key = name.decode("latin-1")
        if not (keep and key in headers):
            headers[key] = value
        return
    entries = headers._list
    for index, entry in enumerate(entries):
        if entry[1] == name:
            if not keep:
                entries[index] = (name, name, value.encode("latin-1"))
            return
    entries.append((name, name, value.encode("latin-1")))


def drop_headers(headers: httpx.Headers, names: frozenset[bytes]) -> None:
    """Remove every header named in ``names`` (lower-case)."""
    if not _FAST_HEADERS:
        for name in names:
            key = name.decode("latin-1")
            if key in headers:
                del headers[key]
        return
    entries = headers._list
    for entry in entries:
        if entry[1] in names:
            entries[:] = [e for e in entries if e[1] not in names]
            return


def _request_size(request: httpx.Request) -> int:
    if type(request.stream) is not httpx.ByteStream:
        return 0  # streamed: not known without reading it
    try:
        return len(request.content)
    except httpx.RequestNotRead:  # a redirect's copy of the body
        return 0


def _trace(headers: httpx.Headers, context: SpanContext, *, keep: bool) -> None:
    """Send ``context`` as ``traceparent`` (and its ``tracestate``)."""
    set_header(headers, b"traceparent", context.traceparent(), keep=keep)
    if context.tracestate is not None:
        set_header(headers, b"tracestate", context.tracestate, keep=keep)


def classify(exc: httpx.TransportError) -> Failure | None:
    """The retry condition an httpx failure is, or ``None`` when no retry can help."""
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout):
        return Failure.CONNECT_FAILURE  # nothing was sent
    if isinstance(exc, httpx.TimeoutException):
        return Failure.TIMEOUT
    if isinstance(exc, httpx.RemoteProtocolError):
        return Failure.REFUSED_STREAM if "REFUSED_STREAM" in str(exc) else Failure.RESET
    if isinstance(exc, httpx.ReadError | httpx.WriteError):
        return Failure.RESET
    return None


def _try_timeouts(original: Any, seconds: float) -> dict[str, float]:
    """The request's own phase timeouts, none longer than ``seconds``."""
    if not isinstance(original, dict):
        return dict.fromkeys(("connect", "read", "write", "pool"), seconds)
    return {
        phase: seconds if limit is None or limit > seconds else limit
        for phase, limit in original.items()
    }


def _replayable(request: httpx.Request) -> bool:
    # Bytes bodies (json=, data=, content=bytes, none) are held in memory; a generator or a
    # file upload is consumed by the first try and cannot be sent again.
    return type(request.stream) is httpx.ByteStream


class _Answer:
    """The answer's body as the caller reads it: cut off with ``DeadlineExceeded`` once the
    call's deadline passes, counted, and the call recorded when the caller closes it."""

    def __init__(
        self,
        stream: Any,
        plane: _Plane,
        call: Call,
        request: httpx.Request,
        response: httpx.Response,
        endpoint: Endpoint,
    ) -> None:
        self._stream = stream
        self._plane = plane
        self._call = call
        self._request = request
        self._status = response.status_code
        self._endpoint = endpoint
        self._size = 0
        self._late = False

    def _check(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if time.monotonic() > self._call.deadline:
            self._late = True
            raise _late(self._call.destination.service, self._request)

    def _finish(self) -> None:
        plane, call = self._plane, self._call
        if call.span is None or call.span.end_ns is None:
            flags = [metrics.DEADLINE] if self._late else []
            plane.finish(
                call, self._request, self._status, flags, self._endpoint, response_bytes=self._size
            )


class _AsyncDeadlineStream(_Answer, httpx.AsyncByteStream):
    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._stream:
            self._check(chunk)
            yield chunk

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            self._finish()


class _DeadlineStream(_Answer, httpx.SyncByteStream):
    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._stream:
            self._check(chunk)
            yield chunk

    def close(self) -> None:
        try:
            self._stream.close()
        finally:
            self._finish()


def _late(service: str, request: httpx.Request) -> DeadlineExceeded:
    return DeadlineExceeded(
        f"{service}: the deadline passed while reading the answer", request=request
    )


class _Plane:
    """What both transports do around sending: decide, decorate, aim, and map errors."""

    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        self.engine = mesh.outbound
        self.telemetry = mesh.outbound_telemetry

    def destination(self, request: httpx.Request) -> Destination | None:
        destination = self.engine.destination(request.url.host)
        if destination is None:
            headers = request.headers
            # Fail closed: a mesh token or deadline copied onto a request for another host (a
            # redirect a mesh service answered with, say) never leaves for that host.
            drop_headers(headers, _MESH_ONLY)
            if self.engine.trace_external:
                _trace(headers, external_context(), keep=True)
        return destination

    def begin(self, destination: Destination, request: httpx.Request) -> Call:
        inherited = current_deadline.get()
        now = time.monotonic()
        if inherited is not None and inherited.at <= now:
            raise DeadlineExceeded(
                f"{destination.service}: the caller's deadline had already passed",
                request=request,
            )
        try:
            call = Call(
                destination,
                request.method,
                request.url.raw_path.decode("ascii", "replace"),
                request.headers,
                replayable=_replayable(request),
                deadline=inherited.at if inherited is not None else None,
                now=now,
                url=request.url,
            )
        except CallRefused as refused:
            raise httpx_error(refused, request) from None
        return call

    def aim(
        self, call: Call, request: httpx.Request, url: httpx.URL, timeouts: Any, now: float
    ) -> Endpoint:
        """Point ``request`` at the next instance, with this try's timeouts and time left."""
        try:
            endpoint = call.pick(now)
        except CallRefused as refused:
            request.url = url
            self.finish(call, request, 0, [FLAG_OF_REFUSAL[refused.refusal]], None)
            raise httpx_error(refused, request) from None
        if endpoint.tls:
            try:
                self._aim_tls(call, request, url, endpoint)
            except NoMeshCertificate as exc:
                call.broke(endpoint, now)  # this side's failure: nothing held against it
                request.url = url
                self.finish(call, request, 0, [], None, error=type(exc).__name__)
                raise
        else:
            request.url = aim(url, endpoint)
            request.extensions[MESH_TLS] = False
        span = call.span = self.telemetry.try_span(call, request.method)
        _trace(request.headers, span.context, keep=False)
        seconds = call.try_timeout(now)
        request.extensions["timeout"] = _try_timeouts(timeouts, seconds)
        set_header(request.headers, _DEADLINE, call.header_deadline(now))
        return endpoint

    def _aim_tls(
        self, call: Call, request: httpx.Request, url: httpx.URL, endpoint: Endpoint
    ) -> None:
        """An instance serving mutual TLS, reached as ``outbound.mtls.over_tls`` decides: over
        TLS, checking its SPIFFE ID, or on its plaintext port; else ``NoMeshCertificate``."""
        extensions = request.extensions
        service = call.destination.service
        try:
            secure = mtls.over_tls(self.mesh, service, endpoint)
        except mtls.NoCertificate as exc:
            raise NoMeshCertificate(str(exc), request=request) from None
        if not secure:
            request.url = aim_plain(url, endpoint)
            extensions[MESH_TLS] = False
            return
        request.url = aim(url, endpoint)
        extensions[MESH_TLS] = True
        extensions["sni_hostname"] = service  # the SPIFFE ID to expect

    def failed(
        self, call: Call, endpoint: Endpoint, request: httpx.Request, exc: httpx.TransportError
    ) -> None:
        """A try failed: return to retry (after ``call.delay``), else raise what the caller gets."""
        request.url = call.url  # what the caller asked for, in errors and redirects alike
        failure = classify(exc)
        now = time.monotonic()
        name = type(exc).__name__
        if failure is None:
            call.broke(endpoint, now)
            self.finish(call, request, 0, [], endpoint, error=name)
            raise exc
        verdict = call.failed(endpoint, failure, now)
        if verdict is Next.RETRY:
            call.span.end(None, error=name)
            self.telemetry.retried(call, failure.value)
            return
        flags = [FLAG_OF_FAILURE[failure]]
        if verdict is Next.DEADLINE:
            flags.append(metrics.DEADLINE)
        elif verdict is Next.BUDGET:
            flags.append(metrics.BUDGET)
        self.finish(call, request, 0, flags, endpoint, error=name)
        error = self.give_up(verdict, call, request, exc)
        if error is exc:
            raise exc
        raise error from exc

    def answered(self, call: Call, endpoint: Endpoint, response: httpx.Response) -> bool:
        """A try got an answer: ``True`` to return it, ``False`` to retry after ``call.delay``."""
        status = response.status_code
        retry_after = response.headers.get("retry-after") if status >= 400 else None
        if call.answered(endpoint, status, retry_after, time.monotonic()) is not Next.RETRY:
            return True
        call.span.end(status)
        self.telemetry.retried(call, str(status))
        return False

    def settle(
        self,
        call: Call,
        request: httpx.Request,
        url: httpx.URL,
        endpoint: Endpoint,
        response: httpx.Response,
    ) -> bool:
        """The answer is the call's: put the service URL back on the request (redirects resolve
        against the service, not the instance). ``True`` when its body is still to be read, so
        the caller wraps the stream that records the call at close; an answer already read (a
        MockTransport's) is recorded now."""
        request.url = url
        if not response.is_closed:
            return True
        self.finish(
            call,
            request,
            response.status_code,
            [],
            endpoint,
            response_bytes=len(response.content),
        )
        return False

    def finish(
        self,
        call: Call,
        request: httpx.Request,
        status: int,
        flags: list[str],
        endpoint: Endpoint | None,
        *,
        response_bytes: int = 0,
        error: str | None = None,
    ) -> None:
        """The call is over: record it (the span, metrics, the edge report, the access log)."""
        if call.panic:
            flags.append(metrics.EJECTED_PANIC)
        self.telemetry.finished(
            call,
            method=request.method,
            status=status,
            flags=flags,
            version=endpoint.version if endpoint is not None else None,
            upstream=endpoint.authority if endpoint is not None else None,
            span=call.span,
            request_bytes=_request_size(request),
            response_bytes=response_bytes,
            error=error,
        )

    def give_up(
        self, verdict: Next, call: Call, request: httpx.Request, exc: httpx.TransportError
    ) -> httpx.HTTPError:
        """The exception to raise after a failed try that is not retried."""
        if verdict is Next.DEADLINE:
            return DeadlineExceeded(
                f"{call.destination.service}: deadline of "
                f"{call.deadline - call.started:.3g} s exceeded after {call.attempt} tries "
                f"({type(exc).__name__})",
                request=request,
            )
        if verdict is Next.BUDGET:
            return RetryBudgetExhausted(
                f"{call.destination.service}: retry budget exhausted; not retrying "
                f"{type(exc).__name__}: {exc}",
                request=request,
            )
        return exc

    def shadow(self, call: Call, request: httpx.Request) -> httpx.Request | None:
        """The mirrored copy of ``request`` (Envoy marks its host ``-shadow``), if one is due."""
        if not call.mirrored or not call.replayable or call.endpoint_set is None:
            return None
        subset = call.endpoint_set.subset(call.mirror_version)
        if not subset:
            return None
        endpoint = random.choice(subset)
        headers = request.headers.copy()
        headers["host"] = f"{call.destination.service}-shadow"
        headers[_SHADOW] = "1"  # a copy, off the request path
        seconds = call.try_timeout(time.monotonic())
        shadow = httpx.Request(
            request.method,
            request.url,
            headers=headers,
            content=request.content,
            extensions={"timeout": _try_timeouts(None, seconds)},
        )
        if endpoint.tls:
            try:
                self._aim_tls(call, shadow, request.url, endpoint)
            except NoMeshCertificate:
                return None  # a shadow never affects the call it copies
        else:
            shadow.url = aim(request.url, endpoint)
        return shadow


def _identity(request: httpx.Request, token: str | None, mesh: Mesh, service: str) -> None:
    if token is None:
        return
    set_header(request.headers, _IDENTITY, token, keep=True)
    user = mesh.forwarded_user(service)
    if user is not None:
        set_header(request.headers, _FORWARDED_USER, user, keep=True)


# -- async --------------------------------------------------------------------------------


class AsyncMeshTransport(httpx.AsyncBaseTransport):
    """An ``httpx.AsyncBaseTransport`` that sends mesh destinations through the mesh.

    ``transport`` is the transport that really sends (default: ``httpx.AsyncHTTPTransport``
    built from ``transport_options``).
    """

    def __init__(
        self,
        mesh: Mesh,
        transport: httpx.AsyncBaseTransport | None = None,
        **transport_options: Any,
    ) -> None:
        self.mesh = mesh
        self.transport = transport or httpx.AsyncHTTPTransport(**transport_options)
        self._options = transport_options
        self._tls: httpx.AsyncBaseTransport | None = None
        self._plane = _Plane(mesh)
        self._mirrors: set[asyncio.Task[None]] = set()

    def _tls_transport(self) -> httpx.AsyncBaseTransport:
        """Where mutual-TLS tries go: one pool of the mesh's own, presenting this instance's
        certificate and checking the server's SPIFFE ID, whatever transport was given for the
        rest (``transport_options`` apply to it, ``verify`` and ``cert`` excepted)."""
        if self._tls is None:
            self._tls = httpx.AsyncHTTPTransport(**_tls_transport_options(self.mesh, self._options))
        return self._tls

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        plane = self._plane
        destination = plane.destination(request)
        if destination is None:
            return await self.transport.handle_async_request(request)
        call = plane.begin(destination, request)
        try:
            if call.endpoint_set is None:
                call.endpoint_set = await anyio.to_thread.run_sync(
                    destination.wait_for_endpoints,
                    min(_FIRST_WAIT, call.remaining(time.monotonic())),
                )
            mesh = self.mesh
            token = mesh.cached_identity_token(destination.service)
            if token is None and mesh.registry_url is not None:
                token = await anyio.to_thread.run_sync(mesh.identity_token, destination.service)
            _identity(request, token, mesh, destination.service)
            if mtls.certificate_due(mesh, call.endpoint_set):
                await anyio.to_thread.run_sync(mesh.client_tls)
            shadow = plane.shadow(call, request)
            if shadow is not None:
                self._mirror(shadow)
            url = request.url
            timeouts = request.extensions.get("timeout")
            send = self.transport.handle_async_request
            extensions = request.extensions
            while True:
                endpoint = plane.aim(call, request, url, timeouts, time.monotonic())
                try:
                    if extensions[MESH_TLS]:
                        response = await self._tls_transport().handle_async_request(request)
                    else:
                        response = await send(request)
                except httpx.TransportError as exc:
                    plane.failed(call, endpoint, request, exc)  # returns only to retry
                    await anyio.sleep(call.delay)
                    continue
                except BaseException:
                    call.broke(endpoint, time.monotonic())
                    raise
                if plane.answered(call, endpoint, response):
                    if plane.settle(call, request, url, endpoint, response):
                        response.stream = _AsyncDeadlineStream(
                            response.stream, plane, call, request, response, endpoint
                        )
                    return response
                await response.aclose()
                await anyio.sleep(call.delay)
        finally:
            call.finish()

    def _mirror(self, shadow: httpx.Request) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # another event loop (trio): mirroring needs asyncio tasks
        if not mirror_slots.take():
            return
        task = loop.create_task(self._send_shadow(shadow))
        self._mirrors.add(task)
        task.add_done_callback(self._mirrors.discard)

    async def _send_shadow(self, shadow: httpx.Request) -> None:
        try:
            transport = self._tls_transport() if shadow.extensions.get(MESH_TLS) else self.transport
            response = await transport.handle_async_request(shadow)
            try:
                await response.aread()
            finally:
                await response.aclose()
        except Exception:  # a shadow never affects the caller; it is only counted
            mirror_slots.give(failed=True)
        except BaseException:  # cancelled (the client closed): the slot is free all the same
            mirror_slots.give(failed=True)
            raise
        else:
            mirror_slots.give()

    async def aclose(self) -> None:
        for task in list(self._mirrors):
            task.cancel()
        await self.transport.aclose()
        if self._tls is not None:
            await self._tls.aclose()


# -- sync ---------------------------------------------------------------------------------


class MeshTransport(httpx.BaseTransport):
    """An ``httpx.BaseTransport`` that sends mesh destinations through the mesh.

    ``transport`` is the transport that really sends (default: ``httpx.HTTPTransport`` built
    from ``transport_options``).
    """

    def __init__(
        self,
        mesh: Mesh,
        transport: httpx.BaseTransport | None = None,
        **transport_options: Any,
    ) -> None:
        self.mesh = mesh
        self.transport = transport or httpx.HTTPTransport(**transport_options)
        self._options = transport_options
        self._tls: httpx.BaseTransport | None = None
        self._tls_lock = threading.Lock()
        self._plane = _Plane(mesh)
        self._shadows = ShadowSender()

    def _tls_transport(self) -> httpx.BaseTransport:
        """Where mutual-TLS tries go (see ``AsyncMeshTransport._tls_transport``)."""
        with self._tls_lock:
            if self._tls is None:
                self._tls = httpx.HTTPTransport(**_tls_transport_options(self.mesh, self._options))
            return self._tls

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        plane = self._plane
        destination = plane.destination(request)
        if destination is None:
            return self.transport.handle_request(request)
        call = plane.begin(destination, request)
        try:
            if call.endpoint_set is None:
                call.endpoint_set = destination.wait_for_endpoints(
                    min(_FIRST_WAIT, call.remaining(time.monotonic()))
                )
            mesh = self.mesh
            _identity(request, mesh.identity_token(destination.service), mesh, destination.service)
            if mtls.certificate_due(mesh, call.endpoint_set):
                mesh.client_tls()
            shadow = plane.shadow(call, request)
            if shadow is not None:
                self._shadows.submit(partial(self._send_shadow, shadow))
            url = request.url
            timeouts = request.extensions.get("timeout")
            send = self.transport.handle_request
            extensions = request.extensions
            while True:
                endpoint = plane.aim(call, request, url, timeouts, time.monotonic())
                try:
                    if extensions[MESH_TLS]:
                        response = self._tls_transport().handle_request(request)
                    else:
                        response = send(request)
                except httpx.TransportError as exc:
                    plane.failed(call, endpoint, request, exc)  # returns only to retry
                    time.sleep(call.delay)
                    continue
                except BaseException:
                    call.broke(endpoint, time.monotonic())
                    raise
                if plane.answered(call, endpoint, response):
                    if plane.settle(call, request, url, endpoint, response):
                        response.stream = _DeadlineStream(
                            response.stream, plane, call, request, response, endpoint
                        )
                    return response
                response.close()
                time.sleep(call.delay)
        finally:
            call.finish()

    def _send_shadow(self, shadow: httpx.Request) -> None:
        transport = self._tls_transport() if shadow.extensions.get(MESH_TLS) else self.transport
        response = transport.handle_request(shadow)
        try:
            response.read()
        finally:
            response.close()

    def close(self) -> None:
        self._shadows.close()
        self.transport.close()
        if self._tls is not None:
            self._tls.close()
