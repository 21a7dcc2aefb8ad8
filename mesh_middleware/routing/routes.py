"""Route tables, weighted splits and mirroring: which version subset an outbound call goes to.

A destination's ``routes`` (DESIGN §2) are compiled once, at policy load, into a
:class:`RouteTable`; :meth:`RouteTable.select` then does matcher look-ups and one random draw,
and returns a :class:`RouteChoice` built at load time, so selecting allocates nothing beyond
the normalized path (and nothing at all for a destination without routes).
"""

from __future__ import annotations

import random
from bisect import bisect_right
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate

from mesh_middleware.errors import PathError
from mesh_middleware.policy import schema
from mesh_middleware.policy.conditions import HeaderMatcher
from mesh_middleware.policy.paths import normalize_path
from mesh_middleware.policy.patterns import StringMatcher

__all__ = ["DEFAULT_CHOICE", "MirrorRule", "RouteChoice", "RouteTable", "route_label"]


@dataclass(frozen=True, slots=True)
class RouteChoice:
    """The outcome of routing one call.

    ``route`` is the route's ``name``, else ``route[i]`` (its index in the file), else
    ``"default"`` when no route applies; it is the ``route`` metric label. ``version`` is the
    version subset to call, ``None`` for every instance. ``retry_non_idempotent`` is the route's
    opt-in to retrying methods that are not idempotent. ``mirror`` is the route's own mirror
    (it replaces the destination's for the calls the route takes), ``None`` when it has none.
    """

    route: str
    version: str | None
    retry_non_idempotent: bool
    mirror: MirrorRule | None = None


DEFAULT_CHOICE = RouteChoice("default", None, False)
"""The choice when a destination has no routes or none matches: every instance."""


def route_label(route: schema.Route, index: int) -> str:
    """The name a route is known by in metrics and errors: its ``name``, else ``route[i]``."""
    return route.name if route.name is not None else f"route[{index}]"


class _CompiledRoute:
    """One route: its match conditions and its split, with the choices built ahead."""

    __slots__ = ("choices", "cumulative", "headers", "last", "methods", "paths", "single", "total")

    def __init__(self, route: schema.Route, index: int) -> None:
        label = route_label(route, index)
        match = route.match
        self.paths = StringMatcher(match.paths) if match.paths else None
        self.methods = StringMatcher(match.methods) if match.methods else None
        self.headers = tuple(HeaderMatcher(n, c) for n, c in match.headers.items())
        # Weight-0 destinations are dropped here, so no draw can ever land on them.
        weighted = [d for d in route.to if d.weight > 0]
        if not weighted:
            raise ValueError(
                f"route {label!r}: every destination in 'to' has weight 0, so no call could "
                "be routed; give at least one destination a weight above 0"
            )
        mirror = MirrorRule(route.mirror) if route.mirror is not None else None
        self.choices = tuple(
            RouteChoice(label, d.version, route.retry_non_idempotent, mirror) for d in weighted
        )
        self.cumulative = tuple(accumulate(d.weight for d in weighted))
        self.total = self.cumulative[-1]
        self.last = len(self.choices) - 1
        self.single = self.choices[0] if self.last == 0 else None

    def pick(self, rand: Callable[[], float]) -> RouteChoice:
        if self.single is not None:
            return self.single
        # The bounds cap a rand() of 1.0, which random.random never returns but a stub may.
        return self.choices[bisect_right(self.cumulative, rand() * self.total, 0, self.last)]


class RouteTable:
    """A destination's compiled routes: first match wins, then a weighted pick among its ``to``.

    Matching follows DESIGN §2: ``paths`` and ``methods`` are Istio string patterns (exact,
    ``prefix*``, ``*suffix``, ``*``); ``headers`` hold as in the inbound rules (``values``,
    ``not_values`` and ``present``; a missing header fails ``values`` and holds ``not_values``).
    Header names are looked up lower-case, so ``headers`` must be a case-insensitive mapping (as
    httpx's and requests' are) or a dict with lower-case keys. The method is matched as sent;
    HTTP clients send it upper-case, as the patterns are stored.

    Weights are relative, as Istio's are once normalised: ``90`` and ``10`` split 90/10, and so
    do ``9`` and ``1``; they need not sum to 100. A destination with weight 0 is never chosen. A
    route whose weights are all 0 is rejected here with :class:`ValueError` naming it, so a table
    never depends on the policy loader having caught it.

    Unlike Istio, which answers 404 when routes exist and none matches, an unmatched call goes to
    :data:`DEFAULT_CHOICE` (every instance): a library call that silently turned into a 404
    would look like the callee's answer and be far harder to trace than a call that went through.
    """

    __slots__ = ("_routes", "header_names", "uses_headers", "uses_path")

    def __init__(self, routes: Sequence[schema.Route]) -> None:
        self._routes = tuple(_CompiledRoute(route, i) for i, route in enumerate(routes))
        self.header_names = frozenset(h.name for r in self._routes for h in r.headers)
        """The (lower-case) header names the routes read: the engine may pass a small dict of
        just these instead of a client's header mapping, whose look-ups are slower."""
        self.uses_headers = bool(self.header_names)
        """Whether any route reads request headers (if not, the engine may pass ``{}``)."""
        self.uses_path = any(r.paths is not None for r in self._routes)
        """Whether any route reads the path (if not, the engine may pass ``""``)."""

    def __len__(self) -> int:
        return len(self._routes)

    def select(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str],
        rand: Callable[[], float] = random.random,
    ) -> RouteChoice:
        """Route one call; never raises on the caller's own method, path or headers.

        ``path`` is the request target's path (a query is allowed). It is matched after
        :func:`~mesh_middleware.policy.paths.normalize_path`; a path that cannot be normalized
        (an encoded slash, a malformed escape, ...) is matched as it is, without its query,
        because refusing the call is the callee's business, not the router's.
        """
        routes = self._routes
        if not routes:
            return DEFAULT_CHOICE
        normal: str | None = None
        for route in routes:
            # Cheapest first: a set look-up, then the path (normalized once, only if a route
            # reads it), then headers, whose look-ups in client header mappings cost the most.
            if route.methods is not None and not route.methods.matches(method):
                continue
            if route.paths is not None:
                if normal is None:
                    normal = _routable_path(path)
                if not route.paths.matches(normal):
                    continue
            if route.headers and not _headers_hold(route.headers, headers):
                continue
            return route.pick(rand)
        return DEFAULT_CHOICE


def _headers_hold(matchers: tuple[HeaderMatcher, ...], headers: Mapping[str, str]) -> bool:
    for matcher in matchers:
        if not matcher.holds(headers):
            return False
    return True


def _routable_path(path: str) -> str:
    # Cutting the query first lets normalize_path take its fast path on the usual clean path.
    if "?" in path:
        path = path[: path.index("?")]
    if "#" in path:
        path = path[: path.index("#")]
    try:
        return normalize_path(path)
    except PathError:
        return path


class MirrorRule:
    """A ``mirror`` (a destination's or a route's): which subset gets a shadow copy, and of
    how many calls."""

    __slots__ = ("_fraction", "percent", "version")

    def __init__(self, mirror: schema.Mirror) -> None:
        self.version = mirror.to.version
        self.percent = float(mirror.percent)
        self._fraction = self.percent / 100.0

    def chosen(self, rand: Callable[[], float] = random.random) -> bool:
        """Whether this call is mirrored: ``percent`` of calls, exactly in expectation.

        ``rand`` draws uniformly from [0, 1), so ``rand() < percent / 100`` holds with
        probability ``percent / 100``; 0 never draws and never mirrors, 100 always mirrors.
        """
        fraction = self._fraction
        if fraction <= 0.0:
            return False
        return fraction >= 1.0 or rand() < fraction
