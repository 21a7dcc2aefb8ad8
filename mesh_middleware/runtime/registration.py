"""This instance's lease in the registry's catalog.

The instance is registered as soon as its address is known, renewed every third of its TTL
(jittered) with the same idempotent ``PUT`` — which also re-creates an instance the registry
forgot — and deregistered on clean shutdown.

Gunicorn workers share their master's socket, so they share one instance id (derived from the
address) and each renews it. A worker that exits while its master still holds the socket (a
recycled or replaced worker) leaves the instance to its siblings instead of deregistering it;
the master closes its socket before it stops the workers, so a real shutdown deregisters.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from typing import Any

import structlog

from mesh_middleware import defaults
from mesh_middleware.policy.compiled import CompiledPolicy
from mesh_middleware.policy.durations import parse_duration
from mesh_middleware.runtime.address import (
    AddressFinder,
    Advertised,
    instance_id,
    listening_sockets,
    parent_holds_sockets,
)
from mesh_middleware.runtime.registry_client import (
    RegistryClient,
    RegistryError,
    RegistryRefused,
)

__all__ = ["Registration"]

log = structlog.get_logger("mesh.runtime")


class Registration:
    """Registers, renews and deregisters one instance (called from the background thread)."""

    def __init__(
        self,
        client: RegistryClient,
        address: AddressFinder,
        *,
        ttl: str = defaults.REGISTRATION_TTL,
        serving: dict[str, str] | None = None,
        retry_seconds: float = defaults.REGISTRY_BACKOFF_CAP_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        uniform: Callable[[float, float], float] = random.uniform,
    ) -> None:
        self.ttl_text = ttl
        self.ttl = parse_duration(ttl)  # ValueError for a malformed TTL, at construction
        self.client = client
        self.address = address
        self.framework = "unknown"
        # What `mesh run` serves, for callers: {"mtls": strict|permissive, "plain_port": N}.
        self.serving = dict(serving or {})
        self.registered: tuple[str, str] | None = None
        """``(service, instance_id)`` as last acknowledged by the registry."""
        self._retry_seconds = retry_seconds
        self._clock = clock
        self._uniform = uniform
        self._due = float("-inf")
        self._sent: dict[str, Any] | None = None
        self._owner_pid: int | None = None

    @property
    def instance_id(self) -> str | None:
        """The registered instance id, or ``None`` before the first registration."""
        return self.registered[1] if self.registered else None

    def due(self, policy: CompiledPolicy) -> bool:
        """Whether to call the registry now: lease renewal time, or the policy changed."""
        if self._clock() >= self._due:
            return True
        sent = self._sent
        return sent is not None and (
            sent["service"] != policy.service
            or sent.get("version") != policy.loaded.policy.version
            or sent.get("zone") != policy.loaded.policy.zone
        )

    def renew(self, policy: CompiledPolicy) -> bool:
        """Register or renew now; ``False`` while no address is known yet.

        Raises :class:`RegistryError`; a refusal is retried after ``retry_seconds``.
        """
        address = self.address.resolve()
        if address is None:
            return False
        service = policy.service
        instance = instance_id(service, address.host, address.port)
        previous = self.registered
        if previous is not None and previous != (service, instance):
            # The reloaded policy names another service: the old instance is not us any more.
            try:
                self.client.deregister(*previous)
            except RegistryError as exc:
                log.warning("deregistration_failed", instance=previous[1], error=str(exc))
            self.registered = None
        body = self._body(policy, address)
        try:
            self.client.register(service, instance, body)
        except RegistryRefused:
            self._due = self._clock() + self._retry_seconds
            raise
        self._due = self._clock() + self.ttl / 3 * self._uniform(0.8, 1.0)
        self._sent = {"service": service, **body}
        if self.registered is None:
            log.info(
                "instance_registered",
                service=service,
                instance=instance,
                address=f"{address.host}:{address.port}",
                found_by=address.source,
                ttl=self.ttl_text,
            )
        self.registered = (service, instance)
        return True

    def lost(self) -> None:
        """The registry was unreachable: register again at the next chance, whatever the lease."""
        self._due = float("-inf")

    def deregister(self) -> bool:
        """Remove the instance (clean shutdown); ``True`` if a ``DELETE`` was acknowledged."""
        registered = self.registered
        if registered is None:
            return False
        if parent_holds_sockets({s.inode for s in listening_sockets()}):
            log.info(
                "deregistration_left_to_siblings",
                instance=registered[1],
                reason="the parent process still listens on this socket (a pre-fork server)",
            )
            return False
        self.registered = None
        self._due = float("-inf")  # a later start registers at once
        self._sent = None
        try:
            found = self.client.deregister(*registered)
        except RegistryError as exc:
            log.warning(
                "deregistration_failed",
                instance=registered[1],
                error=str(exc),
                effect="the instance expires with its lease",
            )
            return False
        log.info(
            "instance_deregistered", service=registered[0], instance=registered[1], found=found
        )
        return found

    def _body(self, policy: CompiledPolicy, address: Advertised) -> dict[str, Any]:
        if self._owner_pid is None:
            # Workers sharing an instance report their master's pid, so their renewals carry
            # the same body and only extend the lease (a changed body wakes every watcher).
            shared = parent_holds_sockets(address.inodes or {s.inode for s in listening_sockets()})
            self._owner_pid = os.getppid() if shared else os.getpid()
        body: dict[str, Any] = {
            "address": address.host,
            "port": address.port,
            "metadata": {
                "pid": str(self._owner_pid),
                "framework": self.framework,
                **self.serving,
            },
            "ttl": self.ttl_text,
        }
        version, zone = policy.loaded.policy.version, policy.loaded.policy.zone
        if version is not None:
            body["version"] = version
        if zone is not None:
            body["zone"] = zone
        return body
