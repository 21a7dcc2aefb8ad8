"""The policy file schema: the single source of truth for its shape.

The JSON Schema printed by ``mesh policy schema`` is generated from these models; the loader
validates YAML against them, and the compiler reads only validated models.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from mesh_middleware.identity.spiffe import SERVICE_NAME
from mesh_middleware.loopback import is_loopback_host
from mesh_middleware.policy.claims import claim_path_problem
from mesh_middleware.policy.durations import DURATION_PATTERN, parse_duration
from mesh_middleware.policy.paths import normalized_pattern_problem
from mesh_middleware.policy.patterns import pattern_problem

__all__ = [
    "Abort",
    "AuthorizationPolicy",
    "Delay",
    "EndUserIssuer",
    "EndUsersPolicy",
    "Fault",
    "FaultMatch",
    "ForwardUser",
    "HeaderCondition",
    "InboundPolicy",
    "OutboundPolicy",
    "Policy",
    "Rule",
    "Telemetry",
    "TokenHeader",
    "policy_json_schema",
]

# RFC 9110 token characters: what header names and methods are made of.
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_MAX_DURATION_SECONDS = 24 * 3600.0


def _duration(value: Any) -> float:
    if not isinstance(value, str):
        raise ValueError(f"expected a duration string like '250ms' or '2s', got {value!r}")
    seconds = parse_duration(value)
    if not 0 < seconds <= _MAX_DURATION_SECONDS:
        raise ValueError(f"duration must be more than 0 and at most 24h, got {value!r}")
    return seconds


Duration = Annotated[
    float,
    BeforeValidator(_duration),
    WithJsonSchema({"type": "string", "pattern": DURATION_PATTERN, "examples": ["250ms", "2s"]}),
]
"""A duration string (``250ms``, ``2s``, ``1m``, ``1h``), held in seconds once validated."""

Percent = Annotated[float, Field(ge=0, le=100, description="0-100; missing means 0")]


def _service_name(value: str) -> str:
    if not SERVICE_NAME.match(value):
        raise ValueError(
            f"{value!r} is not a service name (lowercase letters, digits and '-', at most 63)"
        )
    return value


ServiceName = Annotated[str, AfterValidator(_service_name)]


def _pattern(value: str) -> str:
    problem = pattern_problem(value)
    if problem:
        raise ValueError(problem)
    return value


Pattern = Annotated[str, AfterValidator(_pattern)]


def _path_pattern(value: str) -> str:
    _pattern(value)
    if not (value.startswith("/") or value.startswith("*")):
        raise ValueError(f"{value!r}: a path pattern starts with '/' or '*'")
    problem = normalized_pattern_problem(value.strip("*"))
    if problem:
        raise ValueError(f"{value!r}: {problem}")
    return value


PathPattern = Annotated[str, AfterValidator(_path_pattern)]


def _method_pattern(value: str) -> str:
    _pattern(value)
    if value != "*" and not _TOKEN.match(value.strip("*")):
        raise ValueError(f"{value!r} is not an HTTP method")
    return value.upper()


MethodPattern = Annotated[str, AfterValidator(_method_pattern)]


def _header_name(value: str) -> str:
    if not _TOKEN.match(value):
        raise ValueError(f"{value!r} is not a valid header name")
    return value.lower()


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, populate_by_name=True)


class HeaderCondition(_Strict):
    """One header condition: exactly one of ``values``, ``not_values`` or ``present``."""

    values: list[Pattern] | None = None
    not_values: list[Pattern] | None = None
    present: bool | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> HeaderCondition:
        given = [n for n in ("values", "not_values", "present") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of 'values', 'not_values' or 'present'")
        return self


Headers = dict[Annotated[str, AfterValidator(_header_name)], HeaderCondition]


def _claim_key(value: str) -> str:
    problem = claim_path_problem(value)
    if problem:
        raise ValueError(problem)
    return value


ClaimKey = Annotated[str, AfterValidator(_claim_key)]


def _one_or_many(value: Any) -> Any:
    # `claims: {iss: "https://idp"}`: one value needs no list.
    return [value] if isinstance(value, str) else value


ClaimValues = Annotated[
    list[Pattern], BeforeValidator(_one_or_many), Field(min_length=1, max_length=256)
]
Claims = dict[ClaimKey, ClaimValues]
"""End-user claim conditions: claim (``groups``, ``[outer][inner]``) → any-of patterns."""


class Rule(_Strict):
    """An authorization rule; all given fields must hold, values in a list are alternatives."""

    name: Annotated[str, Field(min_length=1, max_length=128)]
    action: Literal["allow", "deny"]
    from_: list[Pattern] = Field(default_factory=list, alias="from")
    not_from: list[Pattern] = Field(default_factory=list)
    methods: list[MethodPattern] = Field(default_factory=list)
    not_methods: list[MethodPattern] = Field(default_factory=list)
    paths: list[PathPattern] = Field(default_factory=list)
    not_paths: list[PathPattern] = Field(default_factory=list)
    headers: Headers = Field(default_factory=dict)
    users: list[Pattern] = Field(default_factory=list)
    not_users: list[Pattern] = Field(default_factory=list)
    claims: Claims = Field(default_factory=dict)
    not_claims: Claims = Field(default_factory=dict)
    mode: Literal["enforce", "audit"] | None = None

    @model_validator(mode="after")
    def _mode_on_deny_rules_only(self) -> Rule:
        if self.mode is not None and self.action != "deny":
            raise ValueError("'mode' applies to deny rules only (an allow rule never denies)")
        return self


class AuthorizationPolicy(_Strict):
    """``enforce`` denies; ``audit`` evaluates the same way, logs and counts, never denies."""

    mode: Literal["enforce", "audit"] = "enforce"
    rules: list[Rule] = Field(default_factory=list)


class FaultMatch(_Strict):
    """Which requests a fault applies to; an empty match applies to every request."""

    paths: list[PathPattern] = Field(default_factory=list)
    methods: list[MethodPattern] = Field(default_factory=list)
    from_: list[Pattern] = Field(default_factory=list, alias="from")
    headers: Headers = Field(default_factory=dict)


class Delay(_Strict):
    """Hold the request for ``duration`` in ``percent`` of matching requests."""

    duration: Duration
    percent: Percent = 0


class Abort(_Strict):
    """Answer ``status`` instead of calling the app in ``percent`` of matching requests."""

    status: Annotated[int, Field(ge=200, le=599)]
    percent: Percent = 0


class Fault(_Strict):
    """A named fault: a delay, an abort, or both, for the requests its match selects."""

    name: Annotated[str, Field(min_length=1, max_length=128)]
    match: FaultMatch = Field(default_factory=FaultMatch)
    delay: Delay | None = None
    abort: Abort | None = None

    @model_validator(mode="after")
    def _something_to_inject(self) -> Fault:
        if self.delay is None and self.abort is None:
            raise ValueError("a fault needs a 'delay', an 'abort', or both")
        return self


def _mtls_mode(value: Any) -> Any:
    # YAML 1.1 reads a bare `off` as false; `mtls: off` is what everyone will write.
    return "off" if value is False else value


def _key_url(value: str) -> str:
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError when the port is not a number in range
    except ValueError as exc:
        raise ValueError(f"{value!r}: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{value!r} is not an http(s) URL")
    if parts.scheme == "http" and not is_loopback_host(parts.hostname):
        # Keys fetched in plaintext could be swapped on the way: https, but for this machine.
        raise ValueError(f"{value!r}: keys are fetched over https (plain http only on loopback)")
    return value


KeyUrl = Annotated[str, AfterValidator(_key_url)]

JwtAlgorithm = Literal[
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"
]
"""Asymmetric JWS algorithms only: ``none`` and HMAC can never verify an end-user token."""

DEFAULT_JWT_ALGORITHMS: tuple[JwtAlgorithm, ...] = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
)


def _skew(value: Any) -> float:
    if value in ("0", "0s", 0):
        return 0.0
    seconds = _duration(value)
    if seconds > 600:
        raise ValueError(f"clock skew is at most 10m, got {value!r}")
    return seconds


ClockSkew = Annotated[
    float,
    BeforeValidator(_skew),
    WithJsonSchema({"type": "string", "pattern": DURATION_PATTERN, "examples": ["60s"]}),
]


def _inline_jwks(value: Any) -> Any:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise ValueError("'jwks' is a JWKS document (JSON text or a mapping)") from None
    if not isinstance(value, dict) or not isinstance(value.get("keys"), list):
        raise ValueError("'jwks' is a JWKS document: an object with a 'keys' list")
    return value


class TokenHeader(_Strict):
    """A header an end-user token is read from, after ``prefix`` (``Bearer ``)."""

    name: Annotated[str, AfterValidator(_header_name)]
    prefix: Annotated[str, Field(max_length=64)] = ""


_COOKIE_NAME = r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$"


class EndUserIssuer(_Strict):
    """An OpenID Connect issuer whose tokens name end users (Istio's ``jwtRules`` entry).

    Keys come from ``jwks`` (inline), ``jwks_uri``, or else the issuer's OIDC discovery
    document. Tokens are read from ``from_headers`` and ``from_cookies``; with neither, from
    ``Authorization: Bearer``.
    """

    issuer: Annotated[str, Field(min_length=1, max_length=512)]
    jwks_uri: KeyUrl | None = None
    jwks: Annotated[dict[str, Any], BeforeValidator(_inline_jwks)] | None = None
    audiences: list[Annotated[str, Field(min_length=1, max_length=512)]] = Field(
        default_factory=list
    )
    from_headers: list[TokenHeader] = Field(default_factory=list)
    from_cookies: list[Annotated[str, Field(pattern=_COOKIE_NAME, max_length=128)]] = Field(
        default_factory=list
    )
    algorithms: Annotated[list[JwtAlgorithm], Field(min_length=1)] = Field(
        default_factory=lambda: list(DEFAULT_JWT_ALGORITHMS)
    )
    clock_skew: ClockSkew = 60.0

    @model_validator(mode="after")
    def _where_keys_come_from(self) -> EndUserIssuer:
        if self.jwks is not None and self.jwks_uri is not None:
            raise ValueError("give 'jwks' or 'jwks_uri', not both")
        if self.jwks is None and self.jwks_uri is None:
            try:
                _key_url(self.issuer)
            except ValueError as exc:
                raise ValueError(
                    f"without 'jwks_uri' or 'jwks' the keys are found by OIDC discovery, "
                    f"so the issuer must be an https URL: {exc}"
                ) from None
        return self

    @property
    def locations(self) -> list[TokenHeader]:
        """The headers tokens are read from (the default when none are given)."""
        if self.from_headers or self.from_cookies:
            return list(self.from_headers)
        return [TokenHeader(name="authorization", prefix="Bearer ")]


class EndUsersPolicy(_Strict):
    """End-user authentication (Istio's RequestAuthentication): who may sign user tokens.

    A request with an invalid token is refused (401); one without a token goes on as an
    anonymous user, which rules may allow or refuse. ``forwarded_from`` names the services
    whose forwarded users (signed by the mesh, see ``outbound.forward_user``) are taken.
    """

    issuers: list[EndUserIssuer] = Field(default_factory=list)
    forwarded_from: list[Pattern] = Field(default_factory=list)

    @model_validator(mode="after")
    def _issuers_once(self) -> EndUsersPolicy:
        seen: set[str] = set()
        for entry in self.issuers:
            if entry.issuer in seen:
                raise ValueError(f"issuer {entry.issuer!r} is listed twice")
            seen.add(entry.issuer)
        return self


class InboundPolicy(_Strict):
    """What the inbound middleware enforces."""

    authentication: Literal["strict", "permissive"] = "strict"
    # Mutual TLS on the channel (served by `mesh run`): strict takes only mesh mTLS
    # connections (plaintext requests are refused but for public paths), permissive takes
    # plaintext too (migration), off serves and calls without TLS.
    mtls: Annotated[Literal["strict", "permissive", "off"], BeforeValidator(_mtls_mode)] = (
        "permissive"
    )
    public: list[PathPattern] = Field(default_factory=list)
    end_users: EndUsersPolicy | None = None
    authorization: AuthorizationPolicy = Field(default_factory=AuthorizationPolicy)
    faults: list[Fault] = Field(default_factory=list)


# --- outbound: validated now so that files stay checkable; enforced by the outbound adapter ---

RetryCondition = Annotated[
    str,
    AfterValidator(
        lambda v: (
            v
            if v in {"connect-failure", "reset", "refused-stream", "gateway-error", "retriable-4xx"}
            or (v.isdigit() and 400 <= int(v) <= 599)
            else _raise(
                f"{v!r}: expected connect-failure, reset, refused-stream, gateway-error, "
                "retriable-4xx or a status code 400-599"
            )
        )
    ),
]


def _raise(message: str) -> Any:
    raise ValueError(message)


def _retry_condition(value: Any) -> Any:
    # YAML reads an unquoted 503 as an int; the retry list takes both spellings.
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class RetryBudget(_Strict):
    """Retries allowed on top of requests: ``ratio`` of them plus ``min_per_second``."""

    ratio: Annotated[float, Field(ge=0, le=1)] = 0.2
    min_per_second: Annotated[float, Field(ge=0)] = 10


class Retries(_Strict):
    """How failed calls are retried."""

    attempts: Annotated[int, Field(ge=0, le=10)] = 2
    per_try_timeout: Duration | None = None
    on: list[Annotated[RetryCondition, BeforeValidator(_retry_condition)]] = Field(
        default_factory=lambda: ["connect-failure", "reset", "refused-stream"]
    )
    budget: RetryBudget = Field(default_factory=RetryBudget)
    idempotent_only: bool = True


class ConsistentHash(_Strict):
    """Hash on one request header or cookie."""

    header: str | None = None
    cookie: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> ConsistentHash:
        if (self.header is None) == (self.cookie is None):
            raise ValueError("give exactly one of 'header' or 'cookie'")
        return self


class ConsistentHashBalancer(_Strict):
    consistent_hash: ConsistentHash


LoadBalancer = Literal["ewma", "least_request", "round_robin", "random"] | ConsistentHashBalancer


class OutlierDetection(_Strict):
    """Eject an instance after consecutive failures, for longer at each repeat."""

    consecutive_failures: Annotated[int, Field(ge=1, le=1000)] = 5
    base_ejection: Duration = 30.0
    max_ejection_percent: Percent = 50


class Endpoint(_Strict):
    """A static instance of a destination, for services outside the registry."""

    url: Annotated[str, Field(pattern=r"^https?://[^/\s]+/?$")]
    version: str | None = None
    zone: str | None = None

    @field_validator("url")
    @classmethod
    def _host_and_port(cls, url: str) -> str:
        try:
            parts = urlsplit(url)
            port = parts.port  # raises ValueError when out of range or not a number
        except ValueError as exc:
            raise ValueError(f"{url!r}: {exc}") from None
        if not parts.hostname or parts.username is not None or port == 0:
            raise ValueError(f"{url!r}: expected scheme://host[:port] with a port 1-65535")
        return url


class Destination(_Strict):
    """A subset of a destination's instances, chosen by version."""

    version: str | None = None
    weight: Annotated[int, Field(ge=0, le=100)] = 100


class RouteMatch(_Strict):
    paths: list[PathPattern] = Field(default_factory=list)
    methods: list[MethodPattern] = Field(default_factory=list)
    headers: Headers = Field(default_factory=dict)


class MirrorTarget(_Strict):
    version: str | None = None


class Mirror(_Strict):
    to: MirrorTarget
    percent: Percent = 0


class Route(_Strict):
    """First matching route wins; ``to`` splits traffic by weight across subsets."""

    name: str | None = None
    match: RouteMatch = Field(default_factory=RouteMatch)
    to: Annotated[list[Destination], Field(min_length=1)]
    retry_non_idempotent: bool = False
    mirror: Mirror | None = None

    @model_validator(mode="after")
    def _some_weight(self) -> Route:
        if not any(destination.weight for destination in self.to):
            raise ValueError("every weight in 'to' is 0: at least one must be above 0")
        return self


class DestinationPolicy(_Strict):
    """Settings for calls to one destination service (defaults fill what is missing)."""

    timeout: Duration | None = None
    retries: Retries | None = None
    load_balancer: LoadBalancer | None = None
    outlier_detection: OutlierDetection | None = None
    max_concurrent: Annotated[int, Field(ge=1, le=100_000)] | None = None
    endpoints: list[Endpoint] = Field(default_factory=list)
    routes: list[Route] = Field(default_factory=list)
    mirror: Mirror | None = None


class OutboundDefaults(_Strict):
    """Settings for every destination unless a service overrides them."""

    timeout: Duration = 5.0
    retries: Retries = Field(default_factory=Retries)
    load_balancer: LoadBalancer = "ewma"
    outlier_detection: OutlierDetection = Field(default_factory=OutlierDetection)
    max_concurrent: Annotated[int, Field(ge=1, le=100_000)] = 100
    trace_context_to_external_hosts: bool = True


def _top_level_claim(value: str) -> str:
    if not value or "[" in value or "]" in value:
        raise ValueError(f"{value!r}: name a top-level claim (its whole value is forwarded)")
    return value


class ForwardUser(_Strict):
    """Forward the verified end user to the services in ``to``, signed by this service's
    mesh identity; ``claims`` are the claims carried besides ``iss`` and ``sub``."""

    to: Annotated[list[Pattern], Field(min_length=1)] = Field(default_factory=lambda: ["*"])
    claims: list[Annotated[str, AfterValidator(_top_level_claim)]] = Field(
        default_factory=list, max_length=64
    )


class OutboundPolicy(_Strict):
    """What the outbound client adapter applies."""

    defaults: OutboundDefaults = Field(default_factory=OutboundDefaults)
    services: dict[ServiceName, DestinationPolicy] = Field(default_factory=dict)
    forward_user: ForwardUser | None = None


# --- telemetry: what the middleware and the clients record, and where they serve it ---


def _metrics_path(value: str) -> str:
    if not value.startswith("/") or "*" in value or "?" in value or "#" in value:
        raise ValueError(f"{value!r}: the metrics path is a plain path starting with '/'")
    problem = normalized_pattern_problem(value)
    if problem:
        raise ValueError(f"{value!r}: {problem}")
    return value


Ratio = Annotated[float, Field(ge=0, le=1, description="a fraction from 0 to 1")]


class MetricsTelemetry(_Strict):
    """Prometheus metrics, and the path the middleware serves them on."""

    enabled: bool = True
    path: Annotated[str, AfterValidator(_metrics_path)] = "/metrics"


class AccessLogTelemetry(_Strict):
    """One JSON line per request; ``sample`` of ordinary requests, errors and flagged always."""

    enabled: bool = False
    sample: Ratio = 1.0
    flush_interval: Annotated[Duration, Field(le=60)] = 1.0


class TracingTelemetry(_Strict):
    """Trace sampling for traces this app starts, and where spans are exported (if anywhere)."""

    sample: Ratio = 1.0
    otlp_endpoint: Annotated[str, Field(pattern=r"^https?://[^/\s]+(/\S*)?$")] | None = None


class Telemetry(_Strict):
    """What the mesh records about requests, and how it exposes it."""

    metrics: MetricsTelemetry = Field(default_factory=MetricsTelemetry)
    access_log: AccessLogTelemetry = Field(default_factory=AccessLogTelemetry)
    tracing: TracingTelemetry = Field(default_factory=TracingTelemetry)


class Policy(_Strict):
    """One app's policy file."""

    service: ServiceName
    version: Annotated[str, Field(min_length=1, max_length=63)] | None = None
    zone: Annotated[str, Field(min_length=1, max_length=63)] | None = None
    inbound: InboundPolicy = Field(default_factory=InboundPolicy)
    outbound: OutboundPolicy = Field(default_factory=OutboundPolicy)
    telemetry: Telemetry = Field(default_factory=Telemetry)

    @model_validator(mode="after")
    def _end_users_for_user_rules(self) -> Policy:
        if self.inbound.end_users is not None:
            return self
        for rule in self.inbound.authorization.rules:
            named = [
                word
                for word in ("users", "not_users", "claims", "not_claims")
                if getattr(rule, word) and not (word == "users" and rule.users == ["anonymous"])
            ]
            if named:
                raise ValueError(
                    f"rule {rule.name!r} has {', '.join(named)} but the policy has no "
                    "inbound.end_users: every request would be an anonymous user"
                )
        return self

    @model_validator(mode="after")
    def _unique_names(self) -> Policy:
        seen: set[str] = set()
        for kind, names in (
            ("rule", [r.name for r in self.inbound.authorization.rules]),
            ("fault", [f.name for f in self.inbound.faults]),
        ):
            for name in names:
                if name in seen:
                    raise ValueError(f"{kind} name {name!r} is used twice; names must be unique")
                seen.add(name)
        return self


def policy_json_schema() -> dict[str, Any]:
    """The JSON Schema of a policy file, for editors (``mesh policy schema``)."""
    schema = Policy.model_json_schema(by_alias=True, mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "mesh-middleware policy file"
    return schema
