"""Property tests: path normalization, Istio string patterns, the indexed authorizer, the loader.

Each property compares the implementation against a small, obviously correct reference (or
against invariants DESIGN §2 states) over generated inputs.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mesh_middleware.errors import PathError, PolicyError
from mesh_middleware.policy.compiled import compile_policy_text
from mesh_middleware.policy.loader import LoadedPolicy, parse_policy
from mesh_middleware.policy.paths import normalize_path
from mesh_middleware.policy.patterns import StringMatcher, pattern_problem

SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

UNRESERVED = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"

# --- path normalization ---------------------------------------------------------------------

_PATH_PIECES = st.sampled_from(
    [
        "/",
        "//",
        ".",
        "..",
        "/./",
        "/../",
        "a",
        "b",
        "admin",
        "%2e",
        "%2E",
        "%2F",
        "%2f",
        "%5C",
        "%5c",
        "%00",
        "%41",
        "%7e",
        "%7E",
        "%25",
        "%20",
        "%3f",
        "%",
        "%4",
        "%zz",
        "%e9",
        "\\",
        "\x00",
        "?",
        "#",
        "=",
        "~",
        "é",
    ]
)
PATHISH = st.lists(_PATH_PIECES, max_size=12).map(lambda parts: "/" + "".join(parts))
ANY_TEXT = st.one_of(
    st.text(max_size=60), PATHISH, st.text(alphabet="/.%2eEfF5cC0?#\\a", max_size=30)
)


def _normalize_or_error(raw: str) -> str | PathError:
    try:
        return normalize_path(raw)
    except PathError as exc:
        return exc


def _normalize_or_none(raw: str) -> str | None:
    try:
        return normalize_path(raw)
    except PathError:
        return None


@SETTINGS
@given(ANY_TEXT)
@example("/a/%2E%2E/b")
@example("/%2e%2e/admin")
@example("//admin")
@example("/a/./b/../../..")
@example("/a/%252F")
def test_normalize_path_result_is_safe_and_idempotent(raw: str) -> None:
    """normalize_path returns a safe, canonical path or raises PathError, and nothing else."""
    result = _normalize_or_error(raw)
    if isinstance(result, PathError):
        assert result.reason
        return
    assert isinstance(result, str)
    assert result.startswith("/")
    assert "//" not in result
    segments = result.split("/")[1:]
    assert "." not in segments
    assert ".." not in segments
    for forbidden in ("%2F", "%2f", "%5C", "%5c", "\x00", "\\", "?", "#"):
        assert forbidden not in result
    assert normalize_path(result) == result


@SETTINGS
@given(PATHISH.filter(lambda p: "?" not in p and "#" not in p), st.text(max_size=20))
def test_normalize_path_strips_query_and_fragment(path: str, query: str) -> None:
    """Anything after '?' or '#' does not change the result (or whether the path is rejected)."""
    plain = _normalize_or_none(path)
    assert _normalize_or_none(f"{path}?{query}") == plain
    assert _normalize_or_none(f"{path}#{query}") == plain


_SEGMENT = st.text(alphabet=UNRESERVED, min_size=1, max_size=6)


@st.composite
def _encoded_variants(draw: st.DrawFn) -> tuple[str, str]:
    """A path of unreserved characters, and the same path with some characters %-encoded."""
    segments = draw(st.lists(_SEGMENT, min_size=1, max_size=5))
    plain = "/" + "/".join(segments)
    encoded = []
    for char in plain:
        if char != "/" and draw(st.booleans()):
            hex_digits = f"{ord(char):02X}"
            encoded.append("%" + (hex_digits.lower() if draw(st.booleans()) else hex_digits))
        else:
            encoded.append(char)
    return plain, "".join(encoded)


@SETTINGS
@given(_encoded_variants())
@example(("/A", "/%41"))
@example(("/admin", "/%61dmin"))
def test_normalize_path_decodes_unreserved(pair: tuple[str, str]) -> None:
    """Percent-encoded unreserved characters decode: the encoded path normalizes like the plain."""
    plain, encoded = pair
    assert normalize_path(encoded) == normalize_path(plain)


# --- Istio string patterns ------------------------------------------------------------------


def reference_match(pattern: str, value: str) -> bool:
    """Istio's string match: '*' any non-empty value, 'prefix*', '*suffix', else exact."""
    if pattern == "*":
        return value != ""
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    if pattern.startswith("*"):
        return value.endswith(pattern[1:])
    return value == pattern


def reference_valid(pattern: str) -> bool:
    """A pattern is valid when non-empty and '*' stands alone, or only at one end."""
    if pattern == "*":
        return True
    stars = pattern.count("*")
    if pattern == "":
        return False
    return stars == 0 or (stars == 1 and (pattern[0] == "*" or pattern[-1] == "*"))


_WORD = st.text(alphabet="ab/.*-", max_size=5)
_PATTERN = st.one_of(
    _WORD,
    _WORD.map(lambda w: w + "*"),
    _WORD.map(lambda w: "*" + w),
    st.just("*"),
    st.text(max_size=6),
)


@SETTINGS
@given(_PATTERN)
def test_pattern_problem_accepts_exactly_istio_patterns(pattern: str) -> None:
    """pattern_problem accepts exactly the patterns Istio's matching can express."""
    problem = pattern_problem(pattern)
    assert (problem is None) == reference_valid(pattern)
    if problem is not None:
        assert isinstance(problem, str) and problem


@SETTINGS
@given(
    st.lists(_PATTERN.filter(lambda p: pattern_problem(p) is None), min_size=1, max_size=4),
    st.lists(st.one_of(_WORD, st.text(max_size=6)), min_size=1, max_size=6),
)
def test_string_matcher_agrees_with_reference(patterns: list[str], values: list[str]) -> None:
    """StringMatcher.matches agrees with the Istio reference for any value, and never raises."""
    matcher = StringMatcher(patterns)
    for value in [*values, *patterns, *(p.strip("*") for p in patterns), ""]:
        expected = any(reference_match(p, value) for p in patterns)
        assert matcher.matches(value) is expected, (patterns, value)


# --- the indexed authorizer against a naive evaluator ----------------------------------------

CALLER_PATTERNS = ["orders", "ord*", "*ers", "gateway", "web-*", "*", "anonymous"]
METHOD_PATTERNS = ["GET", "POST", "PUT", "P*", "*T", "*"]
PATH_PATTERNS = ["/", "/a", "/a/", "/a/*", "/a/b", "/a/b/c", "/b*", "*b", "*/c", "*", "/x"]
HEADER_NAMES = ["x-a", "x-b"]
HEADER_PATTERNS = ["1", "2", "1*", "*2", "*"]

CALLERS: list[str | None] = [None, "orders", "ordx", "users", "gateway", "web-1", "web"]
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]
PATHS = ["/", "/a", "/a/", "/a/b", "/a/b/c", "/b", "/bb", "/xb", "/c", "/x", "/x/c"]
HEADER_VALUES = ["1", "2", "12", "21", ""]


def _some(values: list[str]) -> st.SearchStrategy[list[str]]:
    return st.lists(st.sampled_from(values), max_size=3, unique=True)


_HEADER_CONDITION = st.one_of(
    st.builds(
        lambda v: {"values": v}, st.lists(st.sampled_from(HEADER_PATTERNS), min_size=1, max_size=2)
    ),
    st.builds(
        lambda v: {"not_values": v},
        st.lists(st.sampled_from(HEADER_PATTERNS), min_size=1, max_size=2),
    ),
    st.builds(lambda p: {"present": p}, st.booleans()),
)


@st.composite
def _rule(draw: st.DrawFn) -> dict[str, Any]:
    rule: dict[str, Any] = {"action": draw(st.sampled_from(["allow", "deny"]))}
    for key, values in (
        ("from", CALLER_PATTERNS),
        ("not_from", CALLER_PATTERNS),
        ("methods", METHOD_PATTERNS),
        ("not_methods", METHOD_PATTERNS),
        ("paths", PATH_PATTERNS),
        ("not_paths", PATH_PATTERNS),
    ):
        # Positive fields are common, exclusions rarer, so that rules match often enough.
        weight = 1 if key.startswith("not_") else 3
        chosen = draw(_some(values)) if draw(st.integers(0, 3)) < weight else []
        if chosen:
            rule[key] = chosen
    headers = draw(st.dictionaries(st.sampled_from(HEADER_NAMES), _HEADER_CONDITION, max_size=2))
    keep_headers: bool = draw(st.booleans())
    if headers and keep_headers:
        rule["headers"] = headers
    return rule


@st.composite
def _policy(
    draw: st.DrawFn,
    rule: st.SearchStrategy[dict[str, Any]] | None = None,
    inbound: dict[str, Any] | None = None,
) -> dict[str, Any]:
    rules = draw(st.lists(rule if rule is not None else _rule(), max_size=8))
    for index, each in enumerate(rules):
        each["name"] = f"r{index}"
    mode = draw(st.sampled_from(["enforce", "enforce", "audit"]))
    return {
        "service": "svc",
        "inbound": {
            "authentication": "permissive",
            **(inbound or {}),
            "authorization": {"mode": mode, "rules": rules},
        },
    }


@dataclass(frozen=True)
class Request:
    """A generated request, already normalized."""

    caller: str | None
    method: str
    path: str
    headers: dict[str, str]


_REQUEST = st.builds(
    Request,
    st.sampled_from(CALLERS),
    st.sampled_from(METHODS),
    st.sampled_from(PATHS),
    st.dictionaries(st.sampled_from(HEADER_NAMES), st.sampled_from(HEADER_VALUES), max_size=2),
)


def _caller_matches(patterns: list[str], caller: str | None) -> bool:
    if caller is None:
        return "anonymous" in patterns
    return any(reference_match(p, caller) for p in patterns if p != "anonymous")


def _header_holds(condition: Mapping[str, Any], value: str | None) -> bool:
    if "present" in condition:
        return (value is not None) is condition["present"]
    if "values" in condition:
        return value is not None and any(reference_match(p, value) for p in condition["values"])
    return value is None or not any(reference_match(p, value) for p in condition["not_values"])


def _rule_holds(rule: Mapping[str, Any], request: Request) -> bool:
    """Naive evaluation of one rule: AND over the given fields, OR within a list."""
    checks = [
        "from" not in rule or _caller_matches(rule["from"], request.caller),
        "not_from" not in rule or not _caller_matches(rule["not_from"], request.caller),
        "methods" not in rule or any(reference_match(p, request.method) for p in rule["methods"]),
        "not_methods" not in rule
        or not any(reference_match(p, request.method) for p in rule["not_methods"]),
        "paths" not in rule or any(reference_match(p, request.path) for p in rule["paths"]),
        "not_paths" not in rule
        or not any(reference_match(p, request.path) for p in rule["not_paths"]),
    ]
    for name, condition in rule.get("headers", {}).items():
        checks.append(_header_holds(condition, request.headers.get(name)))
    return all(checks)


def reference_decide(
    policy: Mapping[str, Any],
    request: Request,
    holds: Callable[[Mapping[str, Any], Request], bool] = _rule_holds,
) -> tuple[bool, str | None]:
    """Linear scan: first matching deny denies; else the first matching allow, if any exist."""
    authz = policy["inbound"]["authorization"]
    rules = authz["rules"]
    audit = authz["mode"] == "audit"
    for rule in rules:
        if rule["action"] == "deny" and holds(rule, request):
            return audit, rule["name"]
    allows = [rule for rule in rules if rule["action"] == "allow"]
    if not allows:
        return True, None
    for rule in allows:
        if holds(rule, request):
            return True, rule["name"]
    return audit, None


@SETTINGS
@given(_policy(), st.lists(_REQUEST, min_size=1, max_size=15))
def test_authorizer_agrees_with_naive_evaluator(
    policy: dict[str, Any], requests: list[Request]
) -> None:
    """The indexed Authorizer decides like a linear scan: same decision, same rule."""
    compiled = compile_policy_text(yaml.safe_dump(policy, sort_keys=False), "gen.yaml")
    for request in requests:
        decision = compiled.authorizer.decide(
            request.caller, request.method, request.path, request.headers
        )
        expected = reference_decide(policy, request)
        assert (decision.allowed, decision.rule) == expected, (policy, request)
        assert decision.status == (200 if decision.allowed else 403)
        assert decision.reason


# --- the loader -----------------------------------------------------------------------------

_KEYS = st.sampled_from(
    [
        "service",
        "version",
        "inbound",
        "outbound",
        "authentication",
        "public",
        "authorization",
        "mode",
        "rules",
        "name",
        "action",
        "from",
        "paths",
        "headers",
        "values",
        "faults",
        "delay",
        "duration",
        "on",
        "unknown",
    ]
)
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=False),
    st.text(max_size=8),
    st.sampled_from(["strict", "audit", "allow", "deny", "/a/*", "*", "2s", "inventory"]),
)


def _containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.lists(children, max_size=4), st.dictionaries(_KEYS, children, max_size=4))


_YAML_DATA = st.recursive(_SCALARS, _containers, max_leaves=20)
_YAML_FRAGMENTS = st.sampled_from(
    [
        "service: inventory\n",
        "inbound:\n",
        "  authorization:\n",
        "    rules:\n",
        "      - name: r\n",
        "        action: allow\n",
        "        paths: [/a/*]\n",
        "!!int ",
        "!!float ",
        "!!bool ",
        "!!timestamp ",
        "!!binary ",
        "!!python/object:os.system ",
        "&a ",
        "*a ",
        "<<: ",
        "? ",
        ": ",
        "- ",
        "[",
        "]",
        "{",
        "}",
        "'",
        '"',
        "\t",
        "\n",
        "abc",
        "0x",
        "2001-12-14",
        "%YAML 1.1\n---\n",
    ]
)
POLICY_TEXT = st.one_of(
    st.text(max_size=80),
    st.lists(_YAML_FRAGMENTS, max_size=12).map("".join),
    _YAML_DATA.map(lambda data: yaml.safe_dump(data)),
    st.dictionaries(_KEYS, _YAML_DATA, max_size=4).map(
        lambda data: yaml.safe_dump({"service": "svc", **data}, sort_keys=False)
    ),
)


@SETTINGS
@given(POLICY_TEXT)
def test_parse_policy_raises_only_policy_error(text: str) -> None:
    """parse_policy on any text returns a policy or raises PolicyError with issues, nothing else."""
    try:
        loaded: LoadedPolicy | PolicyError = parse_policy(text, "fuzz.yaml")
    except PolicyError as exc:
        loaded = exc
    if isinstance(loaded, PolicyError):
        assert loaded.issues
    else:
        assert loaded.policy.service


HOSTILE_TEXTS: dict[str, Callable[[], str]] = {
    # Found by the property above; pinned so that each shows up by name.
    "control-character": lambda: "service: a\x07\n",
    "tag-int-not-a-number": lambda: "service: !!int abc\n",
    "tag-float-not-a-number": lambda: "service: !!float abc\n",
    "tag-bool-not-a-bool": lambda: "service: !!bool maybe\n",
    "tag-timestamp-not-a-date": lambda: "service: !!timestamp abc\n",
    "int-over-4300-digits": lambda: "service: " + "1" * 5000 + "\n",
    "deep-flow-list": lambda: "[" * 2000 + "]" * 2000,
    "deep-flow-map": lambda: "{a: " * 2000 + "}" * 2000,
}


@pytest.mark.parametrize("make", list(HOSTILE_TEXTS.values()), ids=list(HOSTILE_TEXTS))
def test_parse_policy_hostile_text_is_a_policy_error(make: Callable[[], str]) -> None:
    """Hostile YAML (bad tags, control characters, huge ints, deep nesting) is a PolicyError."""
    with pytest.raises(PolicyError) as caught:
        parse_policy(make(), "hostile.yaml")
    assert caught.value.issues


# --- end users: users, not_users, claims and not_claims --------------------------------------

USER_PATTERNS = [
    "*",
    "anonymous",
    "https://idp.test/alice",
    "https://idp.test/*",
    "*/bob",
    "https://other.test/*",
    "https://idp.test/tenant2/bob",
    "*test/bob",
    "*tenant2/bob",
    "https://idp.test/al*",
    "*ice",
    "*bob",
    "https://idp*",
]
# (issuer, subject): a subject may hold "/", and an issuer may extend another's URL.
PRINCIPALS = [
    None,
    ("https://idp.test", "alice"),
    ("https://idp.test", "bob"),
    ("https://other.test", "bob"),
    ("https://idp.test/tenant2", "bob"),
    ("https://idp.test", "tenant2/bob"),
    ("https://idp.test", "alice/bob"),
]
CLAIM_KEYS = ["groups", "role", "[org][team]", "request.auth.claims[org][team]", "level"]
CLAIM_PATTERNS = ["admin", "ad*", "*min", "*", "ops", "true", "3"]


def _claim_conditions() -> st.SearchStrategy[dict[str, list[str]]]:
    patterns = st.lists(st.sampled_from(CLAIM_PATTERNS), min_size=1, max_size=2, unique=True)
    return st.dictionaries(st.sampled_from(CLAIM_KEYS), patterns, max_size=2)


@st.composite
def _user_rule(draw: st.DrawFn) -> dict[str, Any]:
    rule = draw(_rule())
    for key in ("users", "not_users"):
        chosen = draw(_some(USER_PATTERNS)) if draw(st.integers(0, 3)) < 2 else []
        if chosen:
            rule[key] = chosen
    for key in ("claims", "not_claims"):
        chosen_claims = draw(_claim_conditions()) if draw(st.booleans()) else {}
        if chosen_claims:
            rule[key] = chosen_claims
    return rule


def _user_policy() -> st.SearchStrategy[dict[str, Any]]:
    end_users = {"end_users": {"issuers": [{"issuer": "https://idp.test"}]}}
    return _policy(_user_rule(), end_users)


_CLAIM_VALUE = st.one_of(
    st.sampled_from(["admin", "ops", "dev", "", "administrator"]),
    st.lists(st.sampled_from(["admin", "ops", "dev", "", "sysadmin"]), max_size=3),
    st.sampled_from([True, False, 3, 4.5, None]),
    st.just({"team": "admin"}),
)
_USER_CLAIMS = st.fixed_dictionaries(
    {},
    optional={
        "groups": _CLAIM_VALUE,
        "role": _CLAIM_VALUE,
        "level": _CLAIM_VALUE,
        "org": st.one_of(st.fixed_dictionaries({}, optional={"team": _CLAIM_VALUE}), _CLAIM_VALUE),
    },
)


@dataclass(frozen=True)
class UserRequest:
    """A generated request with an end user (``principal`` ``None``: anonymous)."""

    caller: str | None
    method: str
    path: str
    headers: dict[str, str]
    principal: tuple[str, str] | None
    claims: dict[str, Any]


_USER_REQUEST = st.builds(
    UserRequest,
    st.sampled_from(CALLERS),
    st.sampled_from(METHODS),
    st.sampled_from(PATHS),
    st.dictionaries(st.sampled_from(HEADER_NAMES), st.sampled_from(HEADER_VALUES), max_size=2),
    st.sampled_from(PRINCIPALS),
    _USER_CLAIMS,
)


def _reference_claim(claims: Mapping[str, Any], key: str) -> list[str] | None:
    """Istio's reading of a claim: a string, or the strings of a list; nothing else."""
    path = ["org", "team"] if "[org]" in key else [key.strip("[]")]
    value: Any = claims
    for part in path:
        value = value.get(part) if isinstance(value, dict) else None
    scalars = value if isinstance(value, list) else [value]
    return [item for item in scalars if isinstance(item, str)] or None


def _reference_principal(patterns: list[str], principal: tuple[str, str] | None) -> bool:
    """Istio's requestPrincipals, as the regular expressions its generator writes: each pattern
    split at its last "/" into an issuer and a subject matcher."""
    if principal is None:
        return "anonymous" in patterns
    issuer, subject = principal
    for pattern in patterns:
        if pattern == "anonymous":
            continue
        cut = pattern.rfind("/")
        iss, sub = (pattern[:cut], pattern[cut + 1 :]) if cut >= 0 else (pattern, "")
        if pattern == "*":
            iss_re, sub_re = ".+", ".+"
        elif pattern.startswith("*") and cut >= 0:
            iss_re = ".+" if iss == "*" else ".*" + re.escape(iss[1:])
            sub_re = re.escape(sub)
        elif pattern.startswith("*"):
            iss_re, sub_re = ".+", ".*" + re.escape(pattern[1:])
        elif pattern.endswith("*") and cut >= 0:
            iss_re = re.escape(iss)
            sub_re = ".+" if sub == "*" else re.escape(sub[:-1]) + ".*"
        elif pattern.endswith("*"):
            iss_re, sub_re = re.escape(pattern[:-1]) + ".*", ".+"
        else:
            iss_re, sub_re = re.escape(iss), re.escape(sub)
        if re.fullmatch(iss_re, issuer, re.S) and re.fullmatch(sub_re, subject, re.S):
            return True
    return False


def _user_rule_holds(rule: Mapping[str, Any], request: UserRequest) -> bool:
    plain = Request(request.caller, request.method, request.path, request.headers)
    if not _rule_holds(rule, plain):
        return False
    if "users" in rule and not _reference_principal(rule["users"], request.principal):
        return False
    if "not_users" in rule and _reference_principal(rule["not_users"], request.principal):
        return False
    claims = request.claims if request.principal is not None else {}
    for key, patterns in rule.get("claims", {}).items():
        values = _reference_claim(claims, key)
        if not values or not any(reference_match(p, v) for p in patterns for v in values):
            return False
    for key, patterns in rule.get("not_claims", {}).items():
        values = _reference_claim(claims, key)
        if values and any(reference_match(p, v) for p in patterns for v in values):
            return False
    return True


def reference_decide_users(
    policy: Mapping[str, Any], request: UserRequest
) -> tuple[bool, str | None]:
    """:func:`reference_decide` with end-user conditions."""
    return reference_decide(policy, request, _user_rule_holds)  # type: ignore[arg-type]


@SETTINGS
@given(_user_policy(), st.lists(_USER_REQUEST, min_size=1, max_size=15))
def test_authorizer_with_end_users_agrees_with_naive_evaluator(
    policy: dict[str, Any], requests: list[UserRequest]
) -> None:
    """With users, not_users, claims and not_claims, the cached plans decide like a linear
    scan (and like the uncached path): same decision, same rule."""
    from mesh_middleware.identity.end_user import EndUser

    compiled = compile_policy_text(yaml.safe_dump(policy, sort_keys=False), "gen.yaml")
    for request in requests:
        user = None
        if request.principal is not None:
            issuer, subject = request.principal
            claims = {**request.claims, "iss": issuer, "sub": subject}
            user = EndUser(issuer=issuer, subject=subject, claims=claims, expires_at=2e9)
        args = (request.caller, request.method, request.path, request.headers, user)
        decision = compiled.authorizer.decide(*args)
        expected = reference_decide_users(policy, request)
        assert (decision.allowed, decision.rule) == expected, (policy, request)
        uncached = compiled.authorizer.decide_uncached(*args)
        assert (uncached.allowed, uncached.rule) == expected


_KEY_PART = st.text(st.characters(codec="utf-8", exclude_characters="[]"), min_size=1, max_size=6)


@SETTINGS
@given(st.lists(_KEY_PART, min_size=1, max_size=8))
def test_claim_paths_in_bracket_form_round_trip(parts: list[str]) -> None:
    """``[a][b]…`` and ``request.auth.claims[a][b]…`` name the path (a, b, …)."""
    from mesh_middleware.policy.claims import parse_claim_path

    bracketed = "".join(f"[{p}]" for p in parts)
    assert parse_claim_path(bracketed) == tuple(parts)
    assert parse_claim_path("request.auth.claims" + bracketed) == tuple(parts)


@SETTINGS
@given(st.text(max_size=30))
def test_claim_path_parser_raises_only_value_error(key: str) -> None:
    """Any key either names a claim path or is refused with ValueError (a policy error)."""
    from mesh_middleware.policy.claims import parse_claim_path

    try:
        path = parse_claim_path(key)
    except ValueError:
        return
    assert path and all(path)
