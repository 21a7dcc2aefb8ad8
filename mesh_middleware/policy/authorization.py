"""The authorization engine: Istio's evaluation order over rules compiled into indexed matchers.

1. any matching ``deny`` rule denies; 2. if ``allow`` rules exist, one must match;
3. with no ``allow`` rules the request is allowed. ``audit`` mode decides the same way and
never denies. Rules are indexed by path (exact, prefix, suffix), caller and method, so a
decision looks at the few rules that can match, not at every rule in the file.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mypy_extensions import mypyc_attr

from mesh_middleware.policy.conditions import Conditions
from mesh_middleware.policy.loader import LoadedPolicy
from mesh_middleware.policy.patterns import StringMatcher
from mesh_middleware.policy.schema import Rule

if TYPE_CHECKING:
    from mesh_middleware.identity.end_user import EndUser

__all__ = ["AuthorizationDecision", "Authorizer", "CompiledRule"]


@mypyc_attr(native_class=False)  # public: a native class would lose its docstring
@dataclass(frozen=True, slots=True)
class AuthorizationDecision:
    """The outcome of authorizing one request, with the reason that decided it.

    ``allowed`` says whether the request goes on; ``status`` is what the client gets when it
    does not (200 when it does). ``rule`` and ``line`` name the rule that decided, or are
    ``None`` for a default. ``audit`` is true when audit mode let through a request it would
    have denied.
    """

    allowed: bool
    status: int
    rule: str | None
    line: int | None
    reason: str
    audit: bool = False
    labels: tuple[str, str, str, str] = field(default=("", "", "", ""), compare=False, repr=False)
    """Its ``mesh_authorization_decisions_total`` labels: service, rule, action, mode."""

    @property
    def decision(self) -> str:
        """``"allow"`` or ``"deny"``: what happened to the request."""
        return "allow" if self.allowed else "deny"


@dataclass(frozen=True, slots=True)
class CompiledRule:
    """A rule ready to evaluate, with its position in the file and its precomputed decision."""

    position: int
    name: str
    action: str
    line: int | None
    conditions: Conditions
    decision: AuthorizationDecision


_PLAN_CACHE_SIZE = 4096
_MAX_CACHED_PATH = 256


@dataclass(frozen=True, slots=True)
class _Plan:
    """What is left to decide once caller, method and path are known: the rules whose header
    or end-user conditions must still be checked, in evaluation order, and the decision if
    none holds."""

    checks: tuple[CompiledRule, ...]
    otherwise: AuthorizationDecision


def _has_wildcards(matcher: StringMatcher) -> bool:
    return matcher.any or bool(matcher.prefixes) or bool(matcher.suffixes)


class _RuleIndex:
    """Finds the rules that can match a request without looking at the others."""

    __slots__ = (
        "by_caller",
        "by_method",
        "exact",
        "prefix",
        "prefix_lengths",
        "rest",
        "rules",
        "suffix",
        "suffix_lengths",
    )

    def __init__(self, rules: list[CompiledRule]) -> None:
        self.rules = rules
        self.exact: dict[str, list[int]] = {}
        self.prefix: dict[str, list[int]] = {}
        self.suffix: dict[str, list[int]] = {}
        self.by_caller: dict[str | None, list[int]] = {}
        self.by_method: dict[str, list[int]] = {}
        self.rest: list[int] = []
        for index, rule in enumerate(rules):
            self._place(index, rule.conditions)
        self.prefix_lengths = tuple(sorted({len(p) for p in self.prefix}))
        self.suffix_lengths = tuple(sorted({len(s) for s in self.suffix}))

    def _place(self, index: int, cond: Conditions) -> None:
        paths = cond.paths
        if paths is not None and not paths.any:
            for exact in paths.exact:
                self.exact.setdefault(exact, []).append(index)
            for prefix in paths.prefixes:
                self.prefix.setdefault(prefix, []).append(index)
            for suffix in paths.suffixes:
                self.suffix.setdefault(suffix, []).append(index)
            return
        callers = cond.from_
        if callers is not None and not _has_wildcards(callers.services):
            for service in callers.services.exact:
                self.by_caller.setdefault(service, []).append(index)
            if callers.anonymous:
                self.by_caller.setdefault(None, []).append(index)
            return
        methods = cond.methods
        if (
            methods is not None
            and not methods.any
            and not methods.prefixes
            and not methods.suffixes
        ):
            for method in methods.exact:
                self.by_method.setdefault(method, []).append(index)
            return
        self.rest.append(index)

    def candidates(self, caller: str | None, method: str, path: str) -> list[int]:
        """Positions of every rule that may match, in file order (for tests and tools)."""
        found: set[int] = set(self.rest)
        for bucket in self._buckets(caller, method, path):
            found.update(bucket)
        return sorted(found)

    def _buckets(self, caller: str | None, method: str, path: str) -> list[list[int]]:
        buckets = []
        hit = self.exact.get(path)
        if hit:
            buckets.append(hit)
        size = len(path)
        for length in self.prefix_lengths:
            if length > size:
                break
            hit = self.prefix.get(path[:length])
            if hit:
                buckets.append(hit)
        for length in self.suffix_lengths:
            if length > size:
                break
            hit = self.suffix.get(path[-length:])
            if hit:
                buckets.append(hit)
        if self.by_caller:
            hit = self.by_caller.get(caller)
            if hit:
                buckets.append(hit)
        if self.by_method:
            hit = self.by_method.get(method)
            if hit:
                buckets.append(hit)
        if self.rest:
            buckets.append(self.rest)
        return buckets

    def shortlist(self, caller: str | None, method: str, path: str) -> tuple[CompiledRule, ...]:
        """The rules whose caller, method and path conditions hold, in file order, up to and
        including the first one without per-request conditions (no later rule can win after it)."""
        rules = self.rules
        matching: set[int] = set()
        for bucket in self._buckets(caller, method, path):
            for index in bucket:
                if index not in matching and rules[index].conditions.holds_without_headers(
                    caller, method, path
                ):
                    matching.add(index)
        shortlist = []
        for index in sorted(matching):
            shortlist.append(rules[index])
            if not rules[index].conditions.per_request:
                break
        return tuple(shortlist)

    def first_match(
        self,
        caller: str | None,
        method: str,
        path: str,
        headers: Mapping[str, str],
        user: EndUser | None = None,
    ) -> CompiledRule | None:
        """The matching rule that comes first in the file, or ``None``."""
        rules = self.rules
        best = len(rules)
        # Each bucket is in file order: scan it only up to the best match found so far.
        for bucket in self._buckets(caller, method, path):
            for index in bucket:
                if index >= best:
                    break
                if rules[index].conditions.holds(caller, method, path, headers, user):
                    best = index
                    break
        return rules[best] if best < len(rules) else None


def _decision(
    service: str,
    allow: bool,
    rule: str | None,
    line: int | None,
    reason: str,
    audit: bool = False,
) -> AuthorizationDecision:
    """A rule's (or a default's) decision; ``allow`` is what it says, ``audit`` that audit
    mode lets a deny through."""
    labels = (service, rule or "", "allow" if allow else "deny", "audit" if audit else "enforce")
    if allow or audit:
        return AuthorizationDecision(True, 200, rule, line, reason, audit=audit, labels=labels)
    return AuthorizationDecision(False, 403, rule, line, reason, labels=labels)


class Authorizer:
    """Authorizes requests against one policy file's rules."""

    __slots__ = (
        "_plans",
        "allow",
        "audit",
        "audited",
        "default_allow",
        "default_deny",
        "deny",
        "rules",
        "uses_headers",
        "uses_users",
    )

    def __init__(self, loaded: LoadedPolicy) -> None:
        authz = loaded.policy.inbound.authorization
        self.audit = authz.mode == "audit"
        self.rules = [self._compile(i, rule, loaded) for i, rule in enumerate(authz.rules)]
        # Deny rules with their own `mode: audit` never decide: they are looked at once the
        # other rules have let a request through, to note the denial they would have made.
        audited = {
            r.position
            for r, rule in zip(self.rules, authz.rules, strict=True)
            if rule.mode == "audit"
        }
        self.deny = _RuleIndex(
            [r for r in self.rules if r.action == "deny" and r.position not in audited]
        )
        self.audited = (
            _RuleIndex([r for r in self.rules if r.position in audited]) if audited else None
        )
        allow_rules = [r for r in self.rules if r.action == "allow"]
        self.allow = _RuleIndex(allow_rules) if allow_rules else None
        self.uses_headers = any(r.conditions.uses_headers for r in self.rules)
        self.uses_users = any(r.conditions.uses_user for r in self.rules)
        self._plans: dict[tuple[str | None, str, str], _Plan] = {}
        service = loaded.policy.service
        self.default_allow = _decision(
            service, True, None, None, "allowed by default: the policy has no allow rules"
        )
        if self.audit:
            self.default_deny = _decision(
                service, False, None, None, "audit mode: would deny, no allow rule matched", True
            )
        else:
            self.default_deny = _decision(
                service, False, None, None, "denied by default: no allow rule matched"
            )

    def _compile(self, position: int, rule: Rule, loaded: LoadedPolicy) -> CompiledRule:
        line = loaded.line_of("inbound", "authorization", "rules", position)
        where = f"{loaded.source}:{line}" if line is not None else loaded.source
        service = loaded.policy.service
        if rule.action == "allow":
            decision = _decision(
                service, True, rule.name, line, f"allowed by rule {rule.name!r} ({where})"
            )
        elif rule.mode == "audit" or (self.audit and rule.mode is None):
            decision = _decision(
                service,
                False,
                rule.name,
                line,
                f"audit mode: would deny by rule {rule.name!r} ({where})",
                True,
            )
        else:
            decision = _decision(
                service, False, rule.name, line, f"denied by rule {rule.name!r} ({where})"
            )
        conditions = Conditions(
            from_=rule.from_,
            not_from=rule.not_from,
            methods=rule.methods,
            not_methods=rule.not_methods,
            paths=rule.paths,
            not_paths=rule.not_paths,
            headers=rule.headers,
            users=rule.users,
            not_users=rule.not_users,
            claims=rule.claims,
            not_claims=rule.not_claims,
        )
        return CompiledRule(position, rule.name, rule.action, line, conditions, decision)

    def decide(
        self,
        caller: str | None,
        method: str,
        path: str,
        headers: Mapping[str, str],
        user: EndUser | None = None,
    ) -> AuthorizationDecision:
        """Decide one request; ``caller`` is a service name, or ``None`` when anonymous;
        ``user`` the verified end user, or ``None`` when anonymous.

        ``path`` must already be normalized (:func:`~mesh_middleware.policy.paths.normalize_path`).
        What caller, method and path settle is planned once per such triple (a bounded cache);
        only header and end-user conditions are evaluated per request.
        """
        key = (caller, method, path)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plan(caller, method, path)
            if len(path) <= _MAX_CACHED_PATH:
                if len(self._plans) >= _PLAN_CACHE_SIZE:
                    self._plans = {}  # bounded: start over rather than track recency
                self._plans[key] = plan
        decision = plan.otherwise
        for rule in plan.checks:
            if rule.conditions.request_holds(headers, user):
                decision = rule.decision
                break
        if self.audited is not None and decision.allowed and not decision.audit:
            return self._note_audited(decision, caller, method, path, headers, user)
        return decision

    def _note_audited(
        self,
        decision: AuthorizationDecision,
        caller: str | None,
        method: str,
        path: str,
        headers: Mapping[str, str],
        user: EndUser | None = None,
    ) -> AuthorizationDecision:
        """An allowed request that a deny rule in audit mode would have denied: that rule's
        (audit) decision, which lets it through all the same."""
        assert self.audited is not None
        noted = self.audited.first_match(caller, method, path, headers, user)
        return noted.decision if noted is not None else decision

    def _plan(self, caller: str | None, method: str, path: str) -> _Plan:
        checks: list[CompiledRule] = []
        for rule in self.deny.shortlist(caller, method, path):
            if not rule.conditions.per_request:
                return _Plan(tuple(checks), rule.decision)
            checks.append(rule)
        if self.allow is None:
            return _Plan(tuple(checks), self.default_allow)
        for rule in self.allow.shortlist(caller, method, path):
            if not rule.conditions.per_request:
                return _Plan(tuple(checks), rule.decision)
            checks.append(rule)
        return _Plan(tuple(checks), self.default_deny)

    def decide_uncached(
        self,
        caller: str | None,
        method: str,
        path: str,
        headers: Mapping[str, str],
        user: EndUser | None = None,
    ) -> AuthorizationDecision:
        """:meth:`decide` without the plan cache: every rule index consulted afresh."""
        decision = self._decide_uncached(caller, method, path, headers, user)
        if self.audited is not None and decision.allowed and not decision.audit:
            return self._note_audited(decision, caller, method, path, headers, user)
        return decision

    def _decide_uncached(
        self,
        caller: str | None,
        method: str,
        path: str,
        headers: Mapping[str, str],
        user: EndUser | None = None,
    ) -> AuthorizationDecision:
        if self.deny.rules:
            denied = self.deny.first_match(caller, method, path, headers, user)
            if denied is not None:
                return denied.decision
        if self.allow is None:
            return self.default_allow
        allowed = self.allow.first_match(caller, method, path, headers, user)
        return allowed.decision if allowed is not None else self.default_deny
