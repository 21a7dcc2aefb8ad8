"""Registry under load: lease renewals at 1,000/s and one change fanned out to 500 watchers.

One registry process (``python -m mesh_middleware registry --dev``, uvicorn with uvloop and
httptools) is pinned to CPU 0 with a fresh data directory; the load generator (this script,
asyncio on uvloop, HTTP/1.1 written by hand over keep-alive connections) is pinned to CPU 1.

1. **Renewals.** 10,000 instances of 50 services are registered (not timed), then each one
   renews every 10 s at its own random phase: 1,000 renewals/s, open loop. A renewal is the
   registration's ``PUT`` again with the same body. Latency is measured from the *scheduled*
   send time to the end of the response, so time spent queued behind a slow registry counts.
   Bar: p99 < 50 ms.
2. **Watch fan-out.** 500 watchers, each on its own connection, long-poll one of those services
   (``GET ...?index=N&wait=30s``); once the registry reports all 500 parked, one registration
   change is sent; each watcher's latency runs from the change's send to its answer (the
   change's acknowledgment is reported too). Five changes, 3 s apart, pooled. Renewals keep
   running at their rate throughout (the leases have to stay alive anyway); their latency from
   the first change on is printed, without a bar. Bar: p99 < 1 s, every watcher woken.

The registry's CPU time is read from ``/proc/<pid>/stat`` around each phase. Dev mode is used,
so no join token is needed; a join token would only add one hash and dict lookup per request.

    .venv/bin/python bench/registry.py               # exit 1 if a bar is missed
    .venv/bin/python bench/registry.py --no-check    # print only
    .venv/bin/python bench/registry.py --json        # figures as JSON on stdout
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import random
import resource
import shutil
import signal
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import uvloop
from _processes import PinnedProcess, core_busy_seconds, free_port

REPO = Path(__file__).resolve().parent.parent
SERVER_CPU = 0
CLIENT_CPU = 1
READY_TIMEOUT = 30.0
REQUEST_TIMEOUT = 10.0  # a renewal without an answer by then is an error
PARK_TIMEOUT = 20.0  # how long the registry may take to report every watcher parked
WAKE_TIMEOUT = 10.0  # a watcher not answered by then did not wake
DRAIN_TIMEOUT = 15.0
RENEWAL_P99_BAR_MS = 50.0
WATCH_P99_BAR_MS = 1000.0
LAG_OK_MS = 5.0  # the dispatcher's p99 lateness above which the generator fell behind
GENERATOR_BUSY_PCT = 90.0
OTHER_LOAD_PCT = 25.0  # on a quiet machine this is a few %
SEED = 20_26


class BenchError(RuntimeError):
    """The benchmark cannot run or its figures would be meaningless."""


# -- the registry process --------------------------------------------------------------------


class Registry(PinnedProcess):
    """``mesh registry --dev`` on a free 127.0.0.1 port and a temporary data dir, on one CPU."""

    grace = 8.0

    def __init__(self, data_dir: Path, log_path: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        command = [
            sys.executable, "-m", "mesh_middleware", "registry",
            "--host", "127.0.0.1", "--port", str(self.port),
            "--data-dir", str(data_dir), "--dev",
        ]  # fmt: skip
        super().__init__(command, log_path, cpu=SERVER_CPU, cwd=REPO)

    def wait_ready(self) -> dict[str, Any]:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if self.process.poll() is not None:
                raise BenchError(
                    f"registry exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            try:
                return self.get_json("/healthz")
            except (OSError, urllib.error.URLError, ValueError):
                if time.monotonic() > deadline:
                    raise BenchError(
                        f"registry not ready after {READY_TIMEOUT:.0f} s:\n{self.log_tail()}"
                    ) from None
                time.sleep(0.1)

    def get_json(self, path: str) -> dict[str, Any]:
        with urllib.request.urlopen(self.base + path, timeout=10) as response:
            body: dict[str, Any] = json.loads(response.read())
            return body

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(self.base + "/metrics", timeout=10) as response:
            return _parse_metrics(response.read())


def _parse_metrics(text: bytes) -> dict[str, float]:
    """Unlabelled samples of the Prometheus text (enough for gauges and plain counters)."""
    out: dict[str, float] = {}
    for line in text.decode().splitlines():
        if line.startswith("#") or "{" in line:
            continue
        name, _, value = line.partition(" ")
        with contextlib.suppress(ValueError):
            out[name] = float(value)
    return out


def _self_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class CpuSample:
    """Everything CPU-related, read at one instant."""

    wall: float
    registry: float
    generator: float
    server_core: float
    client_core: float

    @classmethod
    def take(cls, registry: Registry) -> CpuSample:
        return cls(
            wall=time.monotonic(),
            registry=registry.cpu_seconds(),
            generator=_self_cpu_seconds(),
            server_core=core_busy_seconds(SERVER_CPU),
            client_core=core_busy_seconds(CLIENT_CPU),
        )


@dataclass
class CpuDelta:
    seconds: float
    registry: float
    generator: float
    server_core_busy_pct: float
    client_core_busy_pct: float
    other_pct: float  # busy time of both cores that was neither the registry nor this script

    @classmethod
    def between(cls, a: CpuSample, b: CpuSample) -> CpuDelta:
        wall = max(b.wall - a.wall, 1e-9)
        registry = b.registry - a.registry
        generator = b.generator - a.generator
        busy = (b.server_core - a.server_core) + (b.client_core - a.client_core)
        return cls(
            seconds=wall,
            registry=registry,
            generator=generator,
            server_core_busy_pct=100 * (b.server_core - a.server_core) / wall,
            client_core_busy_pct=100 * (b.client_core - a.client_core) / wall,
            other_pct=max(0.0, 100 * (busy - registry - generator) / wall),
        )

    @property
    def registry_pct(self) -> float:
        return 100 * self.registry / self.seconds

    @property
    def generator_pct(self) -> float:
        return 100 * self.generator / self.seconds


# -- HTTP/1.1 by hand ------------------------------------------------------------------------


class HttpError(Exception):
    """The connection broke or the answer was not HTTP we understand."""


class Connection:
    """One keep-alive HTTP/1.1 connection; one request at a time."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def request(self, raw: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
        """Send one request (``raw`` is complete) and read its answer."""
        if self.writer is None or self.reader is None:
            await self.open()
        assert self.writer is not None and self.reader is not None
        try:
            self.writer.write(raw)
            head = await self.reader.readuntil(b"\r\n\r\n")
            lines = head[:-4].split(b"\r\n")
            status = int(lines[0][9:12])
            headers: dict[bytes, bytes] = {}
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            length = headers.get(b"content-length")
            if length is None:
                raise HttpError(f"no content-length in {head[:200]!r}")
            body = await self.reader.readexactly(int(length))
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            self.close()
            raise HttpError(f"{type(exc).__name__}: {exc}") from None
        except BaseException:
            self.close()  # cancelled mid-request: the connection's state is unknown
            raise
        if headers.get(b"connection", b"").lower() == b"close":
            self.close()
        return status, headers, body


def _request(method: str, path: str, port: int, body: bytes | None = None) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
    if body is None:
        return (head + "\r\n").encode()
    head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


# -- the instances ---------------------------------------------------------------------------


@dataclass(frozen=True)
class InstanceSpec:
    service: str
    instance_id: str
    raw_put: bytes  # the registration, byte for byte the same at every renewal


def make_instances(count: int, services: int, port: int, ttl: str) -> list[InstanceSpec]:
    out = []
    for i in range(count):
        service = f"svc-{i % services:02d}"
        instance_id = f"{service}-{i // services:05d}"
        body = json.dumps(
            {
                "address": f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}",
                "port": 8000 + i % 1000,
                "version": "v1",
                "zone": f"zone-{i % 3}",
                "metadata": {"team": f"team-{i % 7}", "build": "2026.11.1"},
                "ttl": ttl,
            },
            separators=(",", ":"),
        ).encode()
        path = f"/v1/catalog/services/{service}/instances/{instance_id}"
        out.append(InstanceSpec(service, instance_id, _request("PUT", path, port, body)))
    return out


# -- statistics ------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile of ``values`` (which need not be sorted); inf stays inf."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def _ms(seconds: float) -> float:
    return seconds * 1000


@dataclass
class Latencies:
    count: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float

    @classmethod
    def of(cls, seconds: list[float]) -> Latencies:
        return cls(
            count=len(seconds),
            p50_ms=_ms(percentile(seconds, 50)),
            p95_ms=_ms(percentile(seconds, 95)),
            p99_ms=_ms(percentile(seconds, 99)),
            max_ms=_ms(max(seconds)) if seconds else math.nan,
        )

    def line(self) -> str:
        return (
            f"p50 {_fmt_ms(self.p50_ms)}  p95 {_fmt_ms(self.p95_ms)}"
            f"  p99 {_fmt_ms(self.p99_ms)}  max {_fmt_ms(self.max_ms)}"
        )


def _fmt_ms(value: float) -> str:
    if math.isinf(value):
        return "  never"
    if value >= 100:
        return f"{value:5.0f} ms"
    return f"{value:5.2f} ms"


# -- renewals --------------------------------------------------------------------------------


@dataclass(slots=True)
class Renewal:
    scheduled: float
    dispatched: float
    started: float = 0.0
    done: float = 0.0
    status: int = 0
    error: str = ""


class RenewalLoad:
    """Every instance renews at its own phase every ``period`` s, open loop, until stopped."""

    def __init__(
        self, instances: list[InstanceSpec], port: int, period: float, connections: int
    ) -> None:
        self.instances = instances
        self.period = period
        self.port = port
        self.connections = [Connection(port) for _ in range(connections)]
        rng = random.Random(SEED)
        self.phases = sorted((rng.uniform(0, period), i) for i in range(len(instances)))
        self.queue: asyncio.Queue[tuple[Renewal, InstanceSpec]] = asyncio.Queue()
        self.issued: list[Renewal] = []
        self.reconnects = 0
        self.started_at = 0.0
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def open(self) -> None:
        await asyncio.gather(*(c.open() for c in self.connections))

    async def register_all(self) -> float:
        """Register every instance (closed loop over the pool); return the seconds it took."""
        todo = iter(self.instances)
        failures: list[str] = []

        async def worker(conn: Connection) -> None:
            for spec in todo:
                for attempt in range(3):
                    try:
                        status, _, body = await conn.request(spec.raw_put)
                    except HttpError as exc:
                        if attempt == 2:
                            failures.append(str(exc))
                        continue
                    if status != 200:
                        failures.append(f"{status} {body[:200]!r}")
                    break

        start = time.monotonic()
        await asyncio.gather(*(worker(c) for c in self.connections))
        if failures:
            raise BenchError(f"{len(failures)} registrations failed, e.g. {failures[0]}")
        return time.monotonic() - start

    def start(self) -> None:
        self.started_at = time.monotonic() + 0.05
        self._tasks = [asyncio.create_task(self._dispatch())]
        self._tasks += [asyncio.create_task(self._work(c)) for c in self.connections]

    def _schedule(self) -> Iterator[tuple[float, int]]:
        for k in itertools.count():
            base = self.started_at + k * self.period
            for phase, index in self.phases:
                yield base + phase, index

    async def _dispatch(self) -> None:
        # time.monotonic(), not loop.time(): uvloop's clock only has millisecond resolution.
        for when, index in self._schedule():
            if self._stop.is_set():
                return
            delay = when - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            renewal = Renewal(when, time.monotonic())
            self.issued.append(renewal)
            self.queue.put_nowait((renewal, self.instances[index]))

    async def _work(self, conn: Connection) -> None:
        while True:
            renewal, spec = await self.queue.get()
            renewal.started = time.monotonic()
            for _ in range(2):
                try:
                    async with asyncio.timeout(REQUEST_TIMEOUT):
                        status, _, _ = await conn.request(spec.raw_put)
                    renewal.status = status
                    renewal.error = "" if status == 200 else f"HTTP {status}"
                    break
                except HttpError as exc:
                    # The server may close an idle keep-alive connection just as we write:
                    # a renewal is idempotent, so try once more on a fresh connection.
                    self.reconnects += 1
                    renewal.error = str(exc)
                except TimeoutError:
                    conn.close()
                    self.reconnects += 1
                    renewal.error = f"no answer within {REQUEST_TIMEOUT:.0f} s"
                    break
            renewal.done = time.monotonic()
            self.queue.task_done()

    async def stop(self) -> None:
        """Stop scheduling; let what was sent finish (bounded); close the connections."""
        self._stop.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(DRAIN_TIMEOUT):
                await self.queue.join()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for conn in self.connections:
            conn.close()

    def between(self, start: float, end: float) -> list[Renewal]:
        """The renewals dispatched whose scheduled time falls in ``[start, end)``."""
        return [r for r in self.issued if start <= r.scheduled < end]

    def scheduled_between(self, start: float, end: float) -> int:
        """How many renewals the schedule holds in ``[start, end)``, dispatched or not."""
        count = 0
        first = max(0, math.floor((start - self.started_at) / self.period) - 1)
        last = math.ceil((end - self.started_at) / self.period) + 1
        for k in range(first, last + 1):
            base = self.started_at + k * self.period
            count += sum(1 for phase, _ in self.phases if start <= base + phase < end)
        return count


@dataclass
class RenewalFigures:
    target_per_second: float
    seconds: float
    scheduled: int
    sent_per_second: float
    completed_per_second: float
    errors: int
    error_kinds: dict[str, int]
    reconnects: int
    connections: int
    latency: Latencies  # scheduled send -> answer
    service: Latencies  # written -> answer (what the registry alone took, plus the network)
    dispatch_lag_p99_ms: float
    dispatch_lag_max_ms: float
    queue_wait_p99_ms: float
    registry_cpu_pct: float
    registry_cpu_us_per_renewal: float
    generator_cpu_pct: float
    server_core_busy_pct: float
    client_core_busy_pct: float
    other_load_pct: float
    generator_kept_up: bool


def renewal_figures(
    load: RenewalLoad, start: float, end: float, cpu: CpuDelta, target: float
) -> RenewalFigures:
    """Figures of the renewals scheduled in ``[start, end)`` (call it once they are answered)."""
    seconds = end - start
    window = load.between(start, end)
    scheduled = load.scheduled_between(start, end)
    answered = [r for r in window if r.done]
    errors = Counter(r.error for r in answered if r.error)
    if len(answered) < len(window):
        errors["no answer yet"] = len(window) - len(answered)
    if scheduled > len(window):
        errors["never sent (generator behind)"] = scheduled - len(window)
    ok = [r for r in answered if not r.error]
    completed = sum(1 for r in load.issued if r.done and start <= r.done < end and not r.error)
    sent = sum(1 for r in load.issued if r.started and start <= r.started < end)
    # An unanswered renewal is slower than every answered one.
    latency = [r.done - r.scheduled for r in ok] + [math.inf] * (len(window) - len(answered))
    lag = [r.dispatched - r.scheduled for r in window]
    queue_wait = [r.started - r.dispatched for r in window if r.started]
    lag_p99 = _ms(percentile(lag, 99)) if lag else math.nan
    kept_up = (
        bool(window)
        and scheduled == len(window)
        and lag_p99 <= LAG_OK_MS
        and cpu.generator_pct < GENERATOR_BUSY_PCT
    )
    return RenewalFigures(
        target_per_second=target,
        seconds=seconds,
        scheduled=scheduled,
        sent_per_second=sent / seconds,
        completed_per_second=completed / seconds,
        errors=sum(errors.values()),
        error_kinds=dict(errors),
        reconnects=load.reconnects,
        connections=len(load.connections),
        latency=Latencies.of(latency),
        service=Latencies.of([r.done - r.started for r in ok]),
        dispatch_lag_p99_ms=lag_p99,
        dispatch_lag_max_ms=_ms(max(lag)) if lag else math.nan,
        queue_wait_p99_ms=_ms(percentile(queue_wait, 99)) if queue_wait else math.nan,
        registry_cpu_pct=cpu.registry_pct,
        registry_cpu_us_per_renewal=1e6 * cpu.registry / max(completed, 1),
        generator_cpu_pct=cpu.generator_pct,
        server_core_busy_pct=cpu.server_core_busy_pct,
        client_core_busy_pct=cpu.client_core_busy_pct,
        other_load_pct=cpu.other_pct,
        generator_kept_up=kept_up,
    )


# -- watches ---------------------------------------------------------------------------------


@dataclass
class ChangeFigures:
    change: int
    woke: int
    watchers: int
    ack_ms: float
    from_send: Latencies
    from_ack: Latencies
    registry_cpu_ms: float  # from the send to the last answer (renewals included)
    park_seconds: float


@dataclass
class WatchFigures:
    service: str
    instances: int
    answer_bytes: int
    watchers: int
    changes: list[ChangeFigures] = field(default_factory=list)
    woke: int = 0
    expected: int = 0
    from_send: Latencies | None = None
    from_ack: Latencies | None = None
    renewals_meanwhile: RenewalFigures | None = None


class Watcher:
    """One client long-polling one service on its own connection."""

    def __init__(self, port: int, service: str) -> None:
        self.conn = Connection(port)
        self.port = port
        self.service = service
        self.index = 0
        self.answer_bytes = 0

    async def first(self) -> None:
        """The first read (no index): where a watch starts."""
        status, headers, body = await self.conn.request(
            _request("GET", f"/v1/catalog/services/{self.service}", self.port)
        )
        if status != 200:
            raise BenchError(f"GET {self.service}: HTTP {status} {body[:200]!r}")
        self.index = int(headers[b"x-mesh-index"])
        self.answer_bytes = len(body)

    async def poll(self, wait: str) -> tuple[float, int, int]:
        """One long poll; answer (arrival time, status, the answer's index)."""
        path = f"/v1/catalog/services/{self.service}?index={self.index}&wait={wait}"
        status, headers, body = await self.conn.request(_request("GET", path, self.port))
        arrived = time.monotonic()
        self.answer_bytes = len(body)
        return arrived, status, int(headers.get(b"x-mesh-index", b"0"))


async def _wait_parked(registry: Registry, expected: int) -> float:
    """Poll the registry's own gauge until ``expected`` watchers wait; return how long it took."""
    start = time.monotonic()
    while True:
        parked = (await asyncio.to_thread(registry.metrics)).get("mesh_registry_watchers", 0.0)
        if parked >= expected:
            return time.monotonic() - start
        if time.monotonic() - start > PARK_TIMEOUT:
            raise BenchError(
                f"only {parked:.0f} of {expected} watchers parked after {PARK_TIMEOUT:.0f} s"
            )
        await asyncio.sleep(0.02)


async def watch_fanout(
    registry: Registry, service: str, count: int, changes: int, every: float, out: TextIO
) -> tuple[WatchFigures, CpuSample]:
    """``count`` watchers park on ``service``; ``changes`` times, one change wakes them.

    Changes are at least ``every`` s apart. Returns the figures and a CPU sample taken just
    before the first change was sent.
    """
    port = registry.port
    watchers = [Watcher(port, service) for _ in range(count)]
    change_conn = Connection(port)
    tasks: list[asyncio.Task[tuple[float, int, int]]] = []
    try:
        await asyncio.gather(*(w.conn.open() for w in watchers))
        await asyncio.gather(*(w.first() for w in watchers))
        current = await asyncio.to_thread(registry.get_json, f"/v1/catalog/services/{service}")
        figures = WatchFigures(
            service=service,
            instances=len(current["instances"]),
            answer_bytes=watchers[0].answer_bytes,
            watchers=count,
        )
        all_send: list[float] = []
        all_ack: list[float] = []
        first: CpuSample | None = None
        last_sent = 0.0
        for change in range(1, changes + 1):
            tasks = [asyncio.create_task(w.poll("30s")) for w in watchers]
            parked = await _wait_parked(registry, count)
            if change > 1:
                await _sleep_until(last_sent + every)
            body = json.dumps(
                {
                    "address": "10.255.0.1",
                    "port": 9999,
                    "version": "v1",
                    "metadata": {"change": str(change)},
                    "ttl": "60s",
                },
                separators=(",", ":"),
            ).encode()
            raw = _request("PUT", f"/v1/catalog/services/{service}/instances/probe", port, body)
            if first is None:
                first = CpuSample.take(registry)
            cpu_before = registry.cpu_seconds()
            sent = time.monotonic()
            last_sent = sent
            status, _, answer = await change_conn.request(raw)
            acked = time.monotonic()
            if status != 200:
                raise BenchError(f"the change was refused: HTTP {status} {answer[:200]!r}")
            change_index = int(json.loads(answer)["index"])
            done, pending = await asyncio.wait(tasks, timeout=WAKE_TIMEOUT)
            cpu_after = registry.cpu_seconds()
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            from_send: list[float] = []
            from_ack: list[float] = []
            for watcher, task in zip(watchers, tasks, strict=True):
                result = task.result() if task in done and task.exception() is None else None
                if result is not None:
                    arrived, poll_status, index = result
                    if poll_status == 200:
                        watcher.index = index
                    if poll_status == 200 and index >= change_index and arrived >= sent:
                        from_send.append(arrived - sent)
                        # The watcher's answer may be read before the acknowledgment is.
                        from_ack.append(max(0.0, arrived - acked))
                        continue
                from_send.append(math.inf)
                from_ack.append(math.inf)
            woke = sum(1 for x in from_send if not math.isinf(x))
            result_figures = ChangeFigures(
                change=change,
                woke=woke,
                watchers=count,
                ack_ms=_ms(acked - sent),
                from_send=Latencies.of(from_send),
                from_ack=Latencies.of(from_ack),
                registry_cpu_ms=1000 * (cpu_after - cpu_before),
                park_seconds=parked,
            )
            figures.changes.append(result_figures)
            all_send += from_send
            all_ack += from_ack
            print(
                f"  change {change}: woke {woke}/{count}  from send:"
                f" {result_figures.from_send.line()}  (ack {result_figures.ack_ms:.1f} ms;"
                f" registry CPU {result_figures.registry_cpu_ms:.0f} ms;"
                f" all parked {parked:.2f} s after re-arming)",
                file=out,
                flush=True,
            )
        figures.woke = sum(c.woke for c in figures.changes)
        figures.expected = count * changes
        figures.from_send = Latencies.of(all_send)
        figures.from_ack = Latencies.of(all_ack)
        assert first is not None
        return figures, first
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for w in watchers:
            w.conn.close()
        change_conn.close()


# -- the run ---------------------------------------------------------------------------------


@dataclass
class Results:
    config: dict[str, Any]
    registration_seconds: float = 0.0
    renewals: RenewalFigures | None = None
    watch: WatchFigures | None = None
    expiries: float = 0.0
    instances_at_end: int = 0
    bars: dict[str, bool] = field(default_factory=dict)


async def _sleep_until(when: float) -> None:
    await asyncio.sleep(max(0.0, when - time.monotonic()))


async def run(args: argparse.Namespace, registry: Registry, out: TextIO) -> Results:
    results = Results(config=_config(args))
    target = args.instances / args.period
    instances = make_instances(args.instances, args.services, registry.port, args.ttl)
    load = RenewalLoad(instances, registry.port, args.period, args.connections)
    await load.open()
    try:
        results.registration_seconds = await load.register_all()
        health = await asyncio.to_thread(registry.get_json, "/healthz")
        if health.get("instances") != args.instances:
            raise BenchError(f"registered {args.instances}, the registry holds {health}")
        print(
            f"registered {args.instances:,} instances of {args.services} services in"
            f" {results.registration_seconds:.1f} s (not timed:"
            f" {args.instances / results.registration_seconds:.0f}/s, each one a store commit)",
            file=out,
            flush=True,
        )

        load.start()
        w0 = load.started_at + args.warmup
        w1 = w0 + args.seconds
        await _sleep_until(w0)
        c0 = CpuSample.take(registry)
        await _sleep_until(w1)
        c1 = CpuSample.take(registry)
        await asyncio.sleep(1.0)  # the window's last renewals are answered meanwhile
        renewals = renewal_figures(load, w0, w1, CpuDelta.between(c0, c1), target)
        results.renewals = renewals
        print(
            f"renewals: {args.instances:,} instances every {args.period:g} s (open loop, random"
            f" phases), {args.connections} keep-alive connections, {args.warmup:g} s warm-up +"
            f" {renewals.seconds:.0f} s measured",
            file=out,
        )
        _print_renewals(renewals, out)

        print(
            f"watch fan-out: {args.watchers} watchers, each on its own connection, long-poll"
            f" svc-00; {args.changes} changes, {args.change_every:g} s apart; renewals continue"
            f" at {target:.0f}/s",
            file=out,
            flush=True,
        )
        watch, c2 = await watch_fanout(
            registry, "svc-00", args.watchers, args.changes, args.change_every, out
        )
        we = time.monotonic()
        c3 = CpuSample.take(registry)
        await asyncio.sleep(1.0)
        meanwhile = renewal_figures(load, c2.wall, we, CpuDelta.between(c2, c3), target)
        watch.renewals_meanwhile = meanwhile
        results.watch = watch
        _print_watch(watch, out)

        metrics = await asyncio.to_thread(registry.metrics)
        results.expiries = metrics.get("mesh_registry_expiries_total", math.nan)
        results.instances_at_end = int(metrics.get("mesh_registry_instances", 0))
    finally:
        await load.stop()
    print(
        f"at the end: {results.instances_at_end:,} instances registered,"
        f" {results.expiries:.0f} lease expiries",
        file=out,
    )
    assert results.renewals is not None and results.watch is not None
    w = results.watch
    results.bars = {
        "renewal_p99_under_50ms": results.renewals.latency.p99_ms < RENEWAL_P99_BAR_MS,
        "generator_kept_up": results.renewals.generator_kept_up,
        "watch_p99_under_1s": w.from_send is not None and w.from_send.p99_ms < WATCH_P99_BAR_MS,
        "every_watcher_woke": w.woke == w.expected,
        "no_expiries": results.expiries == 0,
    }
    return results


def _print_renewals(r: RenewalFigures, out: TextIO, *, only_renewals: bool = True) -> None:
    errors = ", ".join(f"{k}: {v}" for k, v in r.error_kinds.items()) or "none"
    print(
        f"  target {r.target_per_second:.1f}/s  sent {r.sent_per_second:.1f}/s"
        f"  answered {r.completed_per_second:.1f}/s  ({r.scheduled:,} scheduled in the window;"
        f" errors {r.errors} [{errors}]; reconnects {r.reconnects})",
        file=out,
    )
    print(f"  latency from the scheduled send:  {r.latency.line()}", file=out)
    print(f"  from the write on the socket:     {r.service.line()}", file=out)
    per_renewal = (
        f" = {r.registry_cpu_us_per_renewal:.0f} us per renewal"
        if only_renewals
        else " (renewals, watch answers and changes)"
    )
    print(
        f"  registry CPU {r.registry_cpu_pct:.1f}% of core {SERVER_CPU}{per_renewal}"
        f"  (core {SERVER_CPU} busy {r.server_core_busy_pct:.0f}%)",
        file=out,
    )
    verdict = "kept to its schedule" if r.generator_kept_up else "FELL BEHIND"
    print(
        f"  generator: CPU {r.generator_cpu_pct:.0f}% of core {CLIENT_CPU} (core busy"
        f" {r.client_core_busy_pct:.0f}%), dispatch lag p99 {r.dispatch_lag_p99_ms:.2f} ms"
        f" max {r.dispatch_lag_max_ms:.2f} ms -> {verdict}",
        file=out,
    )
    print(
        f"  wait for a free connection (all {r.connections} had a renewal in flight) p99"
        f" {r.queue_wait_p99_ms:.2f} ms; other processes {r.other_load_pct:.0f}% of a core",
        file=out,
        flush=True,
    )
    if r.other_load_pct > OTHER_LOAD_PCT:
        print(
            f"  WARNING: other processes used {r.other_load_pct:.0f}% of a core meanwhile:"
            " the registry's latency and CPU figures are disturbed",
            file=out,
            flush=True,
        )


def _print_watch(w: WatchFigures, out: TextIO) -> None:
    assert w.from_send is not None and w.from_ack is not None
    assert w.renewals_meanwhile is not None
    print(
        f"  pooled: woke {w.woke}/{w.expected} ({w.instances} instances,"
        f" {w.answer_bytes / 1024:.0f} KiB per answer)",
        file=out,
    )
    print(f"    from the change's send:  {w.from_send.line()}", file=out)
    print(f"    from its acknowledgment: {w.from_ack.line()}", file=out)
    print(
        f"renewals from the first change to the last answer ({w.renewals_meanwhile.seconds:.1f}"
        " s; no bar):",
        file=out,
    )
    _print_renewals(w.renewals_meanwhile, out, only_renewals=False)


def _config(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "instances": args.instances,
        "services": args.services,
        "period_seconds": args.period,
        "ttl": args.ttl,
        "seconds": args.seconds,
        "warmup_seconds": args.warmup,
        "connections": args.connections,
        "watchers": args.watchers,
        "changes": args.changes,
        "change_every_seconds": args.change_every,
        "dev_mode": True,
        "server_cpu": SERVER_CPU,
        "client_cpu": CLIENT_CPU,
        "python": sys.version.split()[0],
        "load_average": os.getloadavg()[0],
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def _check_machine() -> None:
    if shutil.which("taskset") is None:
        raise BenchError("taskset is needed (util-linux)")
    cpus = os.sched_getaffinity(0)
    if not {SERVER_CPU, CLIENT_CPU} <= cpus:
        raise BenchError(f"CPUs {SERVER_CPU} and {CLIENT_CPU} are needed; this process has {cpus}")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2048:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=30, help="measured renewal seconds")
    parser.add_argument("--warmup", type=float, default=5, help="renewal warm-up seconds")
    parser.add_argument("--instances", type=int, default=10_000)
    parser.add_argument("--services", type=int, default=50)
    parser.add_argument("--period", type=float, default=10.0, help="seconds between renewals")
    parser.add_argument("--ttl", default="30s", help="the instances' lease (default 30s)")
    parser.add_argument("--connections", type=int, default=48, help="renewal connections")
    parser.add_argument("--watchers", type=int, default=500)
    parser.add_argument("--changes", type=int, default=5)
    parser.add_argument(
        "--change-every", type=float, default=3.0, help="seconds from one change to the next"
    )
    parser.add_argument("--no-check", action="store_true", help="print only; exit 0")
    parser.add_argument("--json", action="store_true", help="write the figures as JSON to stdout")
    args = parser.parse_args(argv)
    if not (
        1 <= args.seconds <= 600
        and 0 <= args.warmup <= 60
        and 1 <= args.services <= 100 <= args.instances <= 100_000
        and 1 <= args.period <= 60
        and 1 <= args.connections <= 256
        and 1 <= args.watchers <= 2000
        and 1 <= args.changes <= 50
        and 0 <= args.change_every <= 30
    ):
        parser.error("a value is out of range (see --help)")
    out: TextIO = sys.stderr if args.json else sys.stdout
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    budget = (
        300
        + args.warmup
        + args.seconds
        + args.changes * (PARK_TIMEOUT + WAKE_TIMEOUT + args.change_every)
    )
    registry: Registry | None = None
    try:
        _check_machine()
        with tempfile.TemporaryDirectory(prefix="mesh-bench-registry-") as tmp:
            try:
                registry = Registry(Path(tmp) / "data", Path(tmp) / "registry.log")
                health = registry.wait_ready()
                if not health.get("dev_mode"):
                    raise BenchError(f"the registry is not in dev mode: {health}")
                os.sched_setaffinity(0, {CLIENT_CPU})
                print(
                    f"registry (--dev: no join tokens) pid {registry.pid} on CPU {SERVER_CPU},"
                    f" generator (asyncio on uvloop, HTTP/1.1 by hand) on CPU {CLIENT_CPU};"
                    f" python {sys.version.split()[0]}, load average {os.getloadavg()[0]:.2f}",
                    file=out,
                    flush=True,
                )

                async def bounded() -> Results:
                    async with asyncio.timeout(budget):
                        return await run(args, registry, out)

                results = uvloop.run(bounded())
            except TimeoutError:
                raise BenchError(f"did not finish within {budget:.0f} s") from None
            except BaseException:
                if registry is not None:
                    print(f"registry log (tail):\n{registry.log_tail()}", file=sys.stderr)
                raise
            finally:
                if registry is not None:
                    registry.stop()
    except BenchError as exc:
        print(f"registry bench failed: {exc}", file=sys.stderr)
        return 1
    bar_lines = {
        "renewal_p99_under_50ms": f"renewal p99 < {RENEWAL_P99_BAR_MS:.0f} ms",
        "generator_kept_up": "the generator kept to its schedule",
        "watch_p99_under_1s": f"watch p99 < {WATCH_P99_BAR_MS / 1000:.0f} s from the change",
        "every_watcher_woke": "every watcher woke",
        "no_expiries": "no lease expired",
    }
    missed = [bar_lines[name] for name, met in results.bars.items() if not met]
    for name, met in results.bars.items():
        print(f"  {bar_lines[name]}: {'met' if met else 'MISSED'}", file=out)
    print("all bars met" if not missed else f"MISSED: {'; '.join(missed)}", file=out)
    if args.json:
        print(json.dumps(_jsonable(asdict(results)), indent=2))
    return 0 if args.no_check or not missed else 1


if __name__ == "__main__":
    sys.exit(main())
