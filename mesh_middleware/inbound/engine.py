"""One decision procedure for every inbound request, whichever server protocol carried it.

Order: normalize the path (400) → public paths skip identity and authorization → verify the
caller's identity (401) → verify the end user's token, if the policy takes end users (401; a
missing token is an anonymous user) → authorize (403, or audit) → faults (delay, abort). The
adapters turn an :class:`Admission` into ASGI or WSGI calls; the engine itself does no I/O.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from typing import Any

import structlog

from mesh_middleware import defaults
from mesh_middleware.errors import IdentityError, PathError, RequestError, UnknownSigningKey
from mesh_middleware.identity.end_user import (
    EndUser,
    EndUserKeysPending,
    EndUserKeysUnavailable,
    UnknownUserSigningKey,
)
from mesh_middleware.identity.forwarded_user import ForwardedUserVerifier
from mesh_middleware.identity.verifier import CallerIdentity, TokenVerifier
from mesh_middleware.inbound.responses import error_body
from mesh_middleware.policy.authorization import AuthorizationDecision
from mesh_middleware.policy.compiled import CompiledPolicy
from mesh_middleware.policy.paths import normalize_path
from mesh_middleware.telemetry import metrics

__all__ = ["Admission", "InboundEngine"]

log = structlog.get_logger("mesh.inbound")

_MISSING_IDENTITY = error_body("unauthenticated", "a mesh identity is required")
_DUPLICATE_IDENTITY = error_body("unauthenticated", "more than one identity header")
_PLAINTEXT_REFUSED = error_body(
    "forbidden", "mtls is strict here: only mutual-TLS connections from the mesh are taken"
)
_FORWARDED_USER = defaults.FORWARDED_USER_HEADER
_ENGINE_FAILED = error_body("mesh_unavailable", "the mesh could not evaluate this request")


class Admission:
    """What to do with one request.

    ``status`` is ``None`` when the app gets the request; otherwise the middleware answers
    ``status`` with ``body``. ``delay`` is waited first either way. ``path`` is set when
    normalization changed the path the app should see. ``unknown_kid`` asks the adapter to
    refetch keys and admit again: the Mesh's keys, or ``keys`` when set (an end-user issuer's).
    ``user`` is the verified end user (``None``: anonymous); ``forward`` is that user too when
    the policy forwards end users to upstream services (the adapters then put it in context).
    """

    # A plain class, not a dataclass: compiled, a slotted dataclass keeps the interpreted
    # __init__ dataclasses generates, and one is made for every request.
    __slots__ = (
        "body",
        "caller",
        "decision",
        "delay",
        "fault",
        "forward",
        "keys",
        "path",
        "status",
        "unknown_kid",
        "user",
    )

    def __init__(
        self,
        status: int | None = None,
        body: bytes = b"",
        caller: CallerIdentity | None = None,
        decision: AuthorizationDecision | None = None,
        delay: float = 0.0,
        path: str | None = None,
        fault: str | None = None,
        unknown_kid: str | None = None,
        user: EndUser | None = None,
        keys: Any = None,
    ) -> None:
        self.status = status
        self.body = body
        self.caller = caller
        self.decision = decision
        self.delay = delay
        self.path = path
        self.fault = fault
        self.unknown_kid = unknown_kid
        self.user = user
        self.keys = keys
        self.forward: EndUser | None = None

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in _ADMISSION_FIELDS)
        return f"Admission({fields})"


_ADMISSION_FIELDS = (
    "status",
    "body",
    "caller",
    "decision",
    "delay",
    "path",
    "fault",
    "unknown_kid",
    "user",
)


class InboundEngine:
    """Admits or refuses requests for one :class:`~mesh_middleware.Mesh`."""

    def __init__(
        self,
        policy: Callable[[], tuple[CompiledPolicy, str]],
        verifier: TokenVerifier,
        chance: random.Random | None = None,
    ) -> None:
        self._policy = policy
        self._verifier = verifier
        self._chance = chance or random.Random()
        self._forwarded = ForwardedUserVerifier()

    def admit(
        self,
        method: str,
        raw_path: str,
        token: str | None,
        headers: Mapping[str, str],
        *,
        duplicate_token: bool = False,
        peer: str | None = None,
    ) -> Admission:
        """Decide one request. ``raw_path`` is the path as sent (percent-encoded).

        ``peer`` is the SPIFFE ID of the client certificate when the request came over mesh
        mutual TLS (``mesh run`` tells), else ``None``: ``mtls: strict`` refuses those, and a
        token naming another service than the certificate is refused in every mode.

        Never raises: should the mesh itself fail, the request is refused with 503 (fail
        closed) and the failure logged, rather than let through or answered with a traceback.
        """
        try:
            policy, audience = self._policy()
            try:
                path = normalize_path(raw_path)
            except PathError as exc:
                return Admission(400, error_body("bad_request", exc.reason))
            changed = path if path != raw_path else None
            # Methods are matched upper-case, as `mesh policy explain` and werkzeug's router do.
            if not method.isupper():
                method = method.upper()
            if policy.public is not None and policy.public.matches(path):
                return self._faults(policy, Admission(path=changed), None, method, path, headers)
            if peer is None and policy.mtls == "strict":
                return Admission(403, _PLAINTEXT_REFUSED, path=changed)
            if duplicate_token:
                return Admission(401, _DUPLICATE_IDENTITY, path=changed)
            caller: CallerIdentity | None = None
            if token is not None:
                try:
                    caller = self._verifier.verify(token, audience)
                except UnknownSigningKey as exc:
                    return Admission(
                        401,
                        error_body("unauthenticated", exc.reason),
                        path=changed,
                        unknown_kid=exc.kid,
                    )
                except IdentityError as exc:
                    return Admission(401, error_body("unauthenticated", exc.reason), path=changed)
                if peer is not None and caller.spiffe_id != peer:
                    return Admission(
                        401,
                        error_body(
                            "unauthenticated",
                            f"the identity token names {caller.spiffe_id} but the connection's "
                            f"certificate names {peer}",
                        ),
                        path=changed,
                    )
            elif policy.strict:
                return Admission(401, _MISSING_IDENTITY, path=changed)
            name = caller.service if caller is not None else None
            user: EndUser | None = None
            if policy.end_users is not None:
                try:
                    user = self._end_user(policy, headers, caller, audience)
                except IdentityError as exc:
                    return _refused_user(exc, changed)
            decision = policy.authorizer.decide(name, method, path, headers, user)
            metrics.note_decision(decision.labels)
            if not decision.allowed:
                _record_denial(policy.service, decision, name, method, path, user)
                return Admission(
                    decision.status,
                    error_body("forbidden", decision.reason, rule=decision.rule),
                    caller,
                    decision,
                    0.0,
                    changed,
                )
            if decision.audit:
                _record_denial(policy.service, decision, name, method, path, user)
            admission = Admission(None, b"", caller, decision, 0.0, changed, user=user)
            if user is not None and policy.forward_user_to is not None:
                admission.forward = user
            if not policy.faults:
                return admission
            return self._faults(policy, admission, name, method, path, headers)
        except RequestError as exc:
            return Admission(400, error_body("bad_request", exc.reason))
        except Exception:
            log.exception("inbound_engine_failed", method=method, path=raw_path)
            return Admission(503, _ENGINE_FAILED)

    def _end_user(
        self,
        policy: CompiledPolicy,
        headers: Mapping[str, str],
        caller: CallerIdentity | None,
        audience: str,
    ) -> EndUser | None:
        """The verified end user: from a token where the policy's issuers read them, or
        forwarded by a caller the policy trusts to vouch for users; ``None``: anonymous."""
        end_users = policy.end_users
        assert end_users is not None
        found = end_users.token_in(headers)
        if found is not None:
            return end_users.verify(found[0], found[1])
        trusted = policy.forwarded_from
        if caller is None or trusted is None:
            return None
        forwarded = headers.get(_FORWARDED_USER)
        if forwarded is None or not trusted.matches(caller.service):
            return None
        return self._forwarded.verify(forwarded, caller, audience)

    def _faults(
        self,
        policy: CompiledPolicy,
        admission: Admission,
        caller: str | None,
        method: str,
        path: str,
        headers: Mapping[str, str],
    ) -> Admission:
        for fault in policy.faults:
            if not fault.matches(caller, method, path, headers):
                continue
            outcome = fault.roll(self._chance)  # only the first matching fault is rolled
            if outcome is None:
                break
            metrics.count_fault(
                policy.service, outcome.fault, outcome.delay > 0, outcome.abort_status
            )
            admission.fault = outcome.fault
            admission.delay = outcome.delay
            if outcome.abort_status is not None:
                admission.status = outcome.abort_status
                admission.body = error_body(
                    "fault_injected",
                    f"fault {outcome.fault!r} aborted the request",
                    fault=outcome.fault,
                )
            break
        return admission


def _refused_user(exc: IdentityError, changed: str | None) -> Admission:
    """401 for an end user that does not verify; 503 while its issuer's keys are unknown. An
    unknown key, or keys still being fetched, asks the adapter to wait for them and try again."""
    unavailable = isinstance(exc, EndUserKeysPending | EndUserKeysUnavailable)
    body = error_body("mesh_unavailable" if unavailable else "unauthenticated", exc.reason)
    if isinstance(exc, UnknownUserSigningKey):
        return Admission(
            503 if unavailable else 401, body, path=changed, unknown_kid=exc.kid, keys=exc.keys
        )
    return Admission(503 if unavailable else 401, body, path=changed)


def _record_denial(
    service: str,
    decision: AuthorizationDecision,
    caller: str | None,
    method: str,
    path: str,
    user: EndUser | None = None,
) -> None:
    """Count and log a denial, or in audit mode a denial that was let through."""
    metrics.count_denial(service, decision.rule, audit=decision.audit)
    emit = log.warning if decision.audit else log.info
    emit(
        "request_would_be_denied" if decision.audit else "request_denied",
        service=service,
        caller=caller or "anonymous",
        user=user.principal if user is not None else "anonymous",
        method=method,
        path=path,
        rule=decision.rule,
        reason=decision.reason,
    )
