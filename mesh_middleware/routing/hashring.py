"""Consistent hashing on a request header or cookie: a Ketama-style ring.

Each instance owns ``VNODES`` points on a 64-bit ring, derived from its id alone (BLAKE2b), and
a key goes to the owner of the first point at or after the key's hash. Because an instance's
points do not depend on who else is on the ring, a join takes only the keys that now land on the
newcomer's points (about 1/N of them) and a leave moves only the leaver's keys.

Rings are built per set of instance ids and kept in a small cache. A candidate list that is a
subset of a cached ring's instances (some ejected, or already tried by this call) reuses that
ring and skips the points of absent instances; that gives exactly the answer a ring built on the
subset would, so the choice depends only on the key and the set of ids, never on the cache.
"""

from __future__ import annotations

import random
import struct
import threading
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from hashlib import blake2b

from mesh_middleware.discovery.endpoints import Endpoint

__all__ = ["VNODES", "HashRing", "RingHashBalancer", "cookie_value", "key_hash"]

VNODES = 160
"""Points per instance (Ketama's count): shares stay within a few percent of 1/N."""

_POINTS_PER_DIGEST = 8  # a 64-byte BLAKE2b digest holds eight 64-bit points
_UNPACK = struct.Struct(f"<{_POINTS_PER_DIGEST}Q").unpack
_MAX_RINGS = 8
_MAX_VIEWS = 64


def key_hash(key: str) -> int:
    """The 64-bit ring position of a request key (stable across processes and versions)."""
    return int.from_bytes(blake2b(key.encode(), digest_size=8).digest(), "little")


def cookie_value(cookie_header: str, name: str) -> str | None:
    """The value of cookie ``name`` in a ``Cookie`` header (``a=1; user=bob``), or ``None``."""
    for pair in cookie_header.split(";"):
        key, sep, value = pair.partition("=")
        if sep and key.strip() == name:
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            return value
    return None


class HashRing:
    """The points of a set of instance ids, sorted; ``owners[i]`` indexes ``ids``."""

    __slots__ = ("id_set", "ids", "owners", "points")

    def __init__(self, ids: set[str]) -> None:
        self.ids: tuple[str, ...] = tuple(sorted(ids))
        self.id_set = frozenset(ids)
        pairs: list[tuple[int, int]] = []
        for owner, name in enumerate(self.ids):
            seed = name.encode() + b"#"
            for digest in range(VNODES // _POINTS_PER_DIGEST):
                raw = blake2b(seed + str(digest).encode(), digest_size=64).digest()
                pairs.extend((point, owner) for point in _UNPACK(raw))
        # Equal points (vanishingly rare) tie-break on the id's sort order, the same on any ring.
        pairs.sort()
        self.points: list[int] = [point for point, _ in pairs]
        self.owners: list[int] = [owner for _, owner in pairs]


class _View:
    """A ring seen through one candidate list: ring owner index -> candidate, or ``None``."""

    __slots__ = ("ring", "slots")

    def __init__(self, ring: HashRing, candidates: Sequence[Endpoint]) -> None:
        index = {name: i for i, name in enumerate(ring.ids)}
        slots: list[Endpoint | None] = [None] * len(ring.ids)
        for endpoint in candidates:
            slots[index[endpoint.id]] = endpoint
        self.ring = ring
        self.slots = slots


class RingHashBalancer:
    """Consistent hashing on a header or a cookie; a request without the key goes anywhere."""

    __slots__ = (
        "_cookie",
        "_header",
        "_last",
        "_lock",
        "_random",
        "_rings",
        "_views",
    )
    needs_key = True

    def __init__(
        self,
        *,
        header: str | None = None,
        cookie: str | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if (header is None) == (cookie is None):
            raise ValueError("give exactly one of header or cookie")
        self._header = header.lower() if header is not None else None
        self._cookie = cookie
        self._random = (rng or random.Random()).random
        self._lock = threading.Lock()
        self._rings: list[HashRing] = []
        self._views: dict[tuple[Endpoint, ...], _View] = {}
        # The last candidate tuple and its view: the engine often passes the same tuple object.
        self._last: tuple[Sequence[Endpoint], _View] | None = None

    def key_of(self, headers: Mapping[str, str]) -> str | None:
        """The header's value, or the cookie's value from the ``Cookie`` header; ``None`` if
        absent or empty. Header names are looked up lower-case (pass a case-insensitive
        mapping, such as ``httpx.Headers``, or lower-case keys)."""
        if self._header is not None:
            value = headers.get(self._header)
        else:
            cookies = headers.get("cookie")
            value = cookie_value(cookies, self._cookie) if cookies and self._cookie else None
        return value or None

    def pick(self, candidates: Sequence[Endpoint], key: str | None) -> Endpoint:
        """The owner of ``key`` among ``candidates``; a random candidate when ``key`` is None."""
        if key is None or len(candidates) == 1:
            return candidates[int(self._random() * len(candidates))]
        view = self._view(candidates)
        points = view.ring.points
        owners = view.ring.owners
        slots = view.slots
        n = len(points)
        i = bisect_right(points, key_hash(key))
        for _ in range(n):
            if i == n:
                i = 0
            endpoint = slots[owners[i]]
            if endpoint is not None:
                return endpoint
            i += 1
        raise AssertionError("a candidate is missing from its ring")  # pragma: no cover

    def _view(self, candidates: Sequence[Endpoint]) -> _View:
        last = self._last
        # Only an immutable tuple may be recognised by identity: a list could have changed.
        if last is not None and last[0] is candidates and type(candidates) is tuple:
            return last[1]
        key = tuple(candidates)
        view = self._views.get(key)
        if view is None:
            view = self._new_view(key)
        self._last = (key, view)
        return view

    def _new_view(self, key: tuple[Endpoint, ...]) -> _View:
        ids = {endpoint.id for endpoint in key}
        with self._lock:
            view = self._views.get(key)
            if view is not None:
                return view
            # A much larger ring (a version subset of a big service) would mean long walks.
            fitting = [r for r in self._rings if ids <= r.id_set and 2 * len(ids) >= len(r.ids)]
            if fitting:
                ring = min(fitting, key=lambda r: len(r.ids))
            else:
                ring = HashRing(ids)
                self._rings.append(ring)
                if len(self._rings) > _MAX_RINGS:
                    del self._rings[0]
            view = _View(ring, key)
            if len(self._views) >= _MAX_VIEWS:
                del self._views[next(iter(self._views))]
            self._views[key] = view
            return view
