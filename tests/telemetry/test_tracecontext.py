"""W3C Trace Context parsing and formatting: the spec's rules case by case, then as properties."""

from __future__ import annotations

import random
import re
import subprocess
import sys

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from mesh_middleware.telemetry.tracecontext import (
    FLAG_RANDOM,
    FLAG_SAMPLED,
    MAX_TRACESTATE_LENGTH,
    SpanContext,
    child_of,
    incoming,
    new_span_id,
    new_trace_id,
    parse_traceparent,
    parse_tracestate,
    server_span,
)

TRACE = "12345678901234567890123456789012"
PARENT = "1234567890123456"
VALID = f"00-{TRACE}-{PARENT}-01"

# The grammar again, written independently of the module (from the spec's ABNF), to check it.
LCALPHA = "abcdefghijklmnopqrstuvwxyz"
DIGITS = "0123456789"
KEYCHARS = LCALPHA + DIGITS + "_-*/"
NBLK = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in ",=")
HEXLC = "0123456789abcdef"


def is_spec_key(key: str) -> bool:
    if "@" not in key:
        return 1 <= len(key) <= 256 and key[0] in LCALPHA and all(c in KEYCHARS for c in key)
    tenant, _, system = key.partition("@")
    return (
        1 <= len(tenant) <= 241
        and tenant[0] in LCALPHA + DIGITS
        and all(c in KEYCHARS for c in tenant)
        and 1 <= len(system) <= 14
        and system[0] in LCALPHA
        and all(c in KEYCHARS for c in system)
    )


def is_spec_value(value: str) -> bool:
    return 1 <= len(value) <= 256 and value[-1] in NBLK and all(c in NBLK + " " for c in value)


# -- traceparent: the cases of the W3C test suite and the spec's versioning rules -------------


@pytest.mark.parametrize(
    "header",
    [
        VALID,
        f"00-{TRACE}-{PARENT}-00",
        f" 00-{TRACE}-{PARENT}-01",
        f"\t00-{TRACE}-{PARENT}-01",
        f"00-{TRACE}-{PARENT}-01 ",
        f"\t 00-{TRACE}-{PARENT}-01 \t",
        f"cc-{TRACE}-{PARENT}-01",
        f"cc-{TRACE}-{PARENT}-01-what-the-future-will-be-like",
        f"01-{TRACE}-{PARENT}-01-",
        f"fe-{TRACE}-{PARENT}-01",
    ],
)
def test_valid_traceparent_keeps_the_trace(header: str) -> None:
    parsed = parse_traceparent(header)
    assert parsed is not None
    assert (parsed.trace_id, parsed.span_id) == (TRACE, PARENT)
    assert parsed.sampled == ("-00" not in header)


@pytest.mark.parametrize(
    "header",
    [
        "",
        f"00-{TRACE}-{PARENT}-01.",
        f"00-{TRACE}-{PARENT}-01-what-the-future-will-be-like",
        f"00-{TRACE}-{PARENT}-01-",
        f"cc-{TRACE}-{PARENT}-01.what-the-future-will-be-like",
        f"ff-{TRACE}-{PARENT}-01",
        f".0-{TRACE}-{PARENT}-01",
        f"0.-{TRACE}-{PARENT}-01",
        f"000-{TRACE}-{PARENT}-01",
        f"0000-{TRACE}-{PARENT}-01",
        f"0-{TRACE}-{PARENT}-01",
        f"CC-{TRACE}-{PARENT}-01",
        f"00-{'0' * 32}-{PARENT}-01",
        f"00-.{TRACE[1:]}-{PARENT}-01",
        f"00-{TRACE[:-1]}.-{PARENT}-01",
        f"00-{TRACE}3-{PARENT}-01",
        f"00-{TRACE[:-1]}-{PARENT}-01",
        f"00-ABCDEF{TRACE[6:]}-{PARENT}-01",
        f"00-{TRACE}-{'0' * 16}-01",
        f"00-{TRACE}-.{PARENT[1:]}-01",
        f"00-{TRACE}-{PARENT[:-1]}.-01",
        f"00-{TRACE}-{PARENT}7-01",
        f"00-{TRACE}-{PARENT[:-1]}-01",
        f"00-{TRACE}-ABCDEF{PARENT[6:]}-01",
        f"00-{TRACE}-{PARENT}-.0",
        f"00-{TRACE}-{PARENT}-0.",
        f"00-{TRACE}-{PARENT}-001",
        f"00-{TRACE}-{PARENT}-1",
        f"00-{TRACE}-{PARENT}-0A",
        f"00-{TRACE}-{PARENT}-01\n",
        f"00_{TRACE}_{PARENT}_01",
        # Two traceparent fields combined into one value: the trace restarts.
        f"{VALID},{VALID}",
        f"cc-{TRACE}-{PARENT}-01, cc-{TRACE}-{PARENT}-01",
        f"cc-{TRACE}-{PARENT}",
    ],
)
def test_invalid_traceparent_restarts_the_trace(header: str) -> None:
    assert parse_traceparent(header) is None
    assert parse_traceparent(header.encode("latin-1")) is None


def test_none_and_bytes() -> None:
    assert parse_traceparent(None) is None
    assert parse_traceparent(VALID.encode()) == parse_traceparent(VALID)
    assert parse_traceparent(VALID.encode()[:-1] + b"\xe9") is None


def test_a_higher_version_keeps_only_the_flags_this_version_knows() -> None:
    parsed = parse_traceparent(f"cc-{TRACE}-{PARENT}-ff-extra")
    assert parsed is not None
    assert parsed.flags == FLAG_SAMPLED | FLAG_RANDOM
    assert parsed.traceparent() == f"00-{TRACE}-{PARENT}-03"


def test_version_00_flags_are_read_as_sent() -> None:
    parsed = parse_traceparent(f"00-{TRACE}-{PARENT}-09")
    assert parsed is not None
    assert parsed.flags == 9
    assert parsed.sampled
    assert not parsed.random


# -- tracestate ------------------------------------------------------------------------------

ALL_KEY_CHARS = LCALPHA + DIGITS + "_-*/"
ALL_VALUE_CHARS = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) not in ",=")


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (["foo=1,bar=2"], "foo=1,bar=2"),
        (["foo=1,bar=2", "rojo=1,congo=2", "baz=3"], "foo=1,bar=2,rojo=1,congo=2,baz=3"),
        (["foo=1 \t , \t bar=2, \t baz=3"], "foo=1,bar=2,baz=3"),
        (["foo=1\t \t,\t \tbar=2,\t \tbaz=3"], "foo=1,bar=2,baz=3"),
        ([" foo=1"], "foo=1"),
        (["\tfoo=1"], "foo=1"),
        (["foo=1 "], "foo=1"),
        (["\t foo=1 \t"], "foo=1"),
        (["foo=1", ""], "foo=1"),
        (["", "foo=1"], "foo=1"),
        ([",foo=1,,  ,bar=2,"], "foo=1,bar=2"),
        (["foo= leading spaces are the value's"], "foo= leading spaces are the value's"),
        ([f"{ALL_KEY_CHARS}={ALL_VALUE_CHARS}"], f"{ALL_KEY_CHARS}={ALL_VALUE_CHARS}"),
        (
            [f"{ALL_KEY_CHARS}@a-z0-9_-*/={ALL_VALUE_CHARS}"],
            f"{ALL_KEY_CHARS}@a-z0-9_-*/={ALL_VALUE_CHARS}",
        ),
        (["foo=1", "z" * 256 + "=1"], "foo=1," + "z" * 256 + "=1"),
        (
            ["foo=1", "t" * 241 + "@" + "v" * 14 + "=1"],
            "foo=1," + "t" * 241 + "@" + "v" * 14 + "=1",
        ),
        (["0tenant@vendor=1"], "0tenant@vendor=1"),
        ([",".join(f"bar{i:02}={i:02}" for i in range(1, 33))], None),  # checked below
        ([b"foo=1", "bar=2"], "foo=1,bar=2"),
    ],
)
def test_valid_tracestate_is_kept_in_order(fields: list[str | bytes], expected: str | None) -> None:
    result = parse_tracestate(fields)
    if expected is None:
        assert result is not None
        assert len(result.split(",")) == 32
    else:
        assert result == expected


@pytest.mark.parametrize(
    "fields",
    [
        [],
        [""],
        [" , \t,"],
        ["foo=1,foo=1"],
        ["foo=1,foo=2"],
        ["foo=1", "foo=1"],
        ["foo=1", "foo=2"],
        ["foo =1"],
        ["FOO=1"],
        ["foo.bar=1"],
        ["foo@=1,bar=2"],
        ["@foo=1,bar=2"],
        ["foo@@bar=1,bar=2"],
        ["foo@bar@baz=1,bar=2"],
        ["0foo=1"],
        ["foo@0bar=1"],
        ["foo=1", "z" * 257 + "=1"],
        ["foo=1", "t" * 242 + "@v=1"],
        ["foo=1", "t@" + "v" * 15 + "=1"],
        ["foo=bar=baz"],
        ["foo=,bar=3"],
        ["foo=" + "v" * 257],
        ["foo=a\tb"],
        ["foo=caf\xe9"],
        [b"foo=caf\xc3\xa9"],
        ["foo"],
        ["=1"],
        [",".join(f"bar{i:02}={i:02}" for i in range(1, 34))],
        [",".join(f"bar{i:02}={i:02}" for i in range(1, 31)), "bar31=31,bar32=32,bar33=33"],
    ],
)
def test_invalid_tracestate_is_dropped_whole(fields: list[str | bytes]) -> None:
    assert parse_tracestate(fields) is None


def test_a_single_string_is_one_field_not_a_sequence_of_characters() -> None:
    assert parse_tracestate("foo=1,bar=2") == "foo=1,bar=2"  # type: ignore[arg-type]


def test_a_long_tracestate_loses_whole_entries_long_ones_first_then_from_the_end() -> None:
    long_entry = "big=" + "x" * 200
    mid = [f"k{i}=" + "v" * 100 for i in range(5)]
    result = parse_tracestate([",".join(["first=1", long_entry, *mid])])
    assert result == ",".join(["first=1", *mid[:4]])
    assert len(result) <= MAX_TRACESTATE_LENGTH


def test_a_tracestate_of_exactly_the_limit_is_kept() -> None:
    members = [f"k{i:02}=" + "v" * 58 for i in range(8)]  # 8 x 62 + 7 commas = 503
    fitting = ",".join(members) + ",z=123456"
    assert len(fitting) == MAX_TRACESTATE_LENGTH
    assert parse_tracestate([fitting]) == fitting
    assert parse_tracestate([fitting + "7"]) == ",".join(members)


# -- incoming --------------------------------------------------------------------------------


def test_incoming_carries_the_tracestate_of_a_valid_parent() -> None:
    parent = incoming(VALID.encode(), [b"foo=1", b"bar=2"])
    assert parent == SpanContext(TRACE, PARENT, 1, "foo=1,bar=2")


def test_incoming_ignores_tracestate_when_traceparent_is_invalid_or_missing() -> None:
    assert incoming(None, ["foo=1"]) is None
    assert incoming(f"ff-{TRACE}-{PARENT}-01", ["foo=1"]) is None


def test_an_invalid_tracestate_does_not_invalidate_the_parent() -> None:
    assert incoming(VALID, ["foo=1,foo=2"]) == SpanContext(TRACE, PARENT, 1, None)
    assert incoming(VALID, []) == SpanContext(TRACE, PARENT, 1, None)


# -- child_of and ids ------------------------------------------------------------------------


def test_child_keeps_trace_flags_and_tracestate_with_a_new_span_id() -> None:
    parent = SpanContext(TRACE, PARENT, 0x01, "foo=1")
    child = child_of(parent)
    assert (child.trace_id, child.flags, child.tracestate) == (TRACE, 0x01, "foo=1")
    assert re.fullmatch("[0-9a-f]{16}", child.span_id)
    assert child.span_id != PARENT
    assert child.traceparent() == f"00-{TRACE}-{child.span_id}-01"


def test_child_clears_reserved_flags_and_keeps_random_and_sampled() -> None:
    assert child_of(SpanContext(TRACE, PARENT, 0xFF)).flags == 0x03
    assert child_of(SpanContext(TRACE, PARENT, 0xFC)).flags == 0x00


@pytest.mark.parametrize(("sampled", "flags"), [(True, 0x03), (False, 0x02)])
def test_a_new_trace_is_random_and_sampled_as_asked(sampled: bool, flags: int) -> None:
    root = child_of(None, sampled=sampled)
    assert root.flags == flags
    assert root.tracestate is None
    assert parse_traceparent(root.traceparent()) == root


def test_ids_are_unique_and_unaffected_by_the_application_seeding_random() -> None:
    random.seed(1234)
    first = [new_span_id() for _ in range(3)]
    random.seed(1234)
    assert [new_span_id() for _ in range(3)] != first
    span_ids = {new_span_id() for _ in range(100_000)}
    assert len(span_ids) == 100_000
    trace_ids = {new_trace_id() for _ in range(10_000)}
    assert len(trace_ids) == 10_000


FORK_SCRIPT = """
import os
from mesh_middleware.telemetry.tracecontext import new_span_id, new_trace_id
read_end, write_end = os.pipe()
pid = os.fork()
if pid == 0:
    os.write(write_end, (new_span_id() + new_trace_id()).encode())
    os._exit(0)
os.close(write_end)
ours = new_span_id() + new_trace_id()
os.waitpid(pid, 0)
theirs = os.read(read_end, 100).decode()
assert len(theirs) == 48 and theirs != ours, (ours, theirs)
"""


def test_ids_never_repeat_across_a_fork() -> None:
    # In a fresh interpreter: forking this multi-threaded test process is unsafe.
    subprocess.run([sys.executable, "-c", FORK_SCRIPT], check=True, timeout=60)


# -- properties ------------------------------------------------------------------------------

trace_ids = st.text(HEXLC, min_size=32, max_size=32).filter(lambda s: s != "0" * 32)
span_ids = st.text(HEXLC, min_size=16, max_size=16).filter(lambda s: s != "0" * 16)
flag_bytes = st.integers(0, 255)
ows = st.text(" \t", max_size=3)


@given(st.one_of(st.text(), st.binary()))
def test_parse_traceparent_never_raises_and_returns_only_valid_ids(value: str | bytes) -> None:
    parsed = parse_traceparent(value)
    if parsed is not None:
        assert re.fullmatch("[0-9a-f]{32}", parsed.trace_id) and parsed.trace_id != "0" * 32
        assert re.fullmatch("[0-9a-f]{16}", parsed.span_id) and parsed.span_id != "0" * 16
        assert 0 <= parsed.flags <= 255


@given(trace_ids, span_ids, flag_bytes, ows, ows)
def test_version_00_round_trips(trace: str, span: str, flags: int, before: str, after: str) -> None:
    header = f"00-{trace}-{span}-{flags:02x}"
    parsed = parse_traceparent(before + header + after)
    assert parsed == SpanContext(trace, span, flags)
    assert parsed.traceparent() == header
    assert parse_traceparent(header.encode()) == parsed


@given(trace_ids, span_ids, flag_bytes, st.integers(0, 55), st.characters())
def test_changing_any_character_of_a_valid_header_to_a_non_hex_one_invalidates_it(
    trace: str, span: str, flags: int, index: int, char: str
) -> None:
    header = f"00-{trace}-{span}-{flags:02x}"
    assume(index < len(header) and header[index] != "-" and char not in HEXLC)
    assert parse_traceparent(header[:index] + char + header[index + 1 :]) is None


@given(trace_ids, span_ids, flag_bytes, st.integers(1, 254), st.one_of(st.just(""), st.text()))
def test_higher_versions_are_read_by_prefix(
    trace: str, span: str, flags: int, version: int, rest: str
) -> None:
    header = f"{version:02x}-{trace}-{span}-{flags:02x}"
    parsed = parse_traceparent(header + ("-" + rest if rest else ""))
    assert parsed == SpanContext(trace, span, flags & 0x03)


@given(trace_ids, span_ids, flag_bytes, st.integers(1, 254), st.characters())
def test_higher_versions_need_a_dash_after_the_flags(
    trace: str, span: str, flags: int, version: int, char: str
) -> None:
    assume(char not in "- \t")
    header = f"{version:02x}-{trace}-{span}-{flags:02x}{char}"
    assert parse_traceparent(header) is None


keys = st.one_of(
    st.from_regex(r"[a-z][a-z0-9_\-*/]{0,20}", fullmatch=True),
    st.from_regex(r"[a-z0-9][a-z0-9_\-*/]{0,10}@[a-z][a-z0-9_\-*/]{0,13}", fullmatch=True),
)
values = st.from_regex(
    r"[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,20}[\x21-\x2b\x2d-\x3c\x3e-\x7e]", fullmatch=True
)
members = st.lists(st.tuples(keys, values), max_size=32, unique_by=lambda kv: kv[0])


@given(members, st.data())
def test_valid_tracestate_round_trips_whatever_the_whitespace_and_field_split(
    pairs: list[tuple[str, str]], data: st.DataObject
) -> None:
    texts = [f"{k}={v}" for k, v in pairs]
    wrapped = [data.draw(ows) + text + data.draw(ows) for text in texts]
    cuts = sorted(data.draw(st.sets(st.integers(0, len(wrapped)), max_size=3)))
    fields = [
        ",".join(wrapped[a:b]) for a, b in zip([0, *cuts], [*cuts, len(wrapped)], strict=True)
    ]
    expected = ",".join(texts)
    assume(len(expected) <= MAX_TRACESTATE_LENGTH)
    assert parse_tracestate(fields) == (expected or None)


@given(members.filter(lambda m: len(m) >= 1), st.sampled_from(["dup", "bad key", "bad value"]))
def test_one_bad_member_drops_the_whole_tracestate(
    pairs: list[tuple[str, str]], fault: str
) -> None:
    texts = [f"{k}={v}" for k, v in pairs]
    if fault == "dup":
        texts.append(texts[0])
    elif fault == "bad key":
        texts.append("Bad=1")
    else:
        texts.append("ok9=a=b")
    assert parse_tracestate([",".join(texts)]) is None


@given(st.lists(st.one_of(st.text(), st.binary()), max_size=4))
def test_parse_tracestate_never_raises_and_returns_only_spec_valid_headers(
    fields: list[str | bytes],
) -> None:
    result = parse_tracestate(fields)
    if result is None:
        return
    assert len(result) <= MAX_TRACESTATE_LENGTH
    parts = result.split(",")
    assert 1 <= len(parts) <= 32
    seen = set()
    for part in parts:
        key, eq, value = part.partition("=")
        assert eq and is_spec_key(key) and is_spec_value(value)
        assert key not in seen
        seen.add(key)
    assert parse_tracestate([result]) == result


# -- server_span: the one-step child the inbound side makes for every logged request ----------

headers = st.one_of(
    st.builds(
        lambda version, trace, span, flags, before, after, tail: (
            f"{before}{version}-{trace}-{span}-{flags:02x}{tail}{after}"
        ),
        st.sampled_from(["00", "01", "cc", "ff", "0A"]),
        trace_ids | st.just("0" * 32),
        span_ids | st.just("0" * 16),
        flag_bytes,
        ows,
        ows,
        st.sampled_from(["", "-", "-what-the-future-holds", "x"]),
    ),
    st.text(max_size=70),
    st.binary(max_size=70),
)
tracestates = st.lists(
    st.one_of(st.text(max_size=40), st.sampled_from(["foo=1", "bar=2,baz=3", "x=1,x=2", " "])),
    max_size=3,
)


@given(headers, tracestates, st.booleans())
def test_server_span_is_the_child_of_the_incoming_parent(
    traceparent: str | bytes, tracestate: list[str], as_bytes: bool
) -> None:
    sent = traceparent.encode("utf-8") if as_bytes and isinstance(traceparent, str) else traceparent
    made = server_span(sent, tracestate)
    parent = incoming(sent, tracestate)
    if parent is None:
        assert made is None
        return
    expected = child_of(parent)
    assert made is not None
    assert (made.trace_id, made.flags, made.tracestate) == (
        expected.trace_id,
        expected.flags,
        expected.tracestate,
    )
    assert re.fullmatch("[0-9a-f]{16}", made.span_id) and made.span_id != "0" * 16
    assert made.span_id != parent.span_id


def test_server_span_keeps_the_trace_and_tracestate_with_a_new_span_id() -> None:
    made = server_span(VALID.encode(), [b"foo=1", "bar=2"])
    assert made is not None
    assert made == SpanContext(TRACE, made.span_id, 0x01, "foo=1,bar=2")
    assert made.span_id != PARENT
    assert server_span(VALID).span_id != server_span(VALID).span_id  # type: ignore[union-attr]
    assert server_span(None) is None
    assert server_span(b"") is None
    assert server_span(f"00-{TRACE}-{'0' * 16}-01") is None
