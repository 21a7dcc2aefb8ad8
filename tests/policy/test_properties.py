"""Property tests: path normalization, Istio string patterns, the indexed authorizer, the loader.

Each property compares the implementation against a small, obviously correct reference (or
against invariants DESIGN §2 states) over generated inputs.
"""

from __future__ import annotations

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
def _policy(draw: st.DrawFn) -> dict[str, Any]:
    rules = draw(st.lists(_rule(), max_size=8))
    for index, rule in enumerate(rules):
        rule["name"] = f"r{index}"
    mode = draw(st.sampled_from(["enforce", "enforce", "audit"]))
    return {
        "service": "svc",
        "inbound": {
            "authentication": "permissive",
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


def reference_decide(policy: Mapping[str, Any], request: Request) -> tuple[bool, str | None]:
    """Linear scan: first matching deny denies; else the first matching allow, if any exist."""
    authz = policy["inbound"]["authorization"]
    rules = authz["rules"]
    audit = authz["mode"] == "audit"
    for rule in rules:
        if rule["action"] == "deny" and _rule_holds(rule, request):
            return audit, rule["name"]
    allows = [rule for rule in rules if rule["action"] == "allow"]
    if not allows:
        return True, None
    for rule in allows:
        if _rule_holds(rule, request):
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
