"""A policy file compiled once into the matchers the request path uses."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mesh_middleware.identity.end_user import EndUserAuthentication
from mesh_middleware.policy.authorization import Authorizer
from mesh_middleware.policy.faults import CompiledFault, compile_faults
from mesh_middleware.policy.loader import LoadedPolicy, load_policy, parse_policy
from mesh_middleware.policy.patterns import StringMatcher

__all__ = ["CompiledPolicy", "compile_policy", "compile_policy_file", "compile_policy_text"]


@dataclass(frozen=True, slots=True)
class CompiledPolicy:
    """Everything the inbound engine needs from one policy file, ready to evaluate."""

    loaded: LoadedPolicy
    service: str
    strict: bool
    mtls: str  # strict | permissive | off
    public: StringMatcher | None
    authorizer: Authorizer
    faults: tuple[CompiledFault, ...]
    uses_headers: bool
    end_users: EndUserAuthentication | None = None
    """End-user authentication, when the policy has ``inbound.end_users``."""
    forwarded_from: StringMatcher | None = None
    """The services whose forwarded end users are taken."""
    forward_user_to: StringMatcher | None = None
    """The destinations this service forwards its verified end users to."""
    forward_user_claims: tuple[str, ...] = ()
    """The claims forwarded besides ``iss`` and ``sub``."""

    @property
    def source(self) -> str:
        return self.loaded.source

    def is_public(self, path: str) -> bool:
        """Whether ``path`` (normalized) skips identity and authorization."""
        return self.public is not None and self.public.matches(path)


def compile_policy(loaded: LoadedPolicy) -> CompiledPolicy:
    """Compile a validated policy into matchers."""
    inbound = loaded.policy.inbound
    forward = loaded.policy.outbound.forward_user
    authorizer = Authorizer(loaded)
    faults = compile_faults(loaded)
    return CompiledPolicy(
        loaded=loaded,
        service=loaded.policy.service,
        strict=inbound.authentication == "strict",
        mtls=inbound.mtls,
        public=StringMatcher(inbound.public) if inbound.public else None,
        authorizer=authorizer,
        faults=faults,
        uses_headers=authorizer.uses_headers or any(f.conditions.uses_headers for f in faults),
        end_users=EndUserAuthentication(inbound.end_users) if inbound.end_users else None,
        forwarded_from=(
            StringMatcher(inbound.end_users.forwarded_from)
            if inbound.end_users and inbound.end_users.forwarded_from
            else None
        ),
        forward_user_to=StringMatcher(forward.to) if forward is not None else None,
        forward_user_claims=tuple(forward.claims) if forward is not None else (),
    )


def compile_policy_file(path: str | Path) -> CompiledPolicy:
    """Load, validate and compile a policy file (raises :class:`~mesh_middleware.PolicyError`)."""
    return compile_policy(load_policy(path))


def compile_policy_text(text: str, source: str = "<policy>") -> CompiledPolicy:
    """Validate and compile policy YAML given as text."""
    return compile_policy(parse_policy(text, source))
