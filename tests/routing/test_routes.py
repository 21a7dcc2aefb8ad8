"""Route tables: first match, Istio matching, weighted splits, validation, mirroring."""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh_middleware.policy import schema
from mesh_middleware.routing.routes import (
    DEFAULT_CHOICE,
    MirrorRule,
    RouteChoice,
    RouteTable,
)

SIGMAS = 4.5


def route(**fields: Any) -> schema.Route:
    return schema.Route.model_validate(fields)


def table(*routes: dict[str, Any]) -> RouteTable:
    return RouteTable([route(**r) for r in routes])


def never() -> float:
    raise AssertionError("rand() must not be called")


def within_binomial(count: int, trials: int, p: float) -> bool:
    sigma = math.sqrt(trials * p * (1 - p))
    return abs(count - trials * p) <= SIGMAS * sigma


class ExplodingHeaders(Mapping[str, str]):
    """Headers that fail the test when read."""

    def __getitem__(self, key: str) -> str:
        raise AssertionError("headers must not be read")

    def __iter__(self) -> Iterator[str]:
        raise AssertionError("headers must not be read")

    def __len__(self) -> int:
        raise AssertionError("headers must not be read")


# --- no routes, no match ----------------------------------------------------------------------


def test_no_routes_returns_the_constant_without_any_work() -> None:
    empty = RouteTable([])
    choice = empty.select("GET", "/a%zz//..", ExplodingHeaders(), never)
    assert choice is DEFAULT_CHOICE
    assert choice == RouteChoice("default", None, False)
    assert not empty.uses_headers
    assert not empty.uses_path


def test_no_matching_route_goes_to_every_instance() -> None:
    t = table({"match": {"paths": ["/orders/*"]}, "to": [{"version": "v2"}]})
    assert t.select("GET", "/items", {}) is DEFAULT_CHOICE


# --- first match, labels ----------------------------------------------------------------------


def test_first_matching_route_wins_in_file_order() -> None:
    t = table(
        {"match": {"paths": ["/a/*"]}, "to": [{"version": "v1"}]},
        {"name": "canary", "match": {"paths": ["/a/b"]}, "to": [{"version": "v2"}]},
        {"to": [{"version": "v3"}]},
    )
    assert t.select("GET", "/a/b", {}) == RouteChoice("route[0]", "v1", False)
    assert t.select("GET", "/c", {}) == RouteChoice("route[2]", "v3", False)
    reordered = table(
        {"name": "canary", "match": {"paths": ["/a/b"]}, "to": [{"version": "v2"}]},
        {"match": {"paths": ["/a/*"]}, "to": [{"version": "v1"}]},
    )
    assert reordered.select("GET", "/a/b", {}) == RouteChoice("canary", "v2", False)
    assert reordered.select("GET", "/a/c", {}) == RouteChoice("route[1]", "v1", False)


def test_route_carries_its_retry_opt_in_and_no_version_means_every_instance() -> None:
    t = table({"name": "pay", "retry_non_idempotent": True, "to": [{}]})
    assert t.select("POST", "/", {}) == RouteChoice("pay", None, True)


# --- matching ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "path", "matches"),
    [
        ("/items", "/items", True),
        ("/items", "/items/", False),
        ("/items/*", "/items/42", True),
        ("/items/*", "/item", False),
        ("*.json", "/a/b.json", True),
        ("*.json", "/a/b.xml", False),
        ("*", "/anything", True),
        # matched after normalization: query, dot-segments, repeated slashes, unreserved escapes
        ("/items", "/items?x=1", True),
        ("/items", "/a/../items", True),
        ("/items/*", "//items//42", True),
        ("/items", "/%69tems", True),
        ("/admin", "/public/../admin", True),
    ],
)
def test_path_patterns(pattern: str, path: str, matches: bool) -> None:
    t = table({"match": {"paths": [pattern]}, "to": [{"version": "v2"}]})
    assert t.uses_path
    assert (t.select("GET", path, {}).version == "v2") is matches


@pytest.mark.parametrize("path", ["/files/a%2Fb?x=1", "/files/%zz#frag", "/files/a\\b?q"])
def test_unnormalizable_path_is_matched_raw_without_its_query(path: str) -> None:
    t = table(
        {"match": {"paths": ["*?x=1", "*#frag", "*?q"]}, "to": [{"version": "query"}]},
        {"match": {"paths": ["/files/*"]}, "to": [{"version": "files"}]},
    )
    assert t.select("GET", path, {}).version == "files"


@pytest.mark.parametrize("path", ["", "relative", "?", "/a%2F", "/%", "/\x00", "x" * 10_000])
def test_paths_that_cannot_be_normalized_never_raise(path: str) -> None:
    t = table({"match": {"paths": ["/a/*"]}, "to": [{"version": "v2"}]})
    assert t.select("GET", path, {}) is DEFAULT_CHOICE


def test_methods() -> None:
    t = table(
        {"match": {"methods": ["POST", "PUT"]}, "to": [{"version": "write"}]},
        {"match": {"methods": ["G*"]}, "to": [{"version": "read"}]},
    )
    assert t.select("POST", "/", {}).version == "write"
    assert t.select("PUT", "/", {}).version == "write"
    assert t.select("GET", "/", {}).version == "read"
    assert t.select("DELETE", "/", {}) is DEFAULT_CHOICE
    assert not t.uses_path
    assert not t.uses_headers


def test_all_match_fields_must_hold() -> None:
    t = table(
        {
            "match": {
                "paths": ["/api/*"],
                "methods": ["GET"],
                "headers": {"x-canary": {"values": ["on"]}},
            },
            "to": [{"version": "v2"}],
        }
    )
    assert t.select("GET", "/api/x", {"x-canary": "on"}).version == "v2"
    assert t.select("POST", "/api/x", {"x-canary": "on"}) is DEFAULT_CHOICE
    assert t.select("GET", "/other", {"x-canary": "on"}) is DEFAULT_CHOICE
    assert t.select("GET", "/api/x", {"x-canary": "off"}) is DEFAULT_CHOICE


@pytest.mark.parametrize(
    ("condition", "headers", "holds"),
    [
        ({"values": ["always"]}, {"x-canary": "always"}, True),
        ({"values": ["always"]}, {"x-canary": "never"}, False),
        ({"values": ["always"]}, {}, False),  # a missing header fails `values`
        ({"values": ["beta-*"]}, {"x-canary": "beta-7"}, True),
        ({"values": ["*-eu"]}, {"x-canary": "acme-eu"}, True),
        ({"values": ["*"]}, {"x-canary": "x"}, True),
        ({"values": ["*"]}, {"x-canary": ""}, False),  # `*` needs a non-empty value
        ({"not_values": ["off"]}, {"x-canary": "on"}, True),
        ({"not_values": ["off"]}, {"x-canary": "off"}, False),
        ({"not_values": ["off"]}, {}, True),  # a missing header holds `not_values`
        ({"present": True}, {"x-canary": ""}, True),
        ({"present": True}, {}, False),
        ({"present": False}, {}, True),
        ({"present": False}, {"x-canary": "1"}, False),
    ],
)
def test_header_conditions(condition: dict[str, Any], headers: dict[str, str], holds: bool) -> None:
    t = table({"match": {"headers": {"X-Canary": condition}}, "to": [{"version": "v2"}]})
    assert t.uses_headers
    assert (t.select("GET", "/", headers).version == "v2") is holds


def test_header_names_lists_what_the_routes_read() -> None:
    t = table(
        {"match": {"headers": {"X-Canary": {"present": True}}}, "to": [{"version": "v2"}]},
        {"match": {"headers": {"x-user": {"values": ["a"]}}}, "to": [{"version": "v3"}]},
        {"match": {"paths": ["/a"]}, "to": [{"version": "v4"}]},
    )
    assert t.header_names == {"x-canary", "x-user"}
    assert table({"to": [{}]}).header_names == frozenset()


def test_header_names_are_looked_up_case_insensitively_in_client_header_mappings() -> None:
    httpx = pytest.importorskip("httpx")
    t = table({"match": {"headers": {"x-canary": {"values": ["on"]}}}, "to": [{"version": "v2"}]})
    assert t.select("GET", "/", httpx.Headers({"X-Canary": "on"})).version == "v2"


# --- weighted splits --------------------------------------------------------------------------


def split_counts(t: RouteTable, n: int, seed: int) -> Counter[str | None]:
    rng = random.Random(seed)
    return Counter(t.select("GET", "/", {}, rng.random).version for _ in range(n))


@pytest.mark.parametrize("weights", [(90, 10), (9, 1)])
def test_weighted_split_lands_within_binomial_bounds(weights: tuple[int, int]) -> None:
    t = table(
        {"to": [{"version": "v1", "weight": weights[0]}, {"version": "v2", "weight": weights[1]}]}
    )
    counts = split_counts(t, 10_000, seed=1234)
    assert set(counts) == {"v1", "v2"}
    assert within_binomial(counts["v2"], 10_000, 0.1), counts


def test_three_way_split_with_weights_not_summing_to_100() -> None:
    t = table(
        {
            "to": [
                {"version": "a", "weight": 1},
                {"version": "b", "weight": 2},
                {"version": "c", "weight": 3},
            ]
        }
    )
    counts = split_counts(t, 12_000, seed=7)
    for version, share in (("a", 1 / 6), ("b", 2 / 6), ("c", 3 / 6)):
        assert within_binomial(counts[version], 12_000, share), counts


def test_split_boundaries_are_exact() -> None:
    t = table({"to": [{"version": "v1", "weight": 90}, {"version": "v2", "weight": 10}]})
    assert t.select("GET", "/", {}, lambda: 0.0).version == "v1"
    assert t.select("GET", "/", {}, lambda: 0.8999).version == "v1"
    assert t.select("GET", "/", {}, lambda: 0.9).version == "v2"
    assert t.select("GET", "/", {}, lambda: 0.99999).version == "v2"
    assert t.select("GET", "/", {}, lambda: 1.0).version == "v2"  # a stub out of range


def test_weight_zero_is_never_chosen() -> None:
    t = table(
        {
            "to": [
                {"version": "v0a", "weight": 0},
                {"version": "v1", "weight": 50},
                {"version": "v0b", "weight": 0},
                {"version": "v2", "weight": 50},
                {"version": "v0c", "weight": 0},
            ]
        }
    )
    grid = [i / 1000 for i in range(1000)] + [0.5, math.nextafter(1.0, 0.0)]
    seen = {t.select("GET", "/", {}, iter([r]).__next__).version for r in grid}
    assert seen == {"v1", "v2"}


def test_single_destination_draws_nothing() -> None:
    t = table({"to": [{"version": "v0", "weight": 0}, {"version": "v2", "weight": 30}]})
    assert t.select("GET", "/", {}, never).version == "v2"


@pytest.mark.parametrize(("name", "label"), [("checkout", "'checkout'"), (None, "'route[1]'")])
def test_all_zero_weights_are_rejected_naming_the_route(name: str | None, label: str) -> None:
    # model_construct skips validation: the table must not rely on the schema catching this.
    bad = schema.Route.model_construct(
        name=name,
        match=schema.RouteMatch(),
        to=[schema.Destination(version="v1", weight=0), schema.Destination(version="v2", weight=0)],
        retry_non_idempotent=False,
    )
    with pytest.raises(ValueError, match=rf"route {re.escape(label)}.*weight 0"):
        RouteTable([route(to=[{"version": "v1"}]), bad])


# --- properties -------------------------------------------------------------------------------

_TABLE = table(
    {"match": {"paths": ["/a/*", "*.json", "/exact"]}, "to": [{"version": "p"}]},
    {"match": {"methods": ["P*", "*E"]}, "to": [{"version": "m"}]},
    {
        "match": {"headers": {"x-a": {"not_values": ["z*"]}, "x-b": {"present": True}}},
        "to": [{"version": "h1", "weight": 3}, {"version": "h2", "weight": 0}, {"version": "h3"}],
    },
)
_POSSIBLE = {"p", "m", "h1", "h3", None}
_HEADER_NAMES = st.sampled_from(["x-a", "x-b", "x-c"]) | st.text(max_size=8)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    method=st.text(max_size=10),
    path=st.text(max_size=40) | st.from_regex(r"/[a-z%./?#\\]{0,30}", fullmatch=True),
    headers=st.dictionaries(_HEADER_NAMES, st.text(max_size=8), max_size=4),
    rand=st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
)
def test_select_never_raises_and_picks_a_routable_version(
    method: str, path: str, headers: dict[str, str], rand: float
) -> None:
    choice = _TABLE.select(method, path, headers, lambda: rand)
    assert choice.version in _POSSIBLE
    assert choice.version != "h2"


# --- mirroring --------------------------------------------------------------------------------


def mirror(percent: float, version: str | None = "v3") -> MirrorRule:
    return MirrorRule(
        schema.Mirror.model_validate({"to": {"version": version}, "percent": percent})
    )


def test_mirror_fields() -> None:
    rule = mirror(5)
    assert rule.version == "v3"
    assert rule.percent == 5.0


def test_mirror_zero_never_and_hundred_always_without_drawing() -> None:
    assert not mirror(0).chosen(never)
    assert mirror(100).chosen(never)


def test_mirror_threshold_is_exact() -> None:
    rule = mirror(5)
    assert rule.chosen(lambda: 0.0)
    assert rule.chosen(lambda: 0.0499)
    assert not rule.chosen(lambda: 0.05)


@pytest.mark.parametrize("percent", [0.5, 5, 50])
def test_mirror_percent_within_binomial_bounds(percent: float) -> None:
    rule = mirror(percent)
    rng = random.Random(99)
    chosen = sum(rule.chosen(rng.random) for _ in range(20_000))
    assert within_binomial(chosen, 20_000, percent / 100), chosen


def test_choices_are_built_once_not_per_call() -> None:
    t = table({"to": [{"version": "v1", "weight": 1}, {"version": "v2", "weight": 1}]})
    assert t.select("GET", "/", {}, lambda: 0.1) is t.select("GET", "/", {}, lambda: 0.2)
