"""The runtime's link to the registry, driven by the Mesh's one background thread.

Each tick does what is due, in this order: learn the trust domain (``/v1/identity/trust``),
fetch the JWKS, register or renew the instance, fetch or renew tokens. The first failure to
reach the registry ends the tick and starts an outage: it is logged once, the link retries with
jittered backoff (0.5 s doubling to 10 s), and everything already held — keys, tokens, the
running policy — stays in use (static stability). The first success after an outage fetches
trust and keys again and re-registers at once, since the registry may have forgotten us.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import TypeVar

import structlog

from mesh_middleware import defaults
from mesh_middleware.identity.keys import KeyStore
from mesh_middleware.policy.compiled import CompiledPolicy
from mesh_middleware.runtime.backoff import Backoff
from mesh_middleware.runtime.registration import Registration
from mesh_middleware.runtime.registry_client import (
    RegistryClient,
    RegistryRefused,
    RegistryUnavailable,
    TrustBundle,
)
from mesh_middleware.runtime.tokens import TokenCache
from mesh_middleware.telemetry import metrics

__all__ = ["RegistryLink"]

log = structlog.get_logger("mesh.runtime")

T = TypeVar("T")

_ADDRESS_WAIT_WARNING_SECONDS = 10.0


class RegistryLink:
    """Trust, keys, registration and tokens from one registry; connectivity and staleness."""

    def __init__(
        self,
        client: RegistryClient,
        *,
        keys: KeyStore,
        keys_from_registry: bool,
        registration: Registration,
        tokens: TokenCache,
        policy: Callable[[], CompiledPolicy],
        apply_trust: Callable[[TrustBundle], None],
        backoff: Backoff | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.keys = keys
        self.keys_from_registry = keys_from_registry
        self.registration = registration
        self.tokens = tokens
        self._policy = policy
        self._apply_trust = apply_trust
        self._backoff = backoff or Backoff()
        self._clock = clock
        self.started = False
        self.connected = False
        self.last_contact: float | None = None
        self.outage_since: float | None = None
        self._created = clock()
        self._started_at = self._created
        self._trusted = False
        self._jwks_due = float("-inf")
        self._retry_at = float("-inf")
        self._refusals_logged: set[tuple[str, int, str]] = set()
        self._address_warned = False

    # -- state ---------------------------------------------------------------------------

    @property
    def stale_seconds(self) -> float:
        """0 while connected; else seconds since the registry last answered (or since start)."""
        if self.connected:
            return 0.0
        since = self.last_contact if self.last_contact is not None else self._created
        return max(self._clock() - since, 0.0)

    @property
    def in_outage(self) -> bool:
        """Whether the last attempt to reach the registry failed."""
        return self.outage_since is not None

    def start(self, framework: str) -> None:
        """Begin registering and fetching tokens (the app is ready to serve)."""
        self.registration.framework = framework
        if not self.started:
            self._started_at = self._clock()
            self._retry_at = float("-inf")  # try at once, even in the middle of a backoff
        self.started = True

    def stop(self) -> None:
        """Stop registering, and deregister (call once the background thread has stopped)."""
        self.started = False
        if self.registration.registered is not None:
            ok = self.registration.deregister()
            self._count("deregister", "ok" if ok else "skipped")

    # -- the tick ------------------------------------------------------------------------

    def tick(self) -> None:
        """Do whatever is due now (background thread only)."""
        now = self._clock()
        if now >= self._retry_at:
            try:
                self._work(now)
            except RegistryUnavailable as exc:
                self._outage(exc, now)
            else:
                self._backoff.reset()
        metrics.set_registry_state(self._service(), self.connected, self.stale_seconds)

    def _work(self, now: float) -> None:
        if not self._trusted:
            self._call("trust", self._learn_trust)
            self._trusted = True
            self._jwks_due = float("-inf")
        if self.keys_from_registry and now >= self._jwks_due:
            if not self.keys.refresh():  # KeyStore logs why
                self._count("jwks", "unavailable")
                raise RegistryUnavailable(f"JWKS: {self.keys.last_error}")
            self._count("jwks", "ok")
            self._contact()
            self._jwks_due = now + defaults.JWKS_REFRESH_SECONDS
        if self.started:
            self._register(now)
        if self.started or self.tokens.audiences():
            # A process that only calls others (no middleware, never started) still renews
            # the tokens its clients asked for.
            self._renew_tokens()

    def _learn_trust(self) -> TrustBundle:
        bundle = self.client.trust()
        # Applied before the call counts as contact: once the link says it is connected, the
        # registry's trust domain and issuer are already the ones in force.
        self._apply_trust(bundle)
        return bundle

    def _register(self, now: float) -> None:
        policy = self._policy()
        if not self.registration.due(policy):
            return
        try:
            found = self._call("register", lambda: self.registration.renew(policy))
        except RegistryRefused as exc:
            self._refused("register", exc)
            return
        waited = now - self._started_at
        if not found and not self._address_warned and waited >= _ADDRESS_WAIT_WARNING_SECONDS:
            self._address_warned = True
            log.warning(
                "no_address_to_advertise",
                service=policy.service,
                waited_seconds=round(waited, 1),
                fix="set MESH_ADVERTISE=host:port",
            )

    def _renew_tokens(self) -> None:
        wanted = self._policy().loaded.policy.outbound.services.keys()
        for audience in self.tokens.due(wanted):
            try:
                self._call("token", partial(self.tokens.refresh, audience))
            except RegistryRefused as exc:
                self._refused(f"token:{audience}", exc)

    # -- bookkeeping ---------------------------------------------------------------------

    def _call(self, operation: str, call: Callable[[], T]) -> T:
        try:
            result = call()
        except RegistryUnavailable:
            self._count(operation, "unavailable")
            raise
        except RegistryRefused:
            self._count(operation, "refused")
            self._contact()
            raise
        if operation != "register" or result:
            self._count(operation, "ok")
            self._contact()
        return result

    def _service(self) -> str:
        return self._policy().service

    def _count(self, operation: str, result: str) -> None:
        metrics.count_registry_call(self._service(), operation, result)

    def _contact(self) -> None:
        self.last_contact = self._clock()
        if self.connected:
            return
        self.connected = True
        if self.outage_since is not None:
            log.info(
                "registry_reconnected",
                registry=self.client.base_url,
                outage_seconds=round(self.last_contact - self.outage_since, 1),
            )
        else:
            log.info("registry_connected", registry=self.client.base_url)
        self.outage_since = None

    def _outage(self, exc: RegistryUnavailable, now: float) -> None:
        self.connected = False
        self._trusted = False  # re-learn trust and keys when it returns: they may have rotated
        self.registration.lost()
        if self.outage_since is None:
            self.outage_since = now
            log.warning(
                "registry_unreachable",
                registry=self.client.base_url,
                error=str(exc),
                effect=(
                    "serving on the last keys and tokens; retrying"
                    if self.last_contact is not None or not self.keys_from_registry
                    else "no caller identity can be verified until it answers; retrying"
                ),
            )
        self._retry_at = now + self._backoff.next()

    def _refused(self, what: str, exc: RegistryRefused) -> None:
        key = (what, exc.status, exc.reason)
        if key not in self._refusals_logged:
            self._refusals_logged.add(key)
            log.error(
                "registry_refused",
                registry=self.client.base_url,
                call=what,
                status=exc.status,
                reason=exc.reason,
                effect="retrying every few seconds; check MESH_JOIN_TOKEN and the service name",
            )
