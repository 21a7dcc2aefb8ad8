"""The Mesh runtime: one per process, shared by the middlewares (and later the clients)."""

from __future__ import annotations

import atexit
import dataclasses
import os
import threading
import time
import weakref
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from mesh_middleware import defaults
from mesh_middleware.discovery.catalog import Discovery
from mesh_middleware.errors import IdentityError
from mesh_middleware.identity.end_user_keys import EndUserKeyring
from mesh_middleware.identity.forwarded_user import UserForwarder
from mesh_middleware.identity.keys import KeyStore
from mesh_middleware.identity.spiffe import service_id
from mesh_middleware.identity.verifier import TokenVerifier
from mesh_middleware.inbound.engine import InboundEngine
from mesh_middleware.inbound.telemetry import InboundTelemetry
from mesh_middleware.outbound.engine import OutboundEngine
from mesh_middleware.outbound.telemetry import OutboundTelemetry
from mesh_middleware.policy.compiled import CompiledPolicy, compile_policy, compile_policy_file
from mesh_middleware.policy.durations import parse_duration
from mesh_middleware.runtime.address import AddressFinder, parse_advertise
from mesh_middleware.runtime.background import BackgroundLoop
from mesh_middleware.runtime.certificates import CertificateManager, TLSContexts, TLSFiles
from mesh_middleware.runtime.context import current_user
from mesh_middleware.runtime.policy_watch import PolicyFileWatch
from mesh_middleware.runtime.registration import Registration
from mesh_middleware.runtime.registry_client import RegistryClient, TrustBundle
from mesh_middleware.runtime.registry_link import RegistryLink
from mesh_middleware.runtime.tokens import TokenCache
from mesh_middleware.telemetry.access_log import flush_access_logs
from mesh_middleware.telemetry.otel import enable_otlp
from mesh_middleware.telemetry.reports import EdgeReporter

if TYPE_CHECKING:
    import ssl

    import httpx
    import requests

__all__ = ["Mesh", "resolve_mesh"]

log = structlog.get_logger("mesh.runtime")


class Mesh:
    """The mesh inside one process: its policy, its identity checks, its background work.

    >>> mesh = Mesh("policy.yaml", registry_url="http://127.0.0.1:7400")  # doctest: +SKIP
    >>> app.add_middleware(MeshMiddleware, mesh=mesh)  # doctest: +SKIP

    ``policy`` is a policy file (hot-reloaded) or an already compiled policy.

    With ``registry_url`` the Mesh learns its trust domain, issuer and verification keys from
    the registry, and — once :meth:`start` is called (the middlewares do it: ASGI lifespan
    startup, or the first WSGI request) — registers this instance, renews its lease, and
    fetches and renews identity tokens, all in one background thread (see docs/runtime.md).
    ``join_token`` authenticates it (omit it for a ``--dev`` registry); ``advertise``
    (``host:port``) overrides the address found from the process's listening socket.
    ``registry_url`` may list several replicas of the registry, comma-separated: each call
    goes on to the next one when one is unavailable.

    Without a registry it runs standalone: ``jwks`` is a JWKS file or URL holding the trust
    domain's verification keys; without one, no identity can be verified, so a strict policy
    answers 401 to everything but public paths. Given with a registry, ``jwks``, ``issuer``
    and ``trust_domain`` take precedence over what the registry says. With a registry, this
    process's requests are also reported to it per edge every ``report_interval`` seconds.
    ``version`` (``MESH_VERSION``) replaces the policy's ``version``: one app and policy file
    deployed as two versions, a canary.
    """

    def __init__(
        self,
        policy: str | Path | CompiledPolicy,
        *,
        jwks: str | Path | None = None,
        issuer: str | None = None,
        trust_domain: str | None = None,
        watch: bool = True,
        poll_interval: float = defaults.POLICY_POLL_SECONDS,
        registry_url: str | None = None,
        join_token: str | None = None,
        advertise: str | None = None,
        registration_ttl: str = defaults.REGISTRATION_TTL,
        registry_timeout: float = defaults.REGISTRY_TIMEOUT_SECONDS,
        report_interval: float = defaults.REPORT_INTERVAL_SECONDS,
        version: str | None = None,
        tls_dir: str | Path | None = None,
    ) -> None:
        if version is not None and not 0 < len(version) <= 63:
            raise ValueError(f"version must be 1 to 63 characters, got {version!r}")
        self._version = version
        if isinstance(policy, CompiledPolicy):
            compiled, self.policy_file = policy, None
        else:
            self.policy_file = Path(policy)
            compiled = compile_policy_file(self.policy_file)  # fail closed: no policy, no app
        self.trust_domain = trust_domain or defaults.DEFAULT_TRUST_DOMAIN
        self._trust_domain_pinned = trust_domain is not None
        self._issuer_pinned = issuer is not None
        self.registry_url = registry_url or None
        self._keys_from_registry = self.registry_url is not None and jwks is None
        self._export: tuple[str | None, str | None] = (None, None)  # OTLP endpoint, service
        self.end_user_keys = EndUserKeyring()
        """The keys of the end-user issuers the policy names, fetched in the background."""
        self.user_forwarder = UserForwarder()
        """Signs the end users this process forwards (its identity tokens bind the key)."""
        self._install(compiled)
        self.keys = KeyStore(jwks)
        keys_loaded = jwks is not None and self.keys.refresh()
        if jwks is not None and not keys_loaded:
            log.warning("jwks_unavailable_at_start", source=str(jwks), error=self.keys.last_error)
        self.verifier = TokenVerifier(self.keys, trust_domain=self.trust_domain, issuer=issuer)
        # Read for every request: C-level getters, so that costs no Python frame.
        self._state_now: Callable[[], tuple[CompiledPolicy, str]] = partial(getattr, self, "_state")
        self.inbound = InboundEngine(self._state_now, self.verifier)
        if jwks is None and compiled.strict and self.registry_url is None:
            log.warning(
                "no_jwks_configured",
                service=compiled.service,
                effect="strict authentication will answer 401 to every non-public request",
            )
        self._watch_policy = watch
        self._watch = (
            PolicyFileWatch(self.policy_file, self._install, lambda: self.service)
            if self.policy_file
            else None
        )
        self._jwks_due = time.monotonic() + (defaults.JWKS_REFRESH_SECONDS if keys_loaded else 5.0)
        self._link: RegistryLink | None = None
        self._lifecycle = threading.Lock()
        self._atexit_pid: int | None = None
        if self.registry_url is not None:
            self._link = self._connect(
                self.registry_url, join_token, advertise, registration_ttl, registry_timeout
            )
            self._link.tick()  # learn trust and keys now if the registry answers; else retry
        self.certificates: CertificateManager | None = None
        self.tls: TLSContexts | None = None
        """This process's mutual-TLS contexts (``None`` without a registry or ``mesh run``)."""
        directory = tls_dir if tls_dir is not None else os.environ.get("MESH_TLS_DIR") or None
        if directory is not None:
            # Under `mesh run`: the launcher keeps the files fresh; this process reloads them.
            self.tls = TLSContexts(TLSFiles(Path(directory)))
            self.tls.reload_if_changed()
            mine = self.tls.spiffe_id is not None and self.tls.spiffe_id.endswith(
                f"/svc/{compiled.service}"
            )
            if not mine:
                # Another service's files (a process started by a `mesh run` app, say, that
                # inherited its environment): never present another service's certificate.
                log.warning(
                    "tls_dir_ignored",
                    directory=str(directory),
                    holds=self.tls.spiffe_id,
                    service=compiled.service,
                )
                self.tls = None
                directory = None
        if directory is None and self._link is not None:
            # What `mesh run` serves is only said by the app it runs (the one holding its files).
            self._link.registration.serving.clear()
            self.certificates = CertificateManager(
                self._link.client, lambda: self.service, lambda: self.trust_domain
            )
            self.tls = self.certificates.contexts
        self._loop = (
            BackgroundLoop("mesh-background", poll_interval, self._tick)
            if watch or self._link is not None or compiled.end_users is not None
            else None
        )
        self.discovery = Discovery(
            RegistryClient(self.registry_url, join_token, timeout=registry_timeout)
            if self.registry_url is not None
            else None
        )
        self.outbound = OutboundEngine(
            lambda: self._state[0], self.discovery, registry=self.registry_url is not None
        )
        self._report_interval = report_interval
        self.reporter = self._new_reporter()
        self.inbound_telemetry = InboundTelemetry(
            self._state_now, partial(getattr, self, "reporter")
        )
        self.outbound_telemetry = OutboundTelemetry(lambda: self._state[0], lambda: self.reporter)

    def _connect(
        self,
        registry_url: str,
        join_token: str | None,
        advertise: str | None,
        registration_ttl: str,
        timeout: float,
    ) -> RegistryLink:
        client = RegistryClient(registry_url, join_token, timeout=timeout)
        address = AddressFinder(parse_advertise(advertise) if advertise else None)
        return RegistryLink(
            client,
            keys=self.keys,
            keys_from_registry=self._keys_from_registry,
            registration=Registration(
                client, address, ttl=registration_ttl, serving=_serving_from_env()
            ),
            tokens=TokenCache(
                lambda audience, wait: client.token(
                    self.service, audience, timeout=wait, cnf=self.user_forwarder.public_jwk
                )
            ),
            policy=lambda: self._state[0],
            apply_trust=self._apply_trust,
        )

    def _new_reporter(self) -> EdgeReporter | None:
        link = self._link
        if link is None:
            return None
        client = link.client
        return EdgeReporter(
            client.report,
            service=self.service,
            instance=self.instance_id,
            interval=self._report_interval,
        )

    @classmethod
    def from_env(cls, **overrides: Any) -> Mesh:
        """A Mesh configured by the environment (explicit ``overrides`` win).

        ``MESH_POLICY`` (required), ``MESH_REGISTRY_URL``, ``MESH_JOIN_TOKEN``,
        ``MESH_ADVERTISE``, ``MESH_JWKS``, ``MESH_ISSUER``, ``MESH_TRUST_DOMAIN``,
        ``MESH_VERSION`` (overrides the policy's ``version``) and ``MESH_REPORT_INTERVAL`` (a
        duration like ``10s``).
        """
        policy = overrides.pop("policy", None) or os.environ.get("MESH_POLICY")
        if not policy:
            from mesh_middleware.errors import PolicyError, PolicyIssue

            raise PolicyError(
                [PolicyIssue("MESH_POLICY", None, "", "set MESH_POLICY to a policy file")]
            )
        options: dict[str, Any] = {
            "jwks": os.environ.get("MESH_JWKS") or None,
            "issuer": os.environ.get("MESH_ISSUER") or None,
            "trust_domain": os.environ.get("MESH_TRUST_DOMAIN") or None,
            "registry_url": os.environ.get("MESH_REGISTRY_URL") or None,
            "join_token": os.environ.get("MESH_JOIN_TOKEN") or None,
            "advertise": os.environ.get("MESH_ADVERTISE") or None,
            "version": os.environ.get("MESH_VERSION") or None,
        }
        interval = os.environ.get("MESH_REPORT_INTERVAL")
        if interval:
            options["report_interval"] = parse_duration(interval)
        options.update(overrides)
        return cls(policy, **options)

    # -- state ---------------------------------------------------------------------------

    def _install(self, compiled: CompiledPolicy) -> None:
        version = self._version
        if version is not None and compiled.loaded.policy.version != version:
            # The same app and policy deployed as another version (a canary): the deployment's
            # version wins over the file's, as a pod's label does in Istio.
            loaded = compiled.loaded
            policy = loaded.policy.model_copy(update={"version": version})
            compiled = compile_policy(dataclasses.replace(loaded, policy=policy))
        if compiled.end_users is not None:
            # Issuers the last policy named keep their keys; new ones are fetched at once.
            compiled.end_users.bind(self.end_user_keys)
        self.end_user_keys.retain(
            compiled.end_users.settings.issuers if compiled.end_users is not None else ()
        )
        # One attribute holds the policy and the audience derived from it, so a request never
        # sees a new policy with an old audience.
        self._state = (compiled, service_id(compiled.service, self.trust_domain))
        export = (compiled.loaded.policy.telemetry.tracing.otlp_endpoint, compiled.service)
        if export != self._export:
            self._export = export
            if export[0] is not None:
                # Spans go to the collector from a bounded queue in a background thread.
                enable_otlp(export[0], service_name=compiled.service)

    @property
    def policy(self) -> CompiledPolicy:
        """The policy in force now."""
        return self._state[0]

    @property
    def service(self) -> str:
        """This app's service name, from its policy file."""
        return self._state[0].service

    @property
    def version(self) -> str | None:
        """This instance's version: ``MESH_VERSION`` (``version=``) or the policy's ``version``."""
        return self._state[0].loaded.policy.version

    @property
    def spiffe_id(self) -> str:
        """This app's SPIFFE ID: the audience its callers' tokens must name."""
        return self._state[1]

    @property
    def reload_failures(self) -> int:
        """How many changed policy files were rejected since start."""
        return self._watch.failures if self._watch else 0

    @property
    def last_reload_error(self) -> str | None:
        """Why the last changed policy file was rejected, or ``None`` if it was accepted."""
        return self._watch.last_error if self._watch else None

    # -- the registry ------------------------------------------------------------------

    @property
    def registry_connected(self) -> bool:
        """Whether the last call to the registry succeeded (``False`` without a registry)."""
        return self._link is not None and self._link.connected

    @property
    def registry_stale_seconds(self) -> float:
        """Seconds since the registry last answered while it is unreachable; 0 when connected.

        Without a registry there is nothing to be stale about: always 0.
        """
        return self._link.stale_seconds if self._link is not None else 0.0

    @property
    def instance_id(self) -> str | None:
        """This instance's id in the catalog once registered, else ``None``."""
        return self._link.registration.instance_id if self._link is not None else None

    def identity_token(
        self, audience: str, *, wait: float = defaults.TOKEN_FETCH_WAIT_SECONDS
    ) -> str | None:
        """A JWT-SVID saying this service calls ``audience`` (a service name), or ``None``.

        Cached tokens are returned at once. A token not cached yet is fetched now, waiting at
        most about ``wait`` seconds — unless the registry is known to be down, when ``None`` is
        returned at once and the token is fetched in the background once it is back.
        Thread-safe; concurrent callers for one audience share one fetch.
        """
        link = self._link
        if link is None:
            return None
        token = link.tokens.get(audience)
        if token is not None:
            return token
        if link.in_outage or wait <= 0:
            link.tokens.want(audience)
            return None
        return link.tokens.fetch_now(audience, wait)

    def forwarded_user(self, destination: str) -> str | None:
        """The assertion forwarding the current request's end user to ``destination`` (a
        service name), or ``None``: no end user, or the policy does not forward to it
        (``outbound.forward_user``). Cached per user and destination; never blocks."""
        user = current_user.get()
        if user is None:
            return None
        policy = self._state[0]
        targets = policy.forward_user_to
        if targets is None or not targets.matches(destination):
            return None
        try:
            return self.user_forwarder.assertion(
                user,
                forwarder=self.spiffe_id,
                audience=service_id(destination, self.trust_domain),
                claims=policy.forward_user_claims,
            )
        except IdentityError:
            return None  # the user's token expired while the request was served

    def cached_identity_token(self, audience: str) -> str | None:
        """The cached JWT-SVID for calling ``audience``, or ``None``; never blocks."""
        link = self._link
        return link.tokens.get(audience) if link is not None else None

    def client_tls(
        self, *, wait: float = defaults.TOKEN_FETCH_WAIT_SECONDS
    ) -> ssl.SSLContext | None:
        """The context mutual-TLS calls use, once this instance holds a mesh certificate.

        ``None`` when the policy says ``mtls: off``, without a registry, or when no
        certificate could be had within about ``wait`` seconds (0: do not fetch now; it is
        then fetched in the background). The context is the same object for the Mesh's whole
        life; renewals change what it presents, not what it is.
        """
        tls = self.tls
        if tls is None or self._state[0].mtls == "off":
            return None
        if not tls.ready:
            certificates = self.certificates
            link = self._link
            if certificates is None:
                return None
            first = not certificates.wanted
            certificates.want()
            if wait <= 0 or (link is not None and link.in_outage):
                if first and self._loop is not None:
                    self._loop.wake()  # fetch it now, in the background
                return None
            certificates.obtain(timeout=wait)
        return tls.client if tls.ready else None

    # -- outbound clients ----------------------------------------------------------------

    def async_client(self, **options: Any) -> httpx.AsyncClient:
        """An ``httpx.AsyncClient`` whose calls to ``http://<service>/…`` go through the mesh.

        ``options`` are passed to ``httpx.AsyncClient`` (``transport`` excepted); calls to
        other hosts are sent as the client would, with a ``traceparent`` added.
        """
        import httpx

        from mesh_middleware.adapters.httpx import AsyncMeshTransport

        self.outbound.prefetch()
        return httpx.AsyncClient(transport=AsyncMeshTransport(self), **options)

    def client(self, **options: Any) -> httpx.Client:
        """An ``httpx.Client`` whose calls to ``http://<service>/…`` go through the mesh."""
        import httpx

        from mesh_middleware.adapters.httpx import MeshTransport

        self.outbound.prefetch()
        return httpx.Client(transport=MeshTransport(self), **options)

    def requests_session(self) -> requests.Session:
        """A ``requests.Session`` with the mesh's adapter mounted for ``http://`` and ``https://``.

        Needs the ``requests`` package (``pip install mesh-middleware[requests]``).
        """
        from mesh_middleware.adapters.requests import mesh_session

        self.outbound.prefetch()
        return mesh_session(self)

    def note_server_address(self, host: object, port: object) -> None:
        """The address a request arrived on: the fallback when no listening socket is found.

        Called by the middlewares on a first request; stores two values and never blocks.
        """
        if self._link is not None:
            self._link.registration.address.hint(host, port)

    def start(self, framework: str = "python") -> None:
        """Begin the registry work: register this instance and keep its lease and tokens fresh.

        Idempotent, thread-safe and quick (the work happens in the background thread).
        The middlewares call it: ASGI lifespan startup, or the first request. Does nothing
        without a registry.
        """
        link = self._link
        loop = self._loop
        if link is None or loop is None:
            return
        self.outbound.prefetch()
        with self._lifecycle:
            if not (link.started and loop.running):
                link.start(framework)
                loop.start()
                pid = os.getpid()
                if self._atexit_pid != pid:
                    # WSGI servers have no shutdown hook for apps; gunicorn workers exit
                    # through sys.exit, which runs atexit handlers.
                    self._atexit_pid = pid
                    atexit.register(_stop_at_exit, weakref.ref(self))
        loop.wake()

    def stop(self) -> None:
        """Deregister this instance and stop the background thread (clean shutdown).

        Blocks for at most a few seconds (one registry call). Does nothing without a registry;
        :meth:`start` may be called again afterwards.
        """
        link = self._link
        if link is None:
            return
        with self._lifecycle:
            if self._loop is not None:
                self._loop.stop()
            self._report(force=True)  # the last window, before this instance leaves
            if link.started:
                link.stop()

    def _apply_trust(self, bundle: TrustBundle) -> None:
        changed = False
        if bundle.trust_domain != self.trust_domain:
            if self._trust_domain_pinned:
                log.error(
                    "trust_domain_mismatch",
                    configured=self.trust_domain,
                    registry=bundle.trust_domain,
                    effect="tokens issued by this registry will be refused",
                )
            else:
                self.trust_domain = bundle.trust_domain
                self.verifier.trust_domain = bundle.trust_domain
                self._install(self._state[0])
                changed = True
        if not self._issuer_pinned and bundle.issuer != self.verifier.issuer:
            self.verifier.issuer = bundle.issuer
            changed = True
        if self._keys_from_registry:
            self.keys.sources = bundle.jwks_urls  # one per registry URL: they fail over
        if changed:
            self.verifier.clear_cache()

    # -- background ----------------------------------------------------------------------

    def reload_policy(self) -> bool:
        """Reload the policy file now; return whether the new policy is in force."""
        if self._watch is None:
            return False
        return self._watch.reload()

    def _tick(self) -> None:
        if self._watch is not None and self._watch_policy:
            self._watch.check()
        if self._link is not None:
            self._link.tick()
            self._report()
        if self.certificates is not None:
            self.certificates.tick()
        elif self.tls is not None:
            self.tls.reload_if_changed()
        self.end_user_keys.tick()
        if self.keys.source is None or self._keys_from_registry:
            return
        if self.keys.is_url:
            now = time.monotonic()
            if now >= self._jwks_due:
                ok = self.keys.refresh()
                self._jwks_due = now + (defaults.JWKS_REFRESH_SECONDS if ok else 5.0)
        else:
            self.keys.refresh_if_changed()

    def _report(self, *, force: bool = False) -> None:
        reporter = self.reporter
        if reporter is None:
            return
        if reporter.service != self.service:  # a reload renamed this service
            reporter.tick(force=True)
            reporter = self.reporter = self._new_reporter()
            if reporter is None:
                return
        reporter.instance = self.instance_id
        reporter.tick(force=force)

    def close(self) -> None:
        """Stop background work (policy watch, key refresh); with a registry, :meth:`stop` too."""
        self.stop()
        self.discovery.close()
        if self._loop is not None:
            self._loop.stop()
        if self._link is not None:
            self._link.client.close()
        if self.certificates is not None:
            self.certificates.close()
        flush_access_logs()

    def __enter__(self) -> Mesh:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _serving_from_env() -> dict[str, str]:
    """What ``mesh run`` serves, as registration metadata for callers."""
    serving: dict[str, str] = {}
    mode = os.environ.get("MESH_MTLS_SERVING")
    if mode in ("strict", "permissive"):
        serving["mtls"] = mode
        plain = os.environ.get("MESH_PLAIN_PORT")
        if mode == "permissive" and plain and plain.isdigit():
            serving["plain_port"] = plain
    return serving


def _stop_at_exit(ref: weakref.ref[Mesh]) -> None:
    mesh = ref()
    if mesh is not None:
        mesh.stop()


def resolve_mesh(
    middleware: str,
    mesh: Mesh | None,
    policy: str | Path | None,
    *,
    jwks: str | Path | None,
    issuer: str | None,
    trust_domain: str | None,
    watch: bool,
) -> Mesh:
    """The Mesh a middleware was given, or one built from its ``policy=`` shorthand.

    The shorthand joins the registry named by ``MESH_REGISTRY_URL`` (with ``MESH_JOIN_TOKEN``
    and ``MESH_ADVERTISE``) when it is set, as :meth:`Mesh.from_env` does.
    """
    if mesh is None:
        if policy is None:
            raise TypeError(f"{middleware} needs mesh=Mesh(...) or policy='policy.yaml'")
        return Mesh(
            policy,
            jwks=jwks,
            issuer=issuer,
            trust_domain=trust_domain,
            watch=watch,
            registry_url=os.environ.get("MESH_REGISTRY_URL") or None,
            join_token=os.environ.get("MESH_JOIN_TOKEN") or None,
            advertise=os.environ.get("MESH_ADVERTISE") or None,
        )
    if policy is not None or jwks is not None or issuer is not None:
        raise TypeError("give either mesh= or policy= and its options, not both")
    return mesh
