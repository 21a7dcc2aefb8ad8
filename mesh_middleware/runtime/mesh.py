"""The Mesh runtime: one per process, shared by the middlewares (and later the clients)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import structlog

from mesh_middleware import defaults
from mesh_middleware.identity.keys import KeyStore
from mesh_middleware.identity.spiffe import service_id
from mesh_middleware.identity.verifier import TokenVerifier
from mesh_middleware.inbound.engine import InboundEngine
from mesh_middleware.policy.compiled import CompiledPolicy, compile_policy_file
from mesh_middleware.runtime.background import BackgroundLoop
from mesh_middleware.runtime.policy_watch import PolicyFileWatch

__all__ = ["Mesh", "resolve_mesh"]

log = structlog.get_logger("mesh.runtime")


class Mesh:
    """The mesh inside one process: its policy, its identity checks, its background work.

    >>> mesh = Mesh("policy.yaml", jwks="jwks.json")  # doctest: +SKIP
    >>> app.add_middleware(MeshMiddleware, mesh=mesh)  # doctest: +SKIP

    ``policy`` is a policy file (hot-reloaded) or an already compiled policy. ``jwks`` is a
    JWKS file or URL holding the trust domain's verification keys; without one, no identity
    can be verified, so a strict policy answers 401 to everything but public paths.
    """

    def __init__(
        self,
        policy: str | Path | CompiledPolicy,
        *,
        jwks: str | Path | None = None,
        issuer: str | None = None,
        trust_domain: str = defaults.DEFAULT_TRUST_DOMAIN,
        watch: bool = True,
        poll_interval: float = defaults.POLICY_POLL_SECONDS,
    ) -> None:
        if isinstance(policy, CompiledPolicy):
            compiled, self.policy_file = policy, None
        else:
            self.policy_file = Path(policy)
            compiled = compile_policy_file(self.policy_file)  # fail closed: no policy, no app
        self.trust_domain = trust_domain
        self._install(compiled)
        self.keys = KeyStore(jwks)
        keys_loaded = jwks is not None and self.keys.refresh()
        if jwks is not None and not keys_loaded:
            log.warning("jwks_unavailable_at_start", source=str(jwks), error=self.keys.last_error)
        self.verifier = TokenVerifier(self.keys, trust_domain=trust_domain, issuer=issuer)
        self.inbound = InboundEngine(self._current, self.verifier)
        if jwks is None and compiled.strict:
            log.warning(
                "no_jwks_configured",
                service=compiled.service,
                effect="strict authentication will answer 401 to every non-public request",
            )
        self._watch = (
            PolicyFileWatch(self.policy_file, self._install, lambda: self.service)
            if self.policy_file
            else None
        )
        self._jwks_due = time.monotonic() + (defaults.JWKS_REFRESH_SECONDS if keys_loaded else 5.0)
        self._loop = BackgroundLoop("mesh-background", poll_interval, self._tick) if watch else None

    @classmethod
    def from_env(cls, **overrides: Any) -> Mesh:
        """A Mesh from ``MESH_POLICY``, ``MESH_JWKS``, ``MESH_ISSUER`` and ``MESH_TRUST_DOMAIN``."""
        policy = overrides.pop("policy", None) or os.environ.get("MESH_POLICY")
        if not policy:
            from mesh_middleware.errors import PolicyError, PolicyIssue

            raise PolicyError(
                [PolicyIssue("MESH_POLICY", None, "", "set MESH_POLICY to a policy file")]
            )
        options: dict[str, Any] = {
            "jwks": os.environ.get("MESH_JWKS") or None,
            "issuer": os.environ.get("MESH_ISSUER") or None,
            "trust_domain": os.environ.get("MESH_TRUST_DOMAIN") or defaults.DEFAULT_TRUST_DOMAIN,
        }
        options.update(overrides)
        return cls(policy, **options)

    # -- state ---------------------------------------------------------------------------

    def _install(self, compiled: CompiledPolicy) -> None:
        # One attribute holds the policy and the audience derived from it, so a request never
        # sees a new policy with an old audience.
        self._state = (compiled, service_id(compiled.service, self.trust_domain))

    def _current(self) -> tuple[CompiledPolicy, str]:
        return self._state

    @property
    def policy(self) -> CompiledPolicy:
        """The policy in force now."""
        return self._state[0]

    @property
    def service(self) -> str:
        """This app's service name, from its policy file."""
        return self._state[0].service

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

    # -- background ----------------------------------------------------------------------

    def reload_policy(self) -> bool:
        """Reload the policy file now; return whether the new policy is in force."""
        if self._watch is None:
            return False
        return self._watch.reload()

    def _tick(self) -> None:
        if self._watch is not None:
            self._watch.check()
        if self.keys.source is None:
            return
        if self.keys.is_url:
            now = time.monotonic()
            if now >= self._jwks_due:
                ok = self.keys.refresh()
                self._jwks_due = now + (defaults.JWKS_REFRESH_SECONDS if ok else 5.0)
        else:
            self.keys.refresh_if_changed()

    def close(self) -> None:
        """Stop background work (policy watch, key refresh)."""
        if self._loop is not None:
            self._loop.stop()

    def __enter__(self) -> Mesh:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def resolve_mesh(
    middleware: str,
    mesh: Mesh | None,
    policy: str | Path | None,
    *,
    jwks: str | Path | None,
    issuer: str | None,
    trust_domain: str,
    watch: bool,
) -> Mesh:
    """The Mesh a middleware was given, or one built from its ``policy=`` shorthand."""
    if mesh is None:
        if policy is None:
            raise TypeError(f"{middleware} needs mesh=Mesh(...) or policy='policy.yaml'")
        return Mesh(policy, jwks=jwks, issuer=issuer, trust_domain=trust_domain, watch=watch)
    if policy is not None or jwks is not None or issuer is not None:
        raise TypeError("give either mesh= or policy= and its options, not both")
    return mesh
