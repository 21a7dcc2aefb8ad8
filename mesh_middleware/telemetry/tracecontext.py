"""W3C Trace Context: the ``traceparent`` and ``tracestate`` headers, parsed and formatted.

Follows the W3C Recommendation (Trace Context Level 1) and Level 2's ``random`` trace flag:

- ``traceparent`` version ``00`` must be exactly ``00-<32 hex>-<16 hex>-<2 hex>`` in lower-case
  hex; a higher version (not ``ff``, which is invalid) is read by its ``00`` prefix, which must
  be followed by the end of the value or by ``-``. All-zero trace and parent ids are invalid.
  Spaces and tabs around the value are optional whitespace.
- ``tracestate`` fields are combined in order (RFC 9110 field order), empty list-members are
  skipped, and the whole header is dropped when any member is malformed, a key repeats, or
  there are more than 32 members: the spec lets a vendor discard a header it cannot parse, and
  the W3C test suite requires it. What is kept is capped at ``MAX_TRACESTATE_LENGTH`` characters
  by dropping whole entries as the spec says: those over 128 characters first, then from the
  end.
- ``tracestate`` is read only together with a valid ``traceparent``.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Sequence
from typing import NamedTuple

__all__ = [
    "FLAG_RANDOM",
    "FLAG_SAMPLED",
    "MAX_TRACESTATE_LENGTH",
    "MAX_TRACESTATE_MEMBERS",
    "SpanContext",
    "child_of",
    "incoming",
    "new_span_id",
    "new_trace_id",
    "parse_traceparent",
    "parse_tracestate",
    "server_span",
]

FLAG_SAMPLED = 0x01
"""The caller may have recorded trace data (Level 1)."""
FLAG_RANDOM = 0x02
"""At least the right-most 7 bytes of the trace id are random (Level 2)."""
_KNOWN_FLAGS = FLAG_SAMPLED | FLAG_RANDOM

MAX_TRACESTATE_MEMBERS = 32
MAX_TRACESTATE_LENGTH = 512
"""The longest ``tracestate`` passed on; the spec asks vendors to pass at least 512."""
_TRUNCATE_FIRST_OVER = 128

_OWS = " \t"
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
_V00 = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
_FUTURE = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}(?:-.*)?", re.DOTALL)

_HEX_BYTE = {f"{byte:02x}": byte for byte in range(256)}

_KEYCHARS = r"[a-z0-9_\-*/]"
_KEY = rf"[a-z]{_KEYCHARS}{{0,255}}|[a-z0-9]{_KEYCHARS}{{0,240}}@[a-z]{_KEYCHARS}{{0,13}}"
_VALUE = r"[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]"
_MEMBER = re.compile(rf"({_KEY})=(?:{_VALUE})")


class SpanContext(NamedTuple):
    """One span's place in a trace: what ``traceparent`` and ``tracestate`` carry.

    ``trace_id`` is 32 and ``span_id`` 16 lower-case hex digits, neither all zeros; ``flags``
    is the 8-bit trace-flags field; ``tracestate`` is a normalised, valid header value or
    ``None``. Build one with :func:`parse_traceparent`, :func:`incoming` or :func:`child_of`,
    which guarantee those rules; the constructor does not check them. Immutable (a named
    tuple: one is made for nearly every request, and a tuple is the cheapest object to make).
    """

    trace_id: str
    span_id: str
    flags: int
    tracestate: str | None = None

    @property
    def sampled(self) -> bool:
        """Whether the ``sampled`` flag is set."""
        return bool(self.flags & FLAG_SAMPLED)

    @property
    def random(self) -> bool:
        """Whether the Level 2 ``random`` flag is set."""
        return bool(self.flags & FLAG_RANDOM)

    def traceparent(self) -> str:
        """The ``traceparent`` header value (version ``00``) naming this span as the parent."""
        return f"00-{self.trace_id}-{self.span_id}-{self.flags:02x}"


_new_tuple = tuple.__new__


def _make(trace_id: str, span_id: str, flags: int, tracestate: str | None) -> SpanContext:
    return _new_tuple(SpanContext, (trace_id, span_id, flags, tracestate))


def parse_traceparent(value: str | bytes | None) -> SpanContext | None:
    """The span a ``traceparent`` header names; ``None`` if absent or invalid.

    A request that carried more than one ``traceparent`` field should pass them joined with
    ``,`` (RFC 9110's combined value), which is invalid, so the trace restarts as the spec asks.
    For a version above ``00`` only the known flags (sampled, random) are kept.
    """
    if value is None:
        return None
    text = (value.decode("latin-1") if isinstance(value, bytes) else value).strip(_OWS)
    if _V00.fullmatch(text) is not None:
        flags = _HEX_BYTE[text[53:55]]
    elif not text.startswith(("00", "ff")) and _FUTURE.fullmatch(text) is not None:
        flags = _HEX_BYTE[text[53:55]] & _KNOWN_FLAGS
    else:
        return None
    trace_id = text[3:35]
    span_id = text[36:52]
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    return _make(trace_id, span_id, flags, None)


def parse_tracestate(values: Sequence[str | bytes]) -> str | None:
    """The ``tracestate`` to pass on, from every field of the header in order.

    Returns the list-members joined by ``,`` without optional whitespace, or ``None`` when
    there are none or the header is invalid (see the module docstring for the rules).
    """
    if isinstance(values, str | bytes):
        values = (values,)
    members: list[str] = []
    keys: set[str] = set()
    for value in values:
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        for raw in text.split(","):
            member = raw.strip(_OWS)
            if not member:
                continue
            found = _MEMBER.fullmatch(member)
            if found is None:
                return None
            key = found.group(1)
            if key in keys or len(keys) == MAX_TRACESTATE_MEMBERS:
                return None
            keys.add(key)
            members.append(member)
    if not members:
        return None
    joined = ",".join(members)
    if len(joined) > MAX_TRACESTATE_LENGTH:
        joined = _truncate(members)
    return joined or None


def _truncate(members: list[str]) -> str:
    """Drop whole entries until the header fits: long ones first, then from the end."""
    length = sum(map(len, members)) + len(members) - 1
    for index in range(len(members) - 1, -1, -1):
        if length <= MAX_TRACESTATE_LENGTH:
            break
        if len(members[index]) > _TRUNCATE_FIRST_OVER:
            length -= len(members.pop(index)) + 1
    while members and length > MAX_TRACESTATE_LENGTH:
        length -= len(members.pop()) + 1
    return ",".join(members)


def incoming(
    traceparent: str | bytes | None, tracestate: Sequence[str | bytes] = ()
) -> SpanContext | None:
    """The parent of an inbound request, with its ``tracestate``; ``None`` starts a new trace.

    ``tracestate`` is every ``tracestate`` field the request carried, in order. It is not
    looked at unless ``traceparent`` is valid, and an invalid one never invalidates the parent.
    """
    parent = parse_traceparent(traceparent)
    if parent is None or not tracestate:
        return parent
    state = parse_tracestate(tracestate)
    if state is None:
        return parent
    return _make(parent.trace_id, parent.span_id, parent.flags, state)


# A private generator: an application calling random.seed() must not make ids repeat, and it is
# reseeded in forked children, which would otherwise all draw the same ids.
_rng = random.Random()
os.register_at_fork(after_in_child=_rng.seed)
_getrandbits = _rng.getrandbits


def new_trace_id() -> str:
    """A random trace id: 32 lower-case hex digits, never all zeros."""
    while True:
        bits = _getrandbits(128)
        if bits:
            return bits.to_bytes(16).hex()


def new_span_id() -> str:
    """A random span id: 16 lower-case hex digits, never all zeros."""
    while True:
        bits = _getrandbits(64)
        if bits:
            return bits.to_bytes(8).hex()  # a format spec costs twice as much, per request


def child_of(parent: SpanContext | None, *, sampled: bool = True) -> SpanContext:
    """A new span under ``parent``, or the root of a new trace when there is none.

    A child keeps the parent's trace id, ``tracestate`` and known flags (reserved flag bits
    are cleared, as the spec requires of senders); ``sampled`` applies to a new trace only,
    which also gets the ``random`` flag since its id is drawn at random.
    """
    if parent is None:
        flags = FLAG_RANDOM | FLAG_SAMPLED if sampled else FLAG_RANDOM
        return _make(new_trace_id(), new_span_id(), flags, None)
    return _make(parent.trace_id, new_span_id(), parent.flags & _KNOWN_FLAGS, parent.tracestate)


def server_span(
    traceparent: str | bytes | None, tracestate: Sequence[str | bytes] = ()
) -> SpanContext | None:
    """A new span under the one an inbound request's headers name; ``None`` when they name none.

    The same as ``child_of(incoming(traceparent, tracestate))`` for a valid ``traceparent``,
    in one step for the usual version-00 value: it runs for every request that logs a line or
    calls out.
    """
    if traceparent is None:
        return None
    text = traceparent.decode("latin-1") if isinstance(traceparent, bytes) else traceparent
    if _V00.fullmatch(text) is None:  # whitespace around it, or a later version
        parent = incoming(text, tracestate)
        return child_of(parent) if parent is not None else None
    trace_id = text[3:35]
    if trace_id == _ZERO_TRACE or text[36:52] == _ZERO_SPAN:
        return None
    while True:
        bits = _getrandbits(64)
        if bits:
            break
    return _new_tuple(
        SpanContext,
        (
            trace_id,
            bits.to_bytes(8).hex(),
            _HEX_BYTE[text[53:55]] & _KNOWN_FLAGS,
            parse_tracestate(tracestate) if tracestate else None,
        ),
    )
