"""Policy files load into validated models, and every error names file, line and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh_middleware.errors import PolicyError
from mesh_middleware.policy.loader import load_policy, parse_policy
from mesh_middleware.policy.schema import policy_json_schema

FULL = """\
service: inventory
version: v2
zone: eu-1
inbound:
  authentication: strict
  public: [/healthz, /metrics]
  authorization:
    mode: enforce
    rules:
      - name: orders-reserve
        action: allow
        from: [orders]
        not_from: []
        methods: [POST]
        paths: [/reserve, /items/*]
        not_paths: []
        headers:
          x-tenant: {values: [acme, globex]}
  faults:
    - name: slow-items
      match: {paths: [/items/*], from: [gateway], headers: {x-chaos: {values: ["on"]}}}
      delay: {duration: 200ms, percent: 10}
      abort: {status: 503, percent: 5}
outbound:
  defaults:
    timeout: 5s
    retries:
      attempts: 2
      per_try_timeout: 1s
      on: [connect-failure, reset, 502, 503, 504]
      budget: {ratio: 0.2, min_per_second: 10}
    load_balancer: ewma
    outlier_detection: {consecutive_failures: 5, base_ejection: 30s, max_ejection_percent: 50}
    max_concurrent: 100
  services:
    inventory:
      timeout: 2s
      endpoints: []
      routes:
        - match: {headers: {x-canary: {values: [always]}}}
          to: [{version: v2}]
        - to: [{version: v1, weight: 90}, {version: v2, weight: 10}]
      mirror: {to: {version: v3}, percent: 5}
"""


def _issues(text: str) -> list[str]:
    with pytest.raises(PolicyError) as caught:
        parse_policy(text, "p.yaml")
    return [str(issue) for issue in caught.value.issues]


def test_the_design_example_is_valid() -> None:
    """The full example of DESIGN §2 loads, with durations in seconds."""
    loaded = parse_policy(FULL, "p.yaml")
    policy = loaded.policy
    assert policy.service == "inventory"
    assert policy.inbound.faults[0].delay is not None
    assert policy.inbound.faults[0].delay.duration == pytest.approx(0.2)
    assert policy.outbound.defaults.retries.on == ["connect-failure", "reset", "502", "503", "504"]
    assert policy.outbound.services["inventory"].timeout == 2.0
    assert loaded.line_of("inbound", "authorization", "rules", 0) == 10


def test_unknown_key_names_file_line_and_field() -> None:
    """A misspelled key is an error at its own line, not silently ignored."""
    text = "service: inventory\ninbound:\n  authorisation: {}\n"
    assert _issues(text) == [
        "p.yaml:3: inbound.authorisation: unknown key (check its spelling and indentation)"
    ]


def test_every_problem_is_reported_at_once() -> None:
    """Several mistakes give several issues, each with its line."""
    text = (
        "service: inventory\n"
        "inbound:\n"
        "  authentication: lax\n"
        "  faults:\n"
        "    - name: f\n"
        "      delay: {duration: 2 seconds, percent: 150}\n"
    )
    issues = _issues(text)
    assert any(i.startswith("p.yaml:3: inbound.authentication:") for i in issues)
    assert any(
        i.startswith("p.yaml:6: inbound.faults[0].delay.duration: expected a duration")
        for i in issues
    )
    assert any(i.startswith("p.yaml:6: inbound.faults[0].delay.percent:") for i in issues)


def test_missing_service_is_required() -> None:
    """The service name is required."""
    assert _issues("inbound: {}\n") == ["p.yaml:1: service: required field is missing"]


def test_duplicate_keys_are_errors() -> None:
    """YAML would keep the last duplicate silently; we refuse it."""
    assert _issues("service: a\nservice: b\n") == ["p.yaml:2: service: duplicate key"]


def test_duplicate_rule_names_are_errors() -> None:
    """Rule and fault names are unique within a file, since decisions cite them."""
    text = """\
service: a
inbound:
  authorization:
    rules:
      - {name: r, action: allow}
      - {name: r, action: deny}
"""
    (issue,) = _issues(text)
    assert "rule name 'r' is used twice" in issue


@pytest.mark.parametrize(
    ("snippet", "expected"),
    [
        ("paths: ['/a*b']", "'*' may only stand at the start or the end"),
        ("paths: [items]", "a path pattern starts with '/' or '*'"),
        ("from: ['']", "empty pattern"),
        ("methods: ['GE T']", "is not an HTTP method"),
        ("headers: {x-a: {values: [a], present: true}}", "exactly one of"),
        ("headers: {'bad header': {present: true}}", "not a valid header name"),
        ("action: permit", "Input should be 'allow' or 'deny'"),
    ],
)
def test_rule_fields_are_validated(snippet: str, expected: str) -> None:
    """Patterns, methods and header conditions are checked when the file loads."""
    action = "" if snippet.startswith("action") else "action: allow, "
    text = (
        "service: a\ninbound:\n  authorization:\n    rules:\n"
        f"      - {{name: r, {action}{snippet}}}\n"
    )
    issues = _issues(text)
    assert any(expected in i and i.startswith("p.yaml:5:") for i in issues), issues


@pytest.mark.parametrize("duration", ["10", "1.5", "-1s", "0s", "2 s", "25h", "1d"])
def test_bad_durations_are_rejected(duration: str) -> None:
    """Durations are strings with a unit, more than zero and at most a day."""
    text = f"service: a\noutbound:\n  defaults:\n    timeout: '{duration}'\n"
    (issue,) = _issues(text)
    assert issue.startswith("p.yaml:4: outbound.defaults.timeout:")


def test_unquoted_on_key_is_a_key_not_a_boolean() -> None:
    """YAML 1.1 reads a bare `on` as true; retry conditions still parse."""
    text = "service: a\noutbound:\n  defaults:\n    retries:\n      on: [reset]\n"
    assert parse_policy(text).policy.outbound.defaults.retries.on == ["reset"]


def test_type_errors_say_what_was_given() -> None:
    """A wrong type names the expected type and the value found."""
    (issue,) = _issues("service: a\ninbound:\n  public: /healthz\n")
    assert issue.startswith("p.yaml:3: inbound.public:") and "'/healthz'" in issue


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "the file is empty"),
        ("service: [", "invalid YAML"),
        ("- a\n- b\n", "expected a mapping"),
        ("a: &x [*x]\n", "recursive"),
    ],
)
def test_malformed_files_get_clear_errors(text: str, expected: str) -> None:
    """Empty, unparsable and non-mapping files are errors with a reason."""
    assert any(expected in issue for issue in _issues(text))


def test_unreadable_file_is_an_error(tmp_path: Path) -> None:
    """A missing file raises PolicyError naming it, never OSError."""
    with pytest.raises(PolicyError, match="cannot read the file"):
        load_policy(tmp_path / "missing.yaml")


def test_non_utf8_file_is_an_error(tmp_path: Path) -> None:
    """Bytes that are not UTF-8 are refused with a reason."""
    path = tmp_path / "p.yaml"
    path.write_bytes(b"service: \xff\n")
    with pytest.raises(PolicyError, match="not UTF-8"):
        load_policy(path)


def test_oversized_file_is_refused(tmp_path: Path) -> None:
    """Files over 1 MiB are refused before parsing."""
    path = tmp_path / "p.yaml"
    path.write_text("service: a\n" + "#" * (1024 * 1024 + 10))
    with pytest.raises(PolicyError, match="larger than"):
        load_policy(path)


def test_json_schema_is_generated_from_the_models() -> None:
    """The JSON Schema forbids unknown keys and knows every top-level field."""
    schema = policy_json_schema()
    assert schema["additionalProperties"] is False
    assert set(schema["properties"]) == {
        "service",
        "version",
        "zone",
        "inbound",
        "outbound",
        "telemetry",
    }
    assert schema["required"] == ["service"]
    rule = schema["$defs"]["Rule"]
    assert "from" in rule["properties"] and rule["additionalProperties"] is False


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("/café", "'/caf%C3%A9'"),
        ("/caf%c3%a9", "write it as '/caf%C3%A9'"),
        ("/a%7eb", "write it as '/a~b'"),
        ("/a//b*", "write it as '/a/b'"),
        ("/a/../b", "write it as '/b'"),
        ("/a%2Fb", "can never match"),
        ("/a b", "percent-encoded"),
    ],
)
def test_path_patterns_must_be_written_normalized(pattern: str, expected: str) -> None:
    """A pattern that could never match a normalized request path is an error, with the fix."""
    text = f"service: a\ninbound:\n  public: ['{pattern}']\n"
    (issue,) = _issues(text)
    assert issue.startswith("p.yaml:3: inbound.public[0]:") and expected in issue


def test_normalized_patterns_are_accepted() -> None:
    """Upper-case escapes of reserved characters, prefixes and suffixes are fine."""
    text = "service: a\ninbound:\n  public: ['/caf%C3%A9', '/items/*', '*.json', '/a%20b', '/']\n"
    assert parse_policy(text).policy.inbound.public[0] == "/caf%C3%A9"


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://127.0.0.1:99999", "Port out of range"),
        ("http://:80", "expected scheme://host[:port]"),
        ("http://user@host:80", "expected scheme://host[:port]"),
        ("http://host:0", "expected scheme://host[:port]"),
        ("ftp://host", "should match pattern"),
        ("http://host/path", "should match pattern"),
    ],
)
def test_static_endpoint_urls_are_checked(url: str, problem: str) -> None:
    text = f"service: a\noutbound:\n  services:\n    b:\n      endpoints:\n        - url: '{url}'\n"
    (issue,) = _issues(text)
    assert "outbound.services.b.endpoints[0].url" in issue and problem in issue
    assert issue.startswith("p.yaml:6:")


def test_a_route_with_every_weight_zero_is_refused() -> None:
    text = (
        "service: a\noutbound:\n  services:\n    b:\n      routes:\n"
        "        - to: [{version: v1, weight: 0}, {version: v2, weight: 0}]\n"
    )
    (issue,) = _issues(text)
    assert "outbound.services.b.routes[0]" in issue and "every weight" in issue
