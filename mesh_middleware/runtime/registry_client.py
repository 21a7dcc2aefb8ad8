"""The calls the runtime makes to the registry (docs/registry-api.md), with explicit timeouts.

Only the background thread and on-demand token fetches use it; never a request being served.
Several registry URLs (replicas sharing one state) are tried in turn: see :class:`RegistryClient`.
"""

from __future__ import annotations

import base64
import json
import os
import re
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import structlog

from mesh_middleware import defaults
from mesh_middleware._version import __version__
from mesh_middleware.identity.registry_trust import registry_verify
from mesh_middleware.policy.durations import parse_duration

__all__ = [
    "IssuedCertificate",
    "IssuedToken",
    "RegistryClient",
    "RegistryError",
    "RegistryRefused",
    "RegistryUnavailable",
    "TrustBundle",
    "parse_registry_urls",
    "registry_verify",
]

log = structlog.get_logger("mesh.runtime")


_TRUST_DOMAIN = re.compile(r"^[a-z0-9._-]{1,255}$")


_MAX_ANSWER_BYTES = 4 * 1024 * 1024


class RegistryError(Exception):
    """A registry call did not succeed."""


class RegistryUnavailable(RegistryError):
    """The registry could not be reached, timed out, failed (5xx) or answered nonsense."""


class _NotSent(RegistryUnavailable):
    """No connection was made: the request surely reached no registry."""


class RegistryRefused(RegistryError):
    """The registry answered and said no (4xx): a configuration problem, not an outage."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status}: {reason}")
        self.status = status
        self.reason = reason


@dataclass(frozen=True, slots=True)
class TrustBundle:
    """What the registry says about the trust domain it issues identities for."""

    trust_domain: str
    issuer: str
    jwks_url: str
    jwks_urls: tuple[str, ...] = ()
    """Where the JWKS is, in the order to try: one per registry URL (``jwks_url`` first)."""

    def __post_init__(self) -> None:
        if not self.jwks_urls:
            object.__setattr__(self, "jwks_urls", (self.jwks_url,))


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """A JWT-SVID and how long it lives (``lifetime`` from its own ``iat``/``exp`` claims)."""

    token: str
    audience: str
    expires_at: float
    lifetime: float


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    """A leaf certificate from the mesh CA, and the trust bundle that came with it."""

    certificate: str
    not_before: float
    expires_at: float
    serial: str
    bundle: tuple[str, ...]
    bundle_index: int
    lifetime: float  # seconds from issue to expiry, as the CA counts them (no clock skew)


def parse_registry_urls(urls: str | Sequence[str]) -> tuple[str, ...]:
    """The registry URLs of ``urls``: a comma-separated string, or a sequence of URLs.

    Whitespace around each URL and a trailing ``/`` are dropped, and a repeated URL is kept
    once. Raises ``ValueError`` naming an item that is not an ``http://`` or ``https://`` URL,
    and for a list without any URL.
    """
    items = urls.split(",") if isinstance(urls, str) else list(urls)
    if not any(item.strip() for item in items):
        raise ValueError("no registry URL given")
    parsed: list[str] = []
    for item in items:
        url = item.strip()
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"registry URL must start with http:// or https://, got {url!r}")
        url = url.rstrip("/")
        if url not in parsed:
            parsed.append(url)
    return tuple(parsed)


class RegistryClient:
    """Synchronous, thread-safe calls to the registry, authenticated by the join token.

    ``base_url`` may name several replicas of one registry (a comma-separated string or a
    sequence of URLs); they share one state, so any of them answers any call. A call goes to the
    current URL (:attr:`base_url`); when that one is unavailable (``RegistryUnavailable``: no
    connection, a timeout, 5xx, 408, 429, an answer too large or too slow) the call goes on at
    once to the next, each URL at most once per call, and the URL that answers becomes the
    current one. A refusal (4xx) is the answer of every replica alike: it is not retried.
    Each such move is logged once, as a warning ``registry_failover``, to ``logger`` (a
    structlog logger; by default ``mesh.runtime``'s).
    """

    def __init__(
        self,
        base_url: str | Sequence[str],
        join_token: str | None = None,
        *,
        timeout: float = defaults.REGISTRY_TIMEOUT_SECONDS,
        logger: Any = None,
    ) -> None:
        self.base_urls = parse_registry_urls(base_url)
        """Every registry URL, in the order given."""
        self._current = 0
        self._log = logger if logger is not None else log
        self.join_token = join_token or None
        self.timeout = timeout
        self._lock = threading.Lock()
        self._client: httpx.Client | None = None
        ref = weakref.ref(self)

        def forget_in_child() -> None:
            # Pooled connections belong to the parent; a child opens its own.
            client = ref()
            if client is not None:
                client._lock = threading.Lock()
                client._client = None

        os.register_at_fork(after_in_child=forget_in_child)

    @property
    def base_url(self) -> str:
        """The registry URL in use: the next call starts there."""
        return self.base_urls[self._current]

    @property
    def failover_order(self) -> tuple[str, ...]:
        """Every registry URL in the order the next call tries them, the current one first."""
        current = self._current
        return self.base_urls[current:] + self.base_urls[:current]

    def _http(self) -> httpx.Client:
        with self._lock:
            if self._client is None:
                headers = {"user-agent": f"mesh-middleware/{__version__}"}
                if self.join_token:
                    headers["authorization"] = f"Bearer {self.join_token}"
                self._client = httpx.Client(
                    timeout=self.timeout,
                    headers=headers,
                    follow_redirects=False,
                    verify=registry_verify(),
                )
            return self._client

    def close(self) -> None:
        """Close pooled connections."""
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    def _call(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        timeout: float | None = None,
        idempotent: bool = True,
    ) -> tuple[int, Any]:
        start = self._current
        count = len(self.base_urls)
        tried: list[str] = []
        first: RegistryUnavailable | None = None
        last: RegistryUnavailable | None = None
        for step in range(count):
            index = (start + step) % count
            url = self.base_urls[index]
            tried.append(url)
            try:
                answer = self._call_at(url, method, path, body=body, timeout=timeout)
            except RegistryUnavailable as exc:
                first = first or exc
                last = exc
                if not idempotent and not isinstance(exc, _NotSent):
                    break  # it may have been done: doing it again is not harmless
                continue
            except RegistryRefused:
                self._answered(start, index, first)
                raise
            self._answered(start, index, first)
            return answer
        assert last is not None
        if count == 1:
            raise last
        raise RegistryUnavailable(f"{last} (tried {', '.join(tried)})") from None

    def _answered(self, start: int, index: int, error: RegistryUnavailable | None) -> None:
        """Make the URL that answered the current one (once, when calls race to move it)."""
        if index == start:
            return
        with self._lock:
            if self._current != start:
                return
            self._current = index
        self._log.warning(
            "registry_failover",
            **{"from": self.base_urls[start]},
            to=self.base_urls[index],
            error=str(error),
        )

    def _call_at(
        self, url: str, method: str, path: str, *, body: Any, timeout: float | None
    ) -> tuple[int, Any]:
        limit = timeout if timeout is not None else self.timeout
        # httpx's timeouts are per operation; a registry (or proxy) that trickles its answer is
        # cut off by an overall deadline, and answers are capped in size.
        deadline = time.monotonic() + limit * 2
        try:
            with self._http().stream(method, url + path, json=body, timeout=limit) as response:
                content = bytearray()
                for chunk in response.iter_bytes():
                    content += chunk
                    if len(content) > _MAX_ANSWER_BYTES:
                        raise RegistryUnavailable(f"{method} {path}: answer too large")
                    if time.monotonic() > deadline:
                        raise RegistryUnavailable(f"{method} {path}: answer too slow")
                status = response.status_code
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise _NotSent(f"{method} {path}: {type(exc).__name__}: {exc}") from None
        except httpx.HTTPError as exc:
            raise RegistryUnavailable(f"{method} {path}: {type(exc).__name__}: {exc}") from None
        try:
            answer = json.loads(bytes(content)) if content else None
        except ValueError:
            answer = None
        if status >= 500 or status in (408, 429):
            raise RegistryUnavailable(f"{method} {path}: {status} {_reason(answer)}")
        if status >= 400 and status != 404:
            raise RegistryRefused(status, _reason(answer))
        return status, answer

    def trust(self) -> TrustBundle:
        """``GET /v1/identity/trust``: the trust domain, issuer and JWKS location."""
        try:
            _, answer = self._ok("GET", "/v1/identity/trust")
        except RegistryRefused as exc:
            # Nothing here needs a credential: whatever answered is not a usable registry.
            raise RegistryUnavailable(
                f"trust: {exc} (is {self.base_url} a mesh registry?)"
            ) from None
        if not isinstance(answer, dict):
            raise RegistryUnavailable("trust: the answer is not an object")
        domain, issuer, jwks_uri = (answer.get(k) for k in ("trust_domain", "issuer", "jwks_uri"))
        if not isinstance(domain, str) or not _TRUST_DOMAIN.match(domain):
            raise RegistryUnavailable(f"trust: invalid trust_domain {domain!r}")
        if not isinstance(issuer, str) or not issuer:
            raise RegistryUnavailable(f"trust: invalid issuer {issuer!r}")
        if not isinstance(jwks_uri, str) or not jwks_uri:
            raise RegistryUnavailable(f"trust: invalid jwks_uri {jwks_uri!r}")
        if jwks_uri.startswith("/"):
            # Every replica serves the JWKS: the one that just answered first. Each keeps its
            # URL's path prefix (a registry behind a proxy).
            jwks_urls = tuple(base + jwks_uri for base in self.failover_order)
        elif jwks_uri.startswith(("http://", "https://")):
            jwks_urls = (jwks_uri,)
        else:
            raise RegistryUnavailable(f"trust: jwks_uri {jwks_uri!r} is neither a path nor a URL")
        return TrustBundle(domain, issuer, jwks_urls[0], jwks_urls)

    def register(self, service: str, instance: str, body: dict[str, Any]) -> None:
        """``PUT`` the instance: registers it, or renews its lease (idempotent)."""
        self._ok("PUT", _instance_path(service, instance), body=body)

    def deregister(self, service: str, instance: str) -> bool:
        """``DELETE`` the instance; ``False`` if the registry did not know it."""
        status, _ = self._call("DELETE", _instance_path(service, instance))
        return status != 404

    def token(
        self,
        service: str,
        audience: str,
        *,
        timeout: float | None = None,
        cnf: dict[str, str] | None = None,
    ) -> IssuedToken:
        """``POST /v1/identity/token``: a JWT-SVID for calling ``audience``, binding ``cnf``
        (this process's public key for forwarding end users) when given."""
        body: dict[str, Any] = {"audience": audience}
        if cnf is not None:
            body["cnf"] = cnf
        if not self.join_token:
            body["service"] = service  # dev-mode registries take the service from the body
        _, answer = self._ok("POST", "/v1/identity/token", body=body, timeout=timeout)
        if not isinstance(answer, dict):
            raise RegistryUnavailable("token: the answer is not an object")
        token, expires_at = answer.get("token"), answer.get("expires_at")
        if not isinstance(token, str) or not token or not isinstance(expires_at, int | float):
            raise RegistryUnavailable("token: the answer lacks token or expires_at")
        return IssuedToken(token, audience, float(expires_at), _lifetime(token, expires_at))

    def certificate(
        self, service: str, csr: str, *, timeout: float | None = None
    ) -> IssuedCertificate:
        """``POST /v1/ca/certificates``: the CA signs ``csr`` for this service."""
        body: dict[str, str] = {"csr": csr}
        if not self.join_token:
            body["service"] = service  # dev-mode registries take the service from the body
        _, answer = self._ok("POST", "/v1/ca/certificates", body=body, timeout=timeout)
        if not isinstance(answer, dict):
            raise RegistryUnavailable("certificate: the answer is not an object")
        pem, not_before, expires_at = (
            answer.get(k) for k in ("certificate", "not_before", "expires_at")
        )
        if (
            not isinstance(pem, str)
            or not isinstance(not_before, int | float)
            or not isinstance(expires_at, int | float)
        ):
            raise RegistryUnavailable("certificate: the answer lacks certificate or its validity")
        bundle, index = _bundle_answer(answer, "bundle_index")
        expires_in = answer.get("expires_in")
        lifetime = (
            float(expires_in)
            if isinstance(expires_in, int | float) and expires_in > 0
            else max(float(expires_at) - time.time(), 0.0)
        )
        return IssuedCertificate(
            pem,
            float(not_before),
            float(expires_at),
            str(answer.get("serial")),
            bundle,
            index,
            lifetime,
        )

    def ca_bundle(self, *, timeout: float | None = None) -> tuple[int, tuple[str, ...]]:
        """``GET /v1/ca/bundle``: the index and PEM of every trusted root."""
        _, answer = self._ok("GET", "/v1/ca/bundle", timeout=timeout)
        if not isinstance(answer, dict):
            raise RegistryUnavailable("bundle: the answer is not an object")
        bundle, index = _bundle_answer(answer, "index")
        return index, bundle

    def instances(
        self, service: str, *, index: int | None, wait: str | None, timeout: float
    ) -> tuple[int, list[dict[str, Any]]]:
        """``GET /v1/catalog/services/{service}?healthy=true``: the index and healthy instances.

        With ``index`` (and ``wait``, e.g. ``"30s"``) it is a watch: the registry answers once the
        service's index passes ``index`` or the wait (plus up to 1/16 of it) ends. ``timeout``
        bounds each phase beyond that wait. A malformed answer raises ``RegistryUnavailable``.
        """
        path = f"/v1/catalog/services/{quote(service, safe='')}?healthy=true"
        limit = timeout
        if index is not None:
            path += f"&index={index}"
            if wait is not None:
                path += f"&wait={quote(wait, safe='')}"
            # The registry holds the answer back for the wait plus its jitter.
            limit += _wait_seconds(wait) * 17 / 16
        _, answer = self._ok("GET", path, timeout=limit)
        return _instances_answer(answer)

    def report(self, body: dict[str, Any]) -> None:
        """``POST /v1/telemetry/reports``: one telemetry report (see ``telemetry/reports.py``).

        Raises ``RegistryUnavailable`` (keep the report, try later) or ``RegistryRefused``
        (the registry will not take it: drop it).
        """
        self._ok("POST", "/v1/telemetry/reports", body=body)

    def request(self, method: str, path: str, *, body: Any = None, idempotent: bool = True) -> Any:
        """Any other call of the registry API (the ``mesh`` command's): the JSON answer.

        Raises ``RegistryUnavailable``, or ``RegistryRefused`` for any 4xx (404 included).
        With ``idempotent=False`` (creating a join token, rotating the CA) the call goes on to
        the next URL only when no connection could be made at all, so that an answer lost on
        its way back never has the call done twice.
        """
        return self._ok(method, path, body=body, idempotent=idempotent)[1]

    def _ok(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        timeout: float | None = None,
        idempotent: bool = True,
    ) -> tuple[int, Any]:
        status, answer = self._call(method, path, body=body, timeout=timeout, idempotent=idempotent)
        if status == 404:
            raise RegistryRefused(status, _reason(answer))
        return status, answer


def _instance_path(service: str, instance: str) -> str:
    return f"/v1/catalog/services/{quote(service, safe='')}/instances/{quote(instance, safe='')}"


_DEFAULT_WAIT_SECONDS = 30.0  # the registry's wait when a watch names none


def _wait_seconds(wait: str | None) -> float:
    if wait is None:
        return _DEFAULT_WAIT_SECONDS
    try:
        return parse_duration(wait)
    except ValueError:
        raise ValueError(f"wait must be a duration like '30s', got {wait!r}") from None


def _instances_answer(answer: Any) -> tuple[int, list[dict[str, Any]]]:
    if not isinstance(answer, dict):
        raise RegistryUnavailable("instances: the answer is not an object")
    index, instances = answer.get("index"), answer.get("instances")
    if type(index) is not int or index < 0:
        raise RegistryUnavailable(f"instances: invalid index {index!r}")
    if not isinstance(instances, list):
        raise RegistryUnavailable("instances: the answer lacks an instance list")
    for instance in instances:
        if not _valid_instance(instance):
            raise RegistryUnavailable(f"instances: malformed instance {str(instance)[:200]}")
    return index, instances


def _valid_instance(instance: Any) -> bool:
    if not isinstance(instance, dict):
        return False
    port = instance.get("port")
    return (
        isinstance(instance.get("id"), str)
        and isinstance(instance.get("address"), str)
        and bool(instance["id"] and instance["address"])
        and type(port) is int
        and 1 <= port <= 65535
        and all(isinstance(instance.get(k), str | None) for k in ("version", "zone"))
    )


def _bundle_answer(answer: dict[str, Any], index_key: str) -> tuple[tuple[str, ...], int]:
    bundle, index = answer.get("bundle"), answer.get(index_key)
    if (
        not isinstance(bundle, list)
        or not bundle
        or not all(isinstance(pem, str) and "BEGIN CERTIFICATE" in pem for pem in bundle)
    ):
        raise RegistryUnavailable("the answer lacks a trust bundle of PEM certificates")
    if type(index) is not int:
        raise RegistryUnavailable(f"invalid bundle index {index!r}")
    return tuple(bundle), index


def _reason(answer: Any) -> str:
    if isinstance(answer, dict):
        reason = answer.get("reason") or answer.get("error")
        if isinstance(reason, str):
            return reason[:300]
    return "no reason given"


def _lifetime(token: str, expires_at: float) -> float:
    """How long a token lives, from its own claims, so a skewed local clock does not matter."""
    try:
        segment = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
        lifetime = float(claims["exp"]) - float(claims["iat"])
        if lifetime > 0:
            return lifetime
    except (IndexError, KeyError, TypeError, ValueError):
        pass
    return max(float(expires_at) - time.time(), 0.0)
