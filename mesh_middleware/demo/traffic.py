"""Bounded traffic at the shop's gateway: a fixed rate, a fixed mix, a cap on requests in flight.

The mix (per 20 requests, interleaved evenly): 12 item reads, 3 orders, 3 orders with
``x-chaos: on`` (payments injects faults into those), and 2 ``reserve-direct`` calls (the
gateway asks inventory for something its policy forbids). Each request has a timeout; a
request that would go past the in-flight cap is skipped and counted, never queued. The
generator stops by itself after its duration.
"""

from __future__ import annotations

import copy
import enum
import threading
import time
from collections import Counter, deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx

__all__ = [
    "MIX",
    "Kind",
    "KindTally",
    "TrafficGenerator",
    "TrafficTally",
    "interleave",
]

REQUESTS_PER_SECOND = 30.0
CONCURRENCY = 16
REQUEST_TIMEOUT_SECONDS = 10.0
ITEMS = (1, 2, 3, 4, 5)
_BODY_SAMPLE = 300
_RECENT = 2000  # item reads remembered with their time: over a minute at the usual rate


class Kind(enum.StrEnum):
    """What a request of the mix asks the gateway for."""

    ITEM = "item read"
    ORDER = "order"
    CHAOS_ORDER = "order x-chaos"
    RESERVE = "reserve-direct"

    @property
    def customer(self) -> bool:
        """Whether it is customer traffic (the reserve-direct calls are the deliberate denials)."""
        return self is not Kind.RESERVE


MIX: tuple[tuple[Kind, int], ...] = (
    (Kind.ITEM, 12),
    (Kind.ORDER, 3),
    (Kind.CHAOS_ORDER, 3),
    (Kind.RESERVE, 2),
)
"""Weights of each kind: 60% reads, 30% orders (half with chaos), 10% reserve-direct."""


def interleave(mix: Sequence[tuple[Kind, int]]) -> list[Kind]:
    """One round of the mix, spread evenly (smooth weighted round robin, as nginx balances)."""
    total = sum(weight for _, weight in mix)
    current = dict.fromkeys((kind for kind, _ in mix), 0)
    weights = dict(mix)
    deck: list[Kind] = []
    for _ in range(total):
        for kind in current:
            current[kind] += weights[kind]
        chosen = max(current, key=lambda k: current[k])
        current[chosen] -= total
        deck.append(chosen)
    return deck


@dataclass(slots=True)
class KindTally:
    """The answers to one kind of request."""

    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)  # first body per status or error

    @property
    def answered(self) -> int:
        return sum(self.statuses.values())

    @property
    def sent(self) -> int:
        return self.answered + sum(self.errors.values())

    @property
    def succeeded(self) -> int:
        return sum(n for status, n in self.statuses.items() if 200 <= status < 300)


@dataclass(slots=True)
class TrafficTally:
    """Everything the generator saw, by kind; plus what the answers' bodies said."""

    kinds: dict[Kind, KindTally] = field(default_factory=lambda: {k: KindTally() for k in Kind})
    versions: Counter[str] = field(default_factory=Counter)  # inventory.version of item reads
    recent: deque[tuple[float, str]] = field(default_factory=lambda: deque(maxlen=_RECENT))
    denials: Counter[tuple[str, str]] = field(default_factory=Counter)  # (by, rule) of 403s
    denial_reasons: dict[tuple[str, str], str] = field(default_factory=dict)
    skipped: int = 0  # not sent: the in-flight cap was reached
    elapsed: float = 0.0

    @property
    def sent(self) -> int:
        return sum(tally.sent for tally in self.kinds.values())

    def customer(self) -> tuple[int, int]:
        """(succeeded, sent) over item reads and orders."""
        kinds = [tally for kind, tally in self.kinds.items() if kind.customer]
        return sum(t.succeeded for t in kinds), sum(t.sent for t in kinds)

    def v2_share(self) -> float | None:
        """The share of item reads inventory v2 answered (None before any answer)."""
        total = sum(self.versions.values())
        return self.versions.get("v2", 0) / total if total else None

    def recent_v2_share(self, seconds: float, now: float | None = None) -> float | None:
        """The v2 share of the item reads answered in the last ``seconds`` (a policy edit
        shows here long before it moves the share since the start)."""
        since = (time.monotonic() if now is None else now) - seconds
        versions = [version for at, version in self.recent if at >= since]
        return versions.count("v2") / len(versions) if versions else None

    def record(self, kind: Kind, status: int, body: Any, text: str) -> None:
        tally = self.kinds[kind]
        tally.statuses[status] += 1
        tally.examples.setdefault(str(status), text[:_BODY_SAMPLE])
        if not isinstance(body, dict):
            return
        if kind is Kind.ITEM and status == 200:
            inventory = body.get("inventory")
            version = inventory.get("version") if isinstance(inventory, dict) else None
            self.versions[str(version) if version else "?"] += 1
            self.recent.append((time.monotonic(), str(version)))
        elif status == 403:
            key = (str(body.get("by", "?")), str(body.get("rule") or "-"))
            self.denials[key] += 1
            self.denial_reasons.setdefault(key, str(body.get("reason", ""))[:_BODY_SAMPLE])

    def record_error(self, kind: Kind, error: str, detail: str) -> None:
        tally = self.kinds[kind]
        tally.errors[error] += 1
        tally.examples.setdefault(error, detail[:_BODY_SAMPLE])


class TrafficGenerator:
    """Sends the mix to the gateway from a background thread, until its duration is over."""

    def __init__(
        self,
        gateway_url: str,
        *,
        rate: float = REQUESTS_PER_SECOND,
        concurrency: int = CONCURRENCY,
        timeout: float = REQUEST_TIMEOUT_SECONDS,
        mix: Sequence[tuple[Kind, int]] = MIX,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        """Prepare; :meth:`start` sends. ``transport`` replaces the network (for tests)."""
        if rate <= 0 or concurrency < 1:
            raise ValueError("rate must be above 0 and concurrency at least 1")
        self.gateway_url = gateway_url.rstrip("/")
        self.rate = rate
        self.concurrency = concurrency
        self.timeout = timeout
        self._deck = interleave(mix)
        self._tally = TrafficTally()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._slots = threading.BoundedSemaphore(concurrency)
        self._thread: threading.Thread | None = None
        self._client = httpx.Client(
            timeout=timeout,
            trust_env=False,
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
            transport=transport,
        )

    def start(self, duration: float) -> None:
        """Send for ``duration`` seconds (from a background thread)."""
        self._thread = threading.Thread(
            target=self._run, args=(duration,), name="mesh-demo-traffic", daemon=True
        )
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the end; whether it has ended."""
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.running

    def stop(self) -> None:
        """Stop sending, let the requests in flight end (each within its timeout), close."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.timeout + 5.0)
        self._client.close()

    def snapshot(self) -> TrafficTally:
        """A copy of the tally so far."""
        with self._lock:
            return copy.deepcopy(self._tally)

    def _run(self, duration: float) -> None:
        started = time.monotonic()
        next_at = started
        counts: Counter[Kind] = Counter()
        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="mesh-demo-send") as pool:
            index = 0
            while not self._stop.is_set():
                now = time.monotonic()
                with self._lock:
                    self._tally.elapsed = now - started
                if now - started >= duration:
                    break
                if now < next_at:
                    self._stop.wait(min(next_at - now, 0.5))
                    continue
                # A stall (a busy machine) is not made up for with a burst of more than 1 s.
                next_at = max(next_at + 1.0 / self.rate, now - 1.0)
                kind = self._deck[index % len(self._deck)]
                index += 1
                item = ITEMS[counts[kind] % len(ITEMS)]
                counts[kind] += 1
                if not self._slots.acquire(blocking=False):
                    with self._lock:
                        self._tally.skipped += 1
                    continue
                pool.submit(self._send, kind, item)
        with self._lock:
            self._tally.elapsed = min(time.monotonic() - started, max(duration, 0.0))

    def _send(self, kind: Kind, item: int) -> None:
        try:
            method, path, headers = _request(kind, item)
            body = {"item": item, "quantity": 1} if method == "POST" else None
            try:
                response = self._client.request(
                    method, self.gateway_url + path, json=body, headers=headers
                )
            except httpx.HTTPError as exc:
                with self._lock:
                    self._tally.record_error(kind, type(exc).__name__, str(exc))
                return
            except RuntimeError as exc:  # the client was closed under a late request
                with self._lock:
                    self._tally.record_error(kind, type(exc).__name__, str(exc))
                return
            try:
                document: Any = response.json()
            except ValueError:
                document = None
            with self._lock:
                self._tally.record(kind, response.status_code, document, response.text)
        finally:
            self._slots.release()


def _request(kind: Kind, item: int) -> tuple[str, str, dict[str, str]]:
    if kind is Kind.ITEM:
        return "GET", f"/shop/items/{item}", {}
    if kind is Kind.ORDER:
        return "POST", "/shop/orders", {}
    if kind is Kind.CHAOS_ORDER:
        return "POST", "/shop/orders", {"x-chaos": "on"}
    return "POST", "/shop/reserve-direct", {}
