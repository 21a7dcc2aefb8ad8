"""A small etcd v3 client over its JSON gateway (``/v3/...``), with endpoint failover.

httpx and JSON only: no gRPC or protobuf dependency. Every call has a short timeout; a
connection error, a timeout or a 5xx moves on to the next endpoint, each endpoint at most once
per call, and the endpoint that answered is used first from then on. Watches are streams that
resume from the last revision they saw, on whichever endpoint answers.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import structlog

__all__ = [
    "Compacted",
    "EtcdClient",
    "EtcdError",
    "EtcdUnavailable",
    "KeyValue",
    "WatchEvent",
    "prefix_end",
]

log = structlog.get_logger("mesh.registry")

# A call gets CALL_BUDGET seconds over all endpoints, each attempt at most ATTEMPT_TIMEOUT: a
# member that accepts connections and never answers costs one attempt, and the whole call
# stays under the mesh clients' 2 s registry timeout, so that they can still try another
# replica. An etcd leader election (1-2 s) can outlast a call: it fails (503), and is retried.
CALL_BUDGET = 1.5
ATTEMPT_TIMEOUT = 1.0
CONNECT_TIMEOUT = 0.25
# A quiet watch is re-established this often (from its last revision, so nothing is missed):
# the gateway's stream has no heartbeat, and this bounds how long a dead peer goes unnoticed.
WATCH_IDLE_SECONDS = 15.0
_MAX_ANSWER_BYTES = 64 * 1024 * 1024


class EtcdError(OSError):
    """etcd refused a call, or answered something that is not etcd's."""


class EtcdUnavailable(EtcdError):
    """No endpoint answered in time."""


class Compacted(EtcdError):
    """A watch asked for revisions etcd has compacted away: re-list, then watch again."""

    def __init__(self, revision: int) -> None:
        super().__init__(f"revisions before {revision} are compacted")
        self.revision = revision


@dataclass(frozen=True, slots=True)
class KeyValue:
    """One key as etcd holds it."""

    key: str
    value: bytes
    mod_revision: int
    create_revision: int
    lease: int


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """A put or a delete, at ``kv.mod_revision``."""

    deleted: bool
    kv: KeyValue


def prefix_end(prefix: str) -> bytes:
    """The ``range_end`` that makes a range cover every key starting with ``prefix``."""
    raw = bytearray(prefix.encode("utf-8"))
    while raw:
        if raw[-1] < 0xFF:
            raw[-1] += 1
            return bytes(raw)
        raw.pop()
    return b"\0"


def _b64(text: str | bytes) -> str:
    raw = text.encode("utf-8") if isinstance(text, str) else text
    return base64.b64encode(raw).decode("ascii")


def _kv(raw: dict[str, Any]) -> KeyValue:
    return KeyValue(
        key=base64.b64decode(raw.get("key", "")).decode("utf-8"),
        value=base64.b64decode(raw.get("value", "")),
        mod_revision=int(raw.get("mod_revision", 0)),
        create_revision=int(raw.get("create_revision", 0)),
        lease=int(raw.get("lease", 0)),
    )


def _revision(answer: dict[str, Any]) -> int:
    header = answer.get("header")
    return int(header.get("revision", 0)) if isinstance(header, dict) else 0


class EtcdClient:
    """Thread-safe calls to an etcd cluster through any of its endpoints."""

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        budget: float = CALL_BUDGET,
        attempt_timeout: float = ATTEMPT_TIMEOUT,
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        if not endpoints:
            raise ValueError("etcd needs at least one endpoint")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.budget = budget
        self.attempt_timeout = attempt_timeout
        self.connect_timeout = connect_timeout
        self._timeouts = httpx.Timeout(attempt_timeout, connect=connect_timeout)
        self._current = 0
        self._lock = threading.Lock()
        self._http = httpx.Client(timeout=self._timeouts, follow_redirects=False)

    def close(self) -> None:
        self._http.close()

    @property
    def endpoint(self) -> str:
        """The endpoint calls go to first."""
        return self.endpoints[self._current]

    def _order(self) -> list[int]:
        with self._lock:
            start = self._current
        n = len(self.endpoints)
        return [(start + k) % n for k in range(n)]

    def _answered(self, index: int) -> None:
        with self._lock:
            if self._current != index:
                log.warning(
                    "etcd_failover",
                    **{"from": self.endpoints[self._current], "to": self.endpoints[index]},
                )
            self._current = index

    def deadline(self) -> float:
        """A deadline for one call (or for calls that make one operation together)."""
        return time.monotonic() + self.budget

    def call(
        self, path: str, body: dict[str, Any], *, deadline: float | None = None
    ) -> dict[str, Any]:
        """POST ``body`` to ``/v3/<path>`` on the first endpoint that answers by ``deadline``."""
        end = deadline if deadline is not None else self.deadline()
        failures = []
        for index in self._order():
            remaining = end - time.monotonic()
            if remaining <= 0.01:
                failures.append("out of time")
                break
            url = f"{self.endpoints[index]}/v3/{path}"
            limit = min(self.attempt_timeout, remaining)
            timeout = httpx.Timeout(limit, connect=min(self.connect_timeout, limit))
            try:
                response = self._http.post(url, json=body, timeout=timeout)
            except httpx.HTTPError as exc:
                failures.append(f"{self.endpoints[index]}: {type(exc).__name__}")
                continue
            if response.status_code >= 500:
                failures.append(f"{self.endpoints[index]}: {response.status_code}")
                continue
            if len(response.content) > _MAX_ANSWER_BYTES:
                raise EtcdError(f"etcd {path}: answer over {_MAX_ANSWER_BYTES} bytes")
            try:
                answer = response.json()
            except ValueError:
                failures.append(f"{self.endpoints[index]}: not JSON")
                continue
            if response.status_code != 200 or not isinstance(answer, dict):
                message = answer.get("message") if isinstance(answer, dict) else None
                raise EtcdError(f"etcd {path}: {response.status_code} {message or answer!r}")
            self._answered(index)
            return answer
        raise EtcdUnavailable(f"etcd {path}: no endpoint answered ({'; '.join(failures)})")

    # -- keys ----------------------------------------------------------------------------

    def get_prefix(
        self, prefix: str, *, deadline: float | None = None
    ) -> tuple[int, list[KeyValue]]:
        """Every key under ``prefix`` (linearizable), and the revision they were read at."""
        answer = self.call(
            "kv/range",
            {"key": _b64(prefix), "range_end": _b64(prefix_end(prefix))},
            deadline=deadline,
        )
        return _revision(answer), [_kv(kv) for kv in answer.get("kvs", [])]

    def revision(self) -> int:
        """The cluster's revision now (a linearizable read of nothing)."""
        return _revision(self.call("kv/range", {"key": _b64("\0"), "count_only": True}))

    def get(self, key: str) -> KeyValue | None:
        answer = self.call("kv/range", {"key": _b64(key)})
        kvs = answer.get("kvs", [])
        return _kv(kvs[0]) if kvs else None

    def put(self, key: str, value: bytes, *, lease: int = 0, deadline: float | None = None) -> int:
        """Set ``key`` (idempotent: a retried put writes the same value); return the revision."""
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        return _revision(self.call("kv/put", body, deadline=deadline))

    def put_if(
        self, key: str, value: bytes, *, mod_revision: int, lease: int = 0
    ) -> tuple[bool, int]:
        """Compare-and-swap: set ``key`` only if its mod revision is ``mod_revision`` (0: only
        if it does not exist). Return whether it was set, and the revision."""
        put: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            put["lease"] = str(lease)
        answer = self.call(
            "kv/txn",
            {
                "compare": [
                    {
                        "key": _b64(key),
                        "target": "MOD",
                        "result": "EQUAL",
                        "mod_revision": str(mod_revision),
                    }
                ],
                "success": [{"request_put": put}],
            },
        )
        return bool(answer.get("succeeded", False)), _revision(answer)

    def delete(self, key: str) -> int:
        """Remove ``key`` (idempotent); return the revision."""
        return self.delete_existing(key)[0]

    def delete_existing(self, key: str) -> tuple[int, bool]:
        """Remove ``key``; the revision, and whether there was a key to remove (when there was
        not, the revision is etcd's current one, maybe of a change elsewhere)."""
        answer = self.call("kv/deleterange", {"key": _b64(key)})
        return _revision(answer), int(answer.get("deleted", 0) or 0) > 0

    # -- leases --------------------------------------------------------------------------

    def grant(self, ttl: float, *, deadline: float | None = None) -> int:
        """A new lease of ``ttl`` seconds (rounded up): its id. Not idempotent: a lease granted
        by a call whose answer was lost holds no key and ends by itself."""
        answer = self.call(
            "lease/grant", {"TTL": str(max(1, int(-(-ttl // 1))))}, deadline=deadline
        )
        lease = int(answer.get("ID", 0))
        if not lease:
            raise EtcdError(f"etcd lease/grant: no lease in {answer!r}")
        return lease

    def keepalive(self, lease: int) -> int:
        """Renew ``lease``; return its TTL, or 0 if it is gone (expired or revoked)."""
        answer = self.call("lease/keepalive", {"ID": str(lease)})
        result = answer.get("result", answer)
        return int(result.get("TTL", 0)) if isinstance(result, dict) else 0

    def revoke(self, lease: int) -> int | None:
        """End ``lease`` and delete its keys at once; the revision, or ``None`` if the lease was
        gone already."""
        try:
            return _revision(self.call("lease/revoke", {"ID": str(lease)}))
        except EtcdError as exc:
            if "not found" not in str(exc):
                raise
            return None

    def status(self, endpoint: str) -> dict[str, Any]:
        """``maintenance/status`` of one endpoint (no failover: it is about that member)."""
        response = self._http.post(f"{endpoint}/v3/maintenance/status", json={})
        answer = response.json()
        if response.status_code != 200 or not isinstance(answer, dict):
            raise EtcdError(f"etcd status of {endpoint}: {response.status_code}")
        return answer

    # -- watching ------------------------------------------------------------------------

    def watch(
        self, prefix: str, start_revision: int, stop: threading.Event
    ) -> Iterator[tuple[int, list[WatchEvent]]]:
        """Changes under ``prefix`` from ``start_revision`` on: (revision, events) batches.

        Runs until ``stop`` is set, across endpoint failures (resuming after the last revision
        it yielded) and quiet periods. Raises ``Compacted`` if etcd no longer has the history.
        """
        next_revision = start_revision
        attempt = 0
        while not stop.is_set():
            index = self._order()[attempt % len(self.endpoints)]
            endpoint = self.endpoints[index]
            request = {
                "create_request": {
                    "key": _b64(prefix),
                    "range_end": _b64(prefix_end(prefix)),
                    "start_revision": str(next_revision),
                    "progress_notify": True,
                }
            }
            timeouts = httpx.Timeout(WATCH_IDLE_SECONDS, connect=self.connect_timeout)
            try:
                with self._http.stream(
                    "POST", f"{endpoint}/v3/watch", json=request, timeout=timeouts
                ) as response:
                    if response.status_code != 200:
                        raise EtcdUnavailable(f"etcd watch: {response.status_code}")
                    for line in response.iter_lines():
                        if stop.is_set():
                            return
                        if not line.strip():
                            continue
                        message = json.loads(line)
                        if "error" in message:
                            raise EtcdUnavailable(f"etcd watch: {message['error']}")
                        result = message.get("result", {})
                        compacted = int(result.get("compact_revision", 0) or 0)
                        if compacted:
                            raise Compacted(compacted)
                        if result.get("canceled"):
                            reason = result.get("cancel_reason") or "canceled"
                            raise EtcdUnavailable(f"etcd watch: {reason}")
                        if result.get("created"):
                            self._answered(index)
                            continue
                        attempt = 0  # a stream that delivers: failures start counting anew
                        events = [
                            WatchEvent(event.get("type") == "DELETE", _kv(event.get("kv", {})))
                            for event in result.get("events", [])
                        ]
                        if events:
                            revision = max(e.kv.mod_revision for e in events)
                            next_revision = revision + 1
                            yield revision, events
                        else:
                            # A progress notification: nothing under the prefix up to this
                            # revision is left to come, so a re-watch need not go back further.
                            next_revision = max(next_revision, _revision(result) + 1)
            except httpx.ReadTimeout:
                continue  # quiet: watch again from where we were
            except (httpx.HTTPError, EtcdUnavailable, ValueError) as exc:
                attempt += 1
                log.warning("etcd_watch_failed", endpoint=endpoint, error=str(exc)[:200])
                if attempt % len(self.endpoints) == 0:
                    stop.wait(0.5)  # every endpoint failed in a row: do not spin
