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

``--store etcd`` runs the same on three registry replicas sharing a 3-member etcd cluster that
the script starts in its temporary directory (``tests/support/etcd_cluster.py``): renewal
connections and watchers go round-robin to the replicas, every change through the first one.
``--rates`` runs the phases at several renewal rates on one set of instances; ``--find-max``
raises the renewal rate step by step (registering more instances into one running load) until
a step misses p99 < 50 ms twice or loses renewals; ``--compare`` runs SQLite and etcd one after
the other and prints them side by side. bench/README.md says how each is measured.

    .venv/bin/python bench/registry.py               # exit 1 if a bar is missed
    .venv/bin/python bench/registry.py --no-check    # print only
    .venv/bin/python bench/registry.py --json        # figures as JSON on stdout
    .venv/bin/python bench/registry.py --store etcd --find-max   # the highest rate sustained
    .venv/bin/python bench/registry.py --compare     # SQLite, then etcd, then the table
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import gc
import importlib.util
import itertools
import json
import math
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any, TextIO

import uvloop
from _processes import PinnedProcess, core_busy_seconds, free_port, proc_cpu_seconds

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
STORES = ("sqlite", "etcd")
# Registering 10,000 instances on etcd takes 50-76 s here (SQLite: 4-6 s): a 30 s lease would run
# out before its first renewal. A keepalive costs etcd the same whatever the lease's TTL.
DEFAULT_TTL = {"sqlite": "30s", "etcd": "120s"}
ETCD_CLUSTER_SCRIPT = REPO / "tests" / "support" / "etcd_cluster.py"
CATCH_UP_TIMEOUT = 60.0  # how long every replica may take to hold every registered instance
WATCHDOG_TIMEOUT = 20.0
TTL_PERIODS = 3  # a lease outlives this many renewal periods (rates may change between rounds)
MAX_TTL_SECONDS = 600.0  # the registry's own limit
# --find-max: a step sustains its rate when p99 < RENEWAL_P99_BAR_MS, at least this share of the
# scheduled renewals is answered in the step, no renewal failed and the generator kept up.
ANSWERED_SHARE = 0.98
FIND_MAX_FROM = {"sqlite": 500.0, "etcd": 100.0}
FIND_MAX_FACTOR = 1.15
FIND_MAX_STEPS = 25


class BenchError(RuntimeError):
    """The benchmark cannot run or its figures would be meaningless."""


# -- the registry process --------------------------------------------------------------------


class Registry(PinnedProcess):
    """``mesh registry --dev`` on a free 127.0.0.1 port and a temporary data dir, on one CPU
    (``cpus``: on those)."""

    grace = 8.0

    def __init__(
        self,
        data_dir: Path,
        log_path: Path,
        *,
        store: list[str] | None = None,
        cpus: str = str(SERVER_CPU),
    ) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        command = [
            sys.executable, "-m", "mesh_middleware", "registry",
            "--host", "127.0.0.1", "--port", str(self.port),
            "--data-dir", str(data_dir), "--dev", *(store or []),
        ]  # fmt: skip
        if cpus != str(SERVER_CPU):
            # PinnedProcess pins to one CPU; a second taskset, exec'd in its place (the pid
            # stays the interpreter's), widens that to ``cpus``.
            command = ["taskset", "-c", cpus, *command]
        super().__init__(command, log_path, cpu=SERVER_CPU, cwd=REPO)

    def log_lines(self, *words: str) -> list[str]:
        """The lines of the registry's log that hold any of ``words``."""
        text = self.log_path.read_text(errors="replace")
        return [line for line in text.splitlines() if any(w in line for w in words)]

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


# -- etcd and the set of processes under test ------------------------------------------------


def _etcd_cluster_module() -> ModuleType:
    """``tests/support/etcd_cluster.py`` (standard library only), imported by its path."""
    spec = importlib.util.spec_from_file_location("mesh_bench_etcd_cluster", ETCD_CLUSTER_SCRIPT)
    if spec is None or spec.loader is None:
        raise BenchError(f"cannot import {ETCD_CLUSTER_SCRIPT}")
    module = importlib.util.module_from_spec(spec)
    # Its dataclasses look their module up in sys.modules.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class EtcdMembers:
    """The 3-member etcd cluster of ``tests/support/etcd_cluster.py`` under ``directory``,
    its members on ``cpus``; killed (and their data removed) for certain.

    The members run detached (they are no children of this script), so a watchdog, a child
    in a session of its own, waits for this script to say it stopped them. Should the script
    end without saying so (EOF on the watchdog's stdin, SIGKILL included), the watchdog stops
    the cluster from its ``cluster.json`` and removes ``remove`` (the run's directory).
    """

    def __init__(self, directory: Path, cpus: set[int], *, remove: Path) -> None:
        if shutil.which("etcd") is None:
            raise BenchError("etcd is needed for --store etcd (Debian: apt install etcd-server)")
        self.directory = directory
        self._module = _etcd_cluster_module()
        self._watchdog = subprocess.Popen(
            [
                "sh", "-c", 'read -r done || { "$0" "$1" stop "$2"; rm -rf "$3"; }',
                sys.executable, str(ETCD_CLUSTER_SCRIPT), str(directory), str(remove),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        before = os.sched_getaffinity(0)
        os.sched_setaffinity(0, cpus)  # the members, and every thread they start, inherit it
        try:
            self.cluster = self._module.start_cluster(directory)
        except BaseException:
            self.stop()
            raise
        finally:
            os.sched_setaffinity(0, before)
        self.version = subprocess.run(
            ["etcd", "--version"], capture_output=True, text=True, check=False
        ).stdout.split("\n")[0]

    @property
    def pids(self) -> list[int]:
        return [m.pid for m in self.cluster.members]

    @property
    def hosts(self) -> str:
        hosts: str = self.cluster.store_hosts
        return hosts

    def cpu_seconds(self) -> float:
        try:
            return sum(proc_cpu_seconds(pid) for pid in self.pids)
        except OSError:
            raise BenchError(f"an etcd member is gone: {self.cluster.members}") from None

    def leader(self) -> str:
        name: str = self.cluster.leader().name
        return name

    def move_leader(self, to: int) -> None:
        """Make member ``to`` (0-based) lead, if it does not already."""
        target = self.cluster.members[to]
        status = target.status()
        if status is None:
            raise BenchError(f"etcd member {target.name} does not answer")
        leader = self.cluster.leader()
        if leader.name == target.name:
            return
        request = urllib.request.Request(
            f"{leader.client_url}/v3/maintenance/transfer-leadership",
            data=json.dumps({"targetID": status["header"]["member_id"]}).encode(),
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()
        deadline = time.monotonic() + 15
        while self.leader() != target.name:
            if time.monotonic() > deadline:
                raise BenchError(f"etcd did not hand leadership to {target.name}")
            time.sleep(0.1)

    def calls(self) -> Counter[str]:
        """gRPC messages every member has received so far, by method (the JSON gateway turns
        each HTTP call into one)."""
        counts: Counter[str] = Counter()
        for url in self.cluster.endpoints:
            with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
                text = response.read().decode()
            for line in text.splitlines():
                if not line.startswith("grpc_server_msg_received_total{"):
                    continue
                labels, _, value = line.rpartition(" ")
                method = labels.partition('grpc_method="')[2].partition('"')[0]
                if method not in ("Check", "Status"):  # health probes and our own status calls
                    counts[method] += int(float(value))
        return counts

    def stop(self) -> None:
        stopped = False
        try:
            self._module.stop_cluster(self.directory)
            stopped = True
        finally:
            if self._watchdog.stdin is not None:
                with contextlib.suppress(OSError):
                    if stopped:
                        self._watchdog.stdin.write(b"stopped\n")
                    self._watchdog.stdin.close()
        try:
            self._watchdog.wait(timeout=WATCHDOG_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._watchdog.kill()
            self._watchdog.wait(timeout=5)


@dataclass
class Fleet:
    """What is under test: one registry on SQLite, or replicas on etcd."""

    store: str
    registries: list[Registry]
    etcd: EtcdMembers | None = None
    server_cpus: str = str(SERVER_CPU)

    @property
    def replicated(self) -> bool:
        return self.etcd is not None

    @property
    def ports(self) -> list[int]:
        return [r.port for r in self.registries]

    def registry_cpu(self) -> float:
        return sum(r.cpu_seconds() for r in self.registries)

    def etcd_cpu(self) -> float:
        return self.etcd.cpu_seconds() if self.etcd is not None else 0.0

    async def metrics(self) -> list[dict[str, float]]:
        return list(await asyncio.gather(*(asyncio.to_thread(r.metrics) for r in self.registries)))

    async def etcd_calls(self) -> Counter[str]:
        return await asyncio.to_thread(self.etcd.calls) if self.etcd is not None else Counter()

    def stop(self) -> None:
        for registry in self.registries:
            registry.stop()
        if self.etcd is not None:
            self.etcd.stop()


@dataclass
class CpuSample:
    """Everything CPU-related, read at one instant."""

    wall: float
    registry: float
    generator: float
    server_core: float
    client_core: float
    etcd: float = 0.0

    @classmethod
    def take(cls, fleet: Fleet) -> CpuSample:
        return cls(
            wall=time.monotonic(),
            registry=fleet.registry_cpu(),
            generator=_self_cpu_seconds(),
            server_core=core_busy_seconds(SERVER_CPU),
            client_core=core_busy_seconds(CLIENT_CPU),
            etcd=fleet.etcd_cpu(),
        )


@dataclass
class CpuDelta:
    seconds: float
    registry: float
    generator: float
    server_core_busy_pct: float
    client_core_busy_pct: float
    other_pct: float  # busy time of both cores that was neither the registry nor this script
    etcd: float = 0.0

    @classmethod
    def between(cls, a: CpuSample, b: CpuSample) -> CpuDelta:
        wall = max(b.wall - a.wall, 1e-9)
        registry = b.registry - a.registry
        generator = b.generator - a.generator
        etcd = b.etcd - a.etcd
        busy = (b.server_core - a.server_core) + (b.client_core - a.client_core)
        return cls(
            seconds=wall,
            registry=registry,
            generator=generator,
            server_core_busy_pct=100 * (b.server_core - a.server_core) / wall,
            client_core_busy_pct=100 * (b.client_core - a.client_core) / wall,
            other_pct=max(0.0, 100 * (busy - registry - etcd - generator) / wall),
            etcd=etcd,
        )

    @property
    def registry_pct(self) -> float:
        return 100 * self.registry / self.seconds

    @property
    def etcd_pct(self) -> float:
        return 100 * self.etcd / self.seconds

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
        self, instances: list[InstanceSpec], ports: list[int], period: float, connections: int
    ) -> None:
        self.instances = instances
        self.period = period
        # Several registries (replicas): the connections go to them in turn.
        self.connections = [Connection(ports[i % len(ports)]) for i in range(connections)]
        rng = random.Random(SEED)
        self.phases = sorted((rng.uniform(0, period), i) for i in range(len(instances)))
        self.queue: asyncio.Queue[tuple[Renewal, InstanceSpec]] = asyncio.Queue()
        self.issued: list[Renewal] = []
        self.reconnects = 0
        self.started_at = 0.0
        # Only instances[:active] renew (--find-max raises it as it registers more).
        self.active = len(instances)
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._dispatcher: asyncio.Task[None] | None = None

    async def open(self) -> None:
        await asyncio.gather(*(c.open() for c in self.connections))

    async def register_all(self) -> float:
        """Register every instance (closed loop over the pool); return the seconds it took."""
        return await register_over(self.instances, self.connections)

    def start(self) -> None:
        self.started_at = time.monotonic() + 0.05
        self._dispatcher = asyncio.create_task(self._dispatch())
        self._tasks = [self._dispatcher]
        self._tasks += [asyncio.create_task(self._work(c)) for c in self.connections]

    def set_active(self, count: int) -> None:
        """From now on, instances[:count] renew."""
        self.active = count
        if self._dispatcher is not None:
            # It may be waiting for the end of a cycle it found nothing to do in.
            self._dispatcher.cancel()
            self._dispatcher = asyncio.create_task(self._dispatch(time.monotonic()))
            self._tasks.append(self._dispatcher)

    async def _dispatch(self, since: float = 0.0) -> None:
        """Put each renewal scheduled from ``since`` on on the queue, at its time."""
        # time.monotonic(), not loop.time(): uvloop's clock only has millisecond resolution.
        for k in itertools.count(max(0, math.floor((since - self.started_at) / self.period))):
            base = self.started_at + k * self.period
            for phase, index in self.phases:
                if self._stop.is_set():
                    return
                if index >= self.active or base + phase < since:
                    continue
                when = base + phase
                delay = when - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                renewal = Renewal(when, time.monotonic())
                self.issued.append(renewal)
                self.queue.put_nowait((renewal, self.instances[index]))
            await _sleep_until(base + self.period)  # also when nothing was active

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
            count += sum(
                1 for phase, i in self.phases if i < self.active and start <= base + phase < end
            )
        return count


async def register_over(specs: list[InstanceSpec], connections: list[Connection]) -> float:
    """Register ``specs`` (closed loop over ``connections``); return the seconds it took."""
    todo = iter(specs)
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
    await asyncio.gather(*(worker(c) for c in connections))
    if failures:
        raise BenchError(f"{len(failures)} registrations failed, e.g. {failures[0]}")
    return time.monotonic() - start


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
    etcd_cpu_pct: float = 0.0
    etcd_cpu_us_per_renewal: float = 0.0
    etcd_calls_per_renewal: dict[str, float] = field(default_factory=dict)
    answered_ok: int = 0  # of the renewals scheduled in the window, those answered 200

    @property
    def answered_share(self) -> float:
        """Of the renewals scheduled in the window, the share answered 200 (by the figures)."""
        return self.answered_ok / max(self.scheduled, 1)


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
        etcd_cpu_pct=cpu.etcd_pct,
        etcd_cpu_us_per_renewal=1e6 * cpu.etcd / max(completed, 1),
        answered_ok=len(ok),
    )


def _per_renewal(calls: Counter[str], renewals: float) -> dict[str, float]:
    return {k: v / max(renewals, 1) for k, v in sorted(calls.items(), key=lambda kv: -kv[1]) if v}


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
    etcd_cpu_ms: float = 0.0


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
    # From the change's send, pooled, by the replica the watchers waited on (the change goes
    # through the first).
    by_replica: list[Latencies] = field(default_factory=list)


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


async def _wait_parked(registries: list[Registry], expected: list[int]) -> float:
    """Poll each registry's own gauge until its ``expected`` watchers wait; return how long it
    took."""
    start = time.monotonic()
    while True:
        metrics = await asyncio.gather(*(asyncio.to_thread(r.metrics) for r in registries))
        parked = [m.get("mesh_registry_watchers", 0.0) for m in metrics]
        if all(p >= e for p, e in zip(parked, expected, strict=True)):
            return time.monotonic() - start
        if time.monotonic() - start > PARK_TIMEOUT:
            raise BenchError(
                f"only {sum(parked):.0f} of {sum(expected)} watchers parked after"
                f" {PARK_TIMEOUT:.0f} s"
                + (f" (by replica: {parked} of {expected})" if len(registries) > 1 else "")
            )
        await asyncio.sleep(0.02)


async def watch_fanout(
    fleet: Fleet,
    service: str,
    count: int,
    changes: int,
    every: float,
    out: TextIO,
    *,
    label: str = "",
    probe_ttl: str = "60s",
) -> tuple[WatchFigures, CpuSample]:
    """``count`` watchers park on ``service``; ``changes`` times, one change wakes them.

    Changes are at least ``every`` s apart. Watchers go to the registries in turn; changes go
    through the first. Returns the figures and a CPU sample taken just before the first change
    was sent. ``label`` tells this call's changes from an earlier call's.
    """
    registries = fleet.registries
    registry = registries[0]
    port = registry.port
    watchers = [Watcher(registries[i % len(registries)].port, service) for i in range(count)]
    expected = [len(range(k, count, len(registries))) for k in range(len(registries))]
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
        by_replica: list[list[float]] = [[] for _ in registries]
        first: CpuSample | None = None
        last_sent = 0.0
        for change in range(1, changes + 1):
            tasks = [asyncio.create_task(w.poll("30s")) for w in watchers]
            parked = await _wait_parked(registries, expected)
            if change > 1:
                await _sleep_until(last_sent + every)
            body = json.dumps(
                {
                    "address": "10.255.0.1",
                    "port": 9999,
                    "version": "v1",
                    "metadata": {"change": f"{label}{change}"},
                    "ttl": probe_ttl,
                },
                separators=(",", ":"),
            ).encode()
            raw = _request("PUT", f"/v1/catalog/services/{service}/instances/probe", port, body)
            if first is None:
                first = CpuSample.take(fleet)
            cpu_before = fleet.registry_cpu()
            etcd_before = fleet.etcd_cpu()
            sent = time.monotonic()
            last_sent = sent
            status, _, answer = await change_conn.request(raw)
            acked = time.monotonic()
            if status != 200:
                raise BenchError(f"the change was refused: HTTP {status} {answer[:200]!r}")
            change_index = int(json.loads(answer)["index"])
            done, pending = await asyncio.wait(tasks, timeout=WAKE_TIMEOUT)
            cpu_after = fleet.registry_cpu()
            etcd_after = fleet.etcd_cpu()
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            from_send: list[float] = []
            from_ack: list[float] = []
            for n, (watcher, task) in enumerate(zip(watchers, tasks, strict=True)):
                result = task.result() if task in done and task.exception() is None else None
                if result is not None:
                    arrived, poll_status, index = result
                    if poll_status == 200:
                        watcher.index = index
                    if poll_status == 200 and index >= change_index and arrived >= sent:
                        from_send.append(arrived - sent)
                        # The watcher's answer may be read before the acknowledgment is.
                        from_ack.append(max(0.0, arrived - acked))
                        by_replica[n % len(registries)].append(arrived - sent)
                        continue
                from_send.append(math.inf)
                from_ack.append(math.inf)
                by_replica[n % len(registries)].append(math.inf)
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
                etcd_cpu_ms=1000 * (etcd_after - etcd_before),
            )
            figures.changes.append(result_figures)
            all_send += from_send
            all_ack += from_ack
            cpu = (
                f"registries' CPU {result_figures.registry_cpu_ms:.0f} ms,"
                f" etcd {result_figures.etcd_cpu_ms:.0f} ms"
                if fleet.replicated
                else f"registry CPU {result_figures.registry_cpu_ms:.0f} ms"
            )
            print(
                f"  change {change}: woke {woke}/{count}  from send:"
                f" {result_figures.from_send.line()}  (ack {result_figures.ack_ms:.1f} ms;"
                f" {cpu}; all parked {parked:.2f} s after re-arming)",
                file=out,
                flush=True,
            )
        figures.woke = sum(c.woke for c in figures.changes)
        figures.expected = count * changes
        figures.from_send = Latencies.of(all_send)
        figures.from_ack = Latencies.of(all_ack)
        if fleet.replicated:
            figures.by_replica = [Latencies.of(x) for x in by_replica]
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
class Round:
    """Renewals, then the watch fan-out, at one renewal rate."""

    rate: float
    renewals: RenewalFigures
    watch: WatchFigures
    bars: dict[str, bool]


@dataclass
class FindMaxStep:
    rate: float
    renewals: RenewalFigures
    sustained: bool
    missed: str  # why the rate was not sustained ("" if it was)
    attempt: int = 1  # a step that misses is measured once more


@dataclass
class FindMax:
    steps: list[FindMaxStep] = field(default_factory=list)
    best: FindMaxStep | None = None
    ended: str = ""


@dataclass
class Results:
    config: dict[str, Any]
    registration_seconds: float = 0.0
    renewals: RenewalFigures | None = None  # the first round's
    watch: WatchFigures | None = None
    expiries: float = 0.0
    instances_at_end: int = 0
    bars: dict[str, bool] = field(default_factory=dict)
    store: str = "sqlite"
    rounds: list[Round] = field(default_factory=list)
    find_max: FindMax | None = None
    # etcd: every replica's count at the end, and renewals whose lease was gone (answered by
    # registering the instance again).
    instances_by_replica: list[int] = field(default_factory=list)
    renewals_reregistered: int = 0
    log_warnings: list[str] = field(default_factory=list)


async def _sleep_until(when: float) -> None:
    await asyncio.sleep(max(0.0, when - time.monotonic()))


def _store_label(fleet: Fleet) -> str:
    if not fleet.replicated:
        return "SQLite, 1 registry"
    return f"etcd, {len(fleet.registries)} replicas"


async def _registered_everywhere(fleet: Fleet, expected: int) -> float:
    """Wait until every registry holds ``expected`` instances; return how long it took."""
    start = time.monotonic()
    while True:
        health = await asyncio.gather(
            *(asyncio.to_thread(r.get_json, "/healthz") for r in fleet.registries)
        )
        counts = [h.get("instances") for h in health]
        if all(c == expected for c in counts):
            return time.monotonic() - start
        if not fleet.replicated or time.monotonic() - start > CATCH_UP_TIMEOUT:
            raise BenchError(f"registered {expected}, the registries hold {counts}")
        await asyncio.sleep(0.1)


async def _registrations(fleet: Fleet) -> float:
    return sum(m.get("mesh_registry_registrations_total", 0.0) for m in await fleet.metrics())


async def run(args: argparse.Namespace, fleet: Fleet, out: TextIO) -> Results:
    results = Results(config=_config(args, fleet), store=fleet.store)
    changes_sent = 0
    if args.find_max:
        results.find_max, registered = await find_max(args, fleet, results, out)
    else:
        registered = args.instances
        await _rounds(args, fleet, results, out)
        changes_sent = args.changes * len(results.rounds)
    metrics = await fleet.metrics()
    results.instances_at_end = int(metrics[0].get("mesh_registry_instances", 0))
    if fleet.replicated:
        results.instances_by_replica = [int(m.get("mesh_registry_instances", 0)) for m in metrics]
        # Replicas do not expire instances: etcd ends the lease and every replica's watch
        # removes the instance (and logs it).
        results.expiries = max(len(r.log_lines("instance_removed")) for r in fleet.registries)
        registrations = sum(m.get("mesh_registry_registrations_total", 0.0) for m in metrics)
        results.renewals_reregistered = int(registrations) - registered - changes_sent
        results.log_warnings = [
            line for r in fleet.registries for line in r.log_lines("[warning", "[error")
        ]
        counts = " / ".join(f"{c:,}" for c in results.instances_by_replica)
        warnings = (
            f"; the replicas logged {len(results.log_warnings)} warnings or errors, e.g.:"
            f" {results.log_warnings[0][:300]}"
            if results.log_warnings
            else "; the replicas logged no warning"
        )
        print(
            f"at the end: {counts} instances on the replicas, {results.expiries:.0f} lease"
            f" expiries (instances removed), {results.renewals_reregistered} renewals found"
            f" their lease gone{warnings}",
            file=out,
        )
    else:
        results.expiries = metrics[0].get("mesh_registry_expiries_total", math.nan)
        print(
            f"at the end: {results.instances_at_end:,} instances registered,"
            f" {results.expiries:.0f} lease expiries",
            file=out,
        )
    multi = len(results.rounds) > 1
    for round_ in results.rounds:
        suffix = f"@{round_.rate:g}" if multi else ""
        results.bars.update({f"{name}{suffix}": met for name, met in round_.bars.items()})
    results.bars["no_expiries"] = results.expiries == 0
    return results


async def _rounds(args: argparse.Namespace, fleet: Fleet, results: Results, out: TextIO) -> None:
    """Register ``args.instances``, then renewals and the watch fan-out at each rate."""
    instances = make_instances(args.instances, args.services, fleet.ports[0], args.ttl)
    first_period = args.instances / args.rate_list[0]
    load = RenewalLoad(instances, fleet.ports, first_period, args.connections)
    await load.open()
    try:
        results.registration_seconds = await load.register_all()
        caught_up = await _registered_everywhere(fleet, args.instances)
        per_second = args.instances / results.registration_seconds
        if fleet.replicated:
            print(
                f"registered {args.instances:,} instances of {args.services} services in"
                f" {results.registration_seconds:.1f} s through {len(fleet.registries)} replicas"
                f" (not timed: {per_second:.0f}/s, each one an etcd lease grant and a put,"
                " answered once the replica's watch applied it); every replica held them all"
                f" {caught_up:.2f} s later",
                file=out,
                flush=True,
            )
            await _print_etcd_layout(fleet, out)
        else:
            print(
                f"registered {args.instances:,} instances of {args.services} services in"
                f" {results.registration_seconds:.1f} s (not timed:"
                f" {per_second:.0f}/s, each one a store commit)",
                file=out,
                flush=True,
            )
        if results.registration_seconds + first_period > args.ttl_seconds:
            raise BenchError(
                f"registering took {results.registration_seconds:.0f} s: the first leases"
                f" ({args.ttl}) would run out before their first renewal; raise --ttl"
            )
        for n, rate in enumerate(args.rate_list):
            if n > 0:
                await load.stop()
                load = RenewalLoad(instances, fleet.ports, args.instances / rate, args.connections)
                await load.open()
            results.rounds.append(await measure_round(args, fleet, load, rate, n, out))
        results.renewals = results.rounds[0].renewals
        results.watch = results.rounds[0].watch
    finally:
        await load.stop()


async def _print_etcd_layout(fleet: Fleet, out: TextIO) -> None:
    assert fleet.etcd is not None
    leader = await asyncio.to_thread(fleet.etcd.leader)
    names = {m.client_url: m.name for m in fleet.etcd.cluster.members}
    health = await asyncio.gather(
        *(asyncio.to_thread(r.get_json, "/healthz") for r in fleet.registries)
    )
    used = [names.get(h.get("replica", {}).get("etcd_endpoint", ""), "?") for h in health]
    leads = [n + 1 for n, h in enumerate(health) if h.get("replica", {}).get("leader")]
    print(
        f"etcd: {leader} leads the members; replicas 1-{len(fleet.registries)} call etcd"
        f" through {', '.join(used)}; replica {leads[0] if leads else '?'} leads the replicas",
        file=out,
        flush=True,
    )


async def measure_window(
    fleet: Fleet, load: RenewalLoad, w0: float, w1: float, rate: float
) -> RenewalFigures:
    """The renewals ``load`` made from ``w0`` to ``w1`` (monotonic), with the servers' CPU and
    the etcd calls over that window."""
    await _sleep_until(w0)
    calls0 = await fleet.etcd_calls()
    c0 = CpuSample.take(fleet)
    await _sleep_until(w1)
    c1 = CpuSample.take(fleet)
    calls1 = await fleet.etcd_calls()
    await asyncio.sleep(1.0)  # the window's last renewals are answered meanwhile
    figures = renewal_figures(load, w0, w1, CpuDelta.between(c0, c1), rate)
    figures.etcd_calls_per_renewal = _per_renewal(
        calls1 - calls0, figures.completed_per_second * figures.seconds
    )
    return figures


async def measure_round(
    args: argparse.Namespace, fleet: Fleet, load: RenewalLoad, rate: float, n: int, out: TextIO
) -> Round:
    """Renewals at ``rate`` (``load``, not started yet), then the watch fan-out under them."""
    load.start()
    w0 = load.started_at + args.warmup
    renewals = await measure_window(fleet, load, w0, w0 + args.seconds, rate)
    spread = f", round-robin over {len(fleet.registries)} replicas" if fleet.replicated else ""
    print(
        f"renewals: {args.instances:,} instances every {load.period:g} s (open loop, random"
        f" phases), {args.connections} keep-alive connections{spread}, {args.warmup:g} s"
        f" warm-up + {renewals.seconds:.0f} s measured",
        file=out,
    )
    _print_renewals(renewals, out, fleet=fleet)

    print(
        f"watch fan-out: {args.watchers} watchers, each on its own connection, long-poll"
        f" svc-00{_watch_spread(fleet)}; {args.changes} changes, {args.change_every:g} s apart;"
        f" renewals continue at {rate:.0f}/s",
        file=out,
        flush=True,
    )
    watch, c2 = await watch_fanout(
        fleet,
        "svc-00",
        args.watchers,
        args.changes,
        args.change_every,
        out,
        label=f"{n}." if n else "",
        probe_ttl="60s" if len(args.rate_list) == 1 else f"{MAX_TTL_SECONDS:.0f}s",
    )
    we = time.monotonic()
    c3 = CpuSample.take(fleet)
    await asyncio.sleep(1.0)
    meanwhile = renewal_figures(load, c2.wall, we, CpuDelta.between(c2, c3), rate)
    watch.renewals_meanwhile = meanwhile
    _print_watch(watch, out, fleet=fleet)
    bars = {
        "renewal_p99_under_50ms": renewals.latency.p99_ms < RENEWAL_P99_BAR_MS,
        "generator_kept_up": renewals.generator_kept_up,
        "watch_p99_under_1s": watch.from_send is not None
        and watch.from_send.p99_ms < WATCH_P99_BAR_MS,
        "every_watcher_woke": watch.woke == watch.expected,
    }
    return Round(rate, renewals, watch, bars)


def _watch_spread(fleet: Fleet) -> str:
    if not fleet.replicated:
        return ""
    return (
        f" (round-robin over the {len(fleet.registries)} replicas; every change through replica 1)"
    )


def _find_max_rates(start: float, stop: float) -> list[float]:
    rates: list[float] = []
    rate = start
    while rate <= stop * 1.0001 and len(rates) < FIND_MAX_STEPS:
        rates.append(_round_rate(rate))
        rate *= FIND_MAX_FACTOR
    return rates


def _round_rate(rate: float) -> float:
    return float(round(rate))


def _missed(r: RenewalFigures) -> str:
    """Why a find-max step did not sustain its rate ("" if it did)."""
    reasons = []
    if not r.generator_kept_up:
        reasons.append("the generator fell behind (its limit, not the registry's)")
    if r.errors:
        reasons.append(f"{r.errors} renewals failed")
    if r.answered_share < ANSWERED_SHARE:
        reasons.append(f"answered {100 * r.answered_share:.1f}% < {100 * ANSWERED_SHARE:.0f}%")
    if not r.latency.p99_ms < RENEWAL_P99_BAR_MS:
        reasons.append(f"p99 {_fmt_ms(r.latency.p99_ms).strip()} >= {RENEWAL_P99_BAR_MS:.0f} ms")
    return "; ".join(reasons)


async def _queue_drained(load: RenewalLoad, within: float) -> None:
    """Wait (at most ``within`` s) until no renewal waits for a connection."""
    deadline = time.monotonic() + within
    while True:
        if not load.queue.qsize() or time.monotonic() >= deadline:
            return
        await asyncio.sleep(0.01)


async def find_max(
    args: argparse.Namespace, fleet: Fleet, results: Results, out: TextIO
) -> tuple[FindMax, int]:
    """Renewals only, every ``args.period`` s, one open-loop load that never stops: each step
    registers more instances (not timed; the load runs meanwhile), waits until no renewal is
    queued, and measures. Ends at the first step that misses. Returns the figures and how
    many instances were registered."""
    result = FindMax()
    rates = _find_max_rates(args.find_max_from, args.find_max_to)
    counts = [max(1, round(rate * args.period)) for rate in rates]
    specs = make_instances(counts[-1], args.services, fleet.ports[0], args.ttl)
    print(
        f"find-max: renewals only, every {args.period:g} s (lease {args.ttl}), open loop,"
        f" {args.connections} keep-alive connections{_spread(fleet)}; each step registers more"
        f" instances (not timed; renewals go on meanwhile), waits until no renewal is queued,"
        f" then {args.step_warmup:g} s warm-up + {args.step_seconds:g} s measured; rates"
        f" x{FIND_MAX_FACTOR:g} from {rates[0]:.0f}/s up to {rates[-1]:.0f}/s; a step sustains"
        f" its rate when p99 < {RENEWAL_P99_BAR_MS:.0f} ms, >= {100 * ANSWERED_SHARE:.0f}% of"
        " its renewals are answered within a second of the window, none failed and the"
        " generator kept to its schedule",
        file=out,
        flush=True,
    )
    ports = fleet.ports
    load = RenewalLoad(specs, ports, args.period, args.connections)
    load.active = 0
    registering = [Connection(ports[i % len(ports)]) for i in range(args.connections)]
    await load.open()
    await asyncio.gather(*(c.open() for c in registering))
    load.start()
    registered = 0
    try:
        for rate, count in zip(rates, counts, strict=True):
            added = count - load.active
            took = await register_over(specs[load.active : count], registering)
            registered = count
            results.registration_seconds += took
            if load.active == 0:
                await _registered_everywhere(fleet, count)
                if fleet.replicated:
                    await _print_etcd_layout(fleet, out)
            if took + args.period > args.ttl_seconds:
                result.ended = (
                    f"registering {added:,} instances for {rate:.0f}/s took {took:.0f} s: their"
                    f" first leases ({args.ttl}) could run out before their first renewal"
                )
                break
            load.set_active(count)
            size = f"{count:,} instances (+{added:,} in {took:.1f} s)"
            for attempt in (1, 2):
                # The generator keeps a record of every renewal (a million by the high steps):
                # a full collection over them stalled its dispatcher ~100 ms in a window. Move
                # what is there out of the collector's reach, before the warm-up.
                gc.collect()
                gc.freeze()
                await _queue_drained(load, DRAIN_TIMEOUT)
                w0 = time.monotonic() + args.step_warmup
                figures = await measure_window(
                    fleet, load, w0, w0 + args.step_seconds, count / args.period
                )
                missed = _missed(figures)
                step = FindMaxStep(count / args.period, figures, not missed, missed, attempt)
                result.steps.append(step)
                _print_step(step, fleet, size if attempt == 1 else "once more", out)
                if not missed:
                    break
            if missed:
                result.ended = f"{step.rate:.0f}/s was not sustained"
                break
            result.best = step
        else:
            result.ended = f"every rate up to {rates[-1]:.0f}/s was sustained"
    finally:
        await load.stop()
        for conn in registering:
            conn.close()
    best = result.best
    if best is not None:
        print(
            f"  sustained: {best.rate:.0f} renewals/s (answered"
            f" {best.renewals.completed_per_second:.1f}/s,"
            f" p50 {_fmt_ms(best.renewals.latency.p50_ms).strip()},"
            f" p99 {_fmt_ms(best.renewals.latency.p99_ms).strip()}); {result.ended}",
            file=out,
            flush=True,
        )
    else:
        print(f"  sustained: none; {result.ended}", file=out, flush=True)
    return result, registered


def _spread(fleet: Fleet) -> str:
    return f", round-robin over {len(fleet.registries)} replicas" if fleet.replicated else ""


def _print_step(step: FindMaxStep, fleet: Fleet, size: str, out: TextIO) -> None:
    r = step.renewals
    cpu = f"registry {r.registry_cpu_us_per_renewal:.0f} us per renewal"
    if fleet.replicated:
        lookups = r.etcd_calls_per_renewal.get("LeaseTimeToLive", 0.0)
        cpu = (
            f"registries {r.registry_cpu_us_per_renewal:.0f} us"
            f" + etcd {r.etcd_cpu_us_per_renewal:.0f} us per renewal, lease look-ups"
            f" {lookups:.2f} per renewal"
        )
    print(
        f"  {step.rate:6.0f}/s, {size}: answered {r.completed_per_second:7.1f}/s"
        f" ({100 * r.answered_share:5.1f}%)  p50 {_fmt_ms(r.latency.p50_ms)}"
        f"  p99 {_fmt_ms(r.latency.p99_ms)}  errors {r.errors}  {cpu};"
        f" busy: core 0 {r.server_core_busy_pct:.0f}%, core 1 {r.client_core_busy_pct:.0f}%"
        f" (generator {r.generator_cpu_pct:.0f}%, lag p99 {r.dispatch_lag_p99_ms:.1f} ms)"
        f" -> {'sustained' if step.sustained else 'NOT sustained: ' + step.missed}",
        file=out,
        flush=True,
    )
    if r.other_load_pct > OTHER_LOAD_PCT:
        print(
            f"  WARNING: other processes used {r.other_load_pct:.0f}% of a core meanwhile",
            file=out,
            flush=True,
        )


def _core_busy(r: RenewalFigures, fleet: Fleet | None) -> str:
    if fleet is not None and fleet.server_cpus != str(SERVER_CPU):
        return (
            f"cores {SERVER_CPU} and {CLIENT_CPU} busy {r.server_core_busy_pct:.0f}% and"
            f" {r.client_core_busy_pct:.0f}%"
        )
    return f"core {SERVER_CPU} busy {r.server_core_busy_pct:.0f}%"


def _print_renewals(
    r: RenewalFigures, out: TextIO, *, only_renewals: bool = True, fleet: Fleet | None = None
) -> None:
    errors = ", ".join(f"{k}: {v}" for k, v in r.error_kinds.items()) or "none"
    print(
        f"  target {r.target_per_second:.1f}/s  sent {r.sent_per_second:.1f}/s"
        f"  answered {r.completed_per_second:.1f}/s  ({r.scheduled:,} scheduled in the window;"
        f" errors {r.errors} [{errors}]; reconnects {r.reconnects})",
        file=out,
    )
    print(f"  latency from the scheduled send:  {r.latency.line()}", file=out)
    print(f"  from the write on the socket:     {r.service.line()}", file=out)
    if fleet is not None and fleet.replicated:
        assert fleet.etcd is not None
        replicas, members = len(fleet.registries), len(fleet.etcd.pids)
        if only_renewals:
            print(
                f"  registries' CPU ({replicas} replicas) {r.registry_cpu_pct:.1f}% of a core ="
                f" {r.registry_cpu_us_per_renewal:.0f} us per renewal; etcd ({members} members)"
                f" {r.etcd_cpu_pct:.1f}% = {r.etcd_cpu_us_per_renewal:.0f} us per renewal"
                f"  ({_core_busy(r, fleet)})",
                file=out,
            )
            calls = ", ".join(f"{k} {v:.2f}" for k, v in r.etcd_calls_per_renewal.items())
            print(f"  etcd calls per renewal answered (all members): {calls}", file=out)
        else:
            print(
                f"  registries' CPU {r.registry_cpu_pct:.1f}% of a core, etcd"
                f" {r.etcd_cpu_pct:.1f}% (renewals, watch answers and changes)"
                f"  ({_core_busy(r, fleet)})",
                file=out,
            )
    else:
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


def _print_watch(w: WatchFigures, out: TextIO, *, fleet: Fleet | None = None) -> None:
    assert w.from_send is not None and w.from_ack is not None
    assert w.renewals_meanwhile is not None
    print(
        f"  pooled: woke {w.woke}/{w.expected} ({w.instances} instances,"
        f" {w.answer_bytes / 1024:.0f} KiB per answer)",
        file=out,
    )
    print(f"    from the change's send:  {w.from_send.line()}", file=out)
    print(f"    from its acknowledgment: {w.from_ack.line()}", file=out)
    for n, latencies in enumerate(w.by_replica, start=1):
        through = "the change went through it" if n == 1 else "woken by its etcd watch"
        print(
            f"    watchers on replica {n} ({through}), from the send: {latencies.line()}",
            file=out,
        )
    print(
        f"renewals from the first change to the last answer ({w.renewals_meanwhile.seconds:.1f}"
        " s; no bar):",
        file=out,
    )
    _print_renewals(w.renewals_meanwhile, out, only_renewals=False, fleet=fleet)


# -- side by side ----------------------------------------------------------------------------

TABLE_COLUMNS = (
    "store",
    "rate target",
    "answered/s",
    "p50",
    "p99",
    "registry CPU/renewal",
    "etcd CPU/renewal",
    "watch fan-out p99",
    "every watcher woke",
)


def _table_rows(results: Results) -> list[dict[str, str]]:
    label = results.config["store_label"]
    replicated = results.store == "etcd"

    def row(rate: str, r: RenewalFigures, watch: WatchFigures | None) -> dict[str, str]:
        woke = "-"
        watch_p99 = "-"
        if watch is not None and watch.from_send is not None:
            watch_p99 = _fmt_ms(watch.from_send.p99_ms).strip()
            woke = (
                f"{'yes' if watch.woke == watch.expected else 'NO'} ({watch.woke}/{watch.expected})"
            )
        return dict(
            zip(
                TABLE_COLUMNS,
                (
                    label,
                    rate,
                    f"{r.completed_per_second:.1f}",
                    _fmt_ms(r.latency.p50_ms).strip(),
                    _fmt_ms(r.latency.p99_ms).strip(),
                    f"{r.registry_cpu_us_per_renewal:.0f} us",
                    f"{r.etcd_cpu_us_per_renewal:.0f} us" if replicated else "-",
                    watch_p99,
                    woke,
                ),
                strict=True,
            )
        )

    rows = [row(f"{x.rate:.0f}/s", x.renewals, x.watch) for x in results.rounds]
    if results.find_max is not None:
        best = results.find_max.best
        if best is not None:
            rows.append(row(f"{best.rate:.0f}/s (highest sustained)", best.renewals, None))
        elif results.find_max.steps:
            first = results.find_max.steps[0]
            rows.append(row(f"{first.rate:.0f}/s (NOT sustained)", first.renewals, None))
    return rows


def _print_table(rows: list[dict[str, str]], out: TextIO) -> None:
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in TABLE_COLUMNS}
    print("| " + " | ".join(c.ljust(widths[c]) for c in TABLE_COLUMNS) + " |", file=out)
    print("|" + "|".join("-" * (widths[c] + 2) for c in TABLE_COLUMNS) + "|", file=out)
    for r in rows:
        print("| " + " | ".join(r[c].ljust(widths[c]) for c in TABLE_COLUMNS) + " |", file=out)


def _config(args: argparse.Namespace, fleet: Fleet) -> dict[str, Any]:
    config = {
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
    config |= {
        "store": fleet.store,
        "store_label": _store_label(fleet),
        "replicas": len(fleet.registries),
        "server_cpus": fleet.server_cpus,
        "rates": args.rate_list,
    }
    if args.find_max:
        config |= {
            "find_max_from": args.find_max_from,
            "find_max_to": args.find_max_to,
            "step_seconds": args.step_seconds,
            "step_warmup_seconds": args.step_warmup,
        }
    if fleet.etcd is not None:
        config |= {
            "etcd": fleet.etcd.version,
            "etcd_members": len(fleet.etcd.pids),
            "etcd_leader": args.etcd_leader,
        }
    return config


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


def _ttl_seconds(text: str) -> float:
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    for unit in ("ms", "s", "m", "h"):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * units[unit]
    return float(text)


def _lease(args: argparse.Namespace, store: str) -> tuple[str, float, str]:
    """The instances' TTL for ``store``: the one asked for, by default 30s (on etcd 120s, long
    enough for registering 10,000 instances there, except with --find-max, which registers a
    few at a time), raised if a renewal period needs more; and a note saying so, or ""."""
    ttl = args.ttl or ("30s" if args.find_max else DEFAULT_TTL[store])
    seconds = _ttl_seconds(ttl)
    # A lease must outlive the longest renewal period, with room for a change of rate between
    # rounds.
    longest = args.period if args.find_max else max(args.instances / r for r in args.rate_list)
    needed = TTL_PERIODS * longest
    if seconds >= needed:
        return ttl, seconds, ""
    if needed > MAX_TTL_SECONDS:
        raise ValueError(f"the longest renewal period ({longest:g} s) needs a lease over 600 s")
    note = (
        f"lease ttl raised from {ttl} to {needed:.0f}s ({TTL_PERIODS} renewal periods of the"
        f" slowest rate, {longest:g} s)"
    )
    return f"{needed:.0f}s", needed, note


def start_fleet(store: str, args: argparse.Namespace, tmp: Path, fleet: Fleet) -> None:
    """Start what ``fleet`` (empty) is to hold; what started is in it even on failure."""
    if store == "sqlite":
        registry = Registry(tmp / "data", tmp / "registry.log")
        fleet.registries.append(registry)
        health = registry.wait_ready()
        if not health.get("dev_mode"):
            raise BenchError(f"the registry is not in dev mode: {health}")
        return
    cpus = {SERVER_CPU} if args.server_cpus == str(SERVER_CPU) else {SERVER_CPU, CLIENT_CPU}
    fleet.etcd = EtcdMembers(tmp / "etcd", cpus, remove=tmp)
    # Every replica calls the first endpoint (m1) until it fails; a keepalive reaching a
    # follower is forwarded to the leader, which costs etcd about half as much again. Which
    # member wins the election is luck, so the leader is placed.
    fleet.etcd.move_leader(0 if args.etcd_leader == "first" else 1)
    key_file = tmp / "store.key"
    descriptor = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as key:
        key.write(base64.b64encode(os.urandom(32)).decode() + "\n")
    url = f"etcd://{fleet.etcd.hosts}/mesh-bench-{os.getpid()}-{time.time_ns()}"
    for n in range(1, args.replicas + 1):
        registry = Registry(
            tmp / f"data-{n}",
            tmp / f"registry-{n}.log",
            store=["--store", url, "--store-key-file", str(key_file)],
            cpus=args.server_cpus,
        )
        fleet.registries.append(registry)
        # One after the other: the first creates the signing key and the CA root.
        health = registry.wait_ready()
        if not health.get("dev_mode") or "replica" not in health:
            raise BenchError(f"replica {n} is not a replica in dev mode: {health}")


def run_store(store: str, args: argparse.Namespace, out: TextIO) -> Results:
    """Start the processes for ``store``, run the benchmark on them, stop them for certain."""
    rounds = len(args.rate_list)
    budget = (
        300
        + (args.instances / 50 if store == "etcd" else 0)  # registration: ~10x slower on etcd
        + rounds
        * (
            args.warmup
            + args.seconds
            + args.changes * (PARK_TIMEOUT + WAKE_TIMEOUT + args.change_every)
            + DRAIN_TIMEOUT
        )
        + (
            FIND_MAX_STEPS * (args.step_warmup + args.step_seconds + 2 + DRAIN_TIMEOUT)
            + args.find_max_to * args.period / 50  # registering, up to ~50/s on etcd
        )
        * args.find_max
    )
    args = argparse.Namespace(**vars(args))
    args.ttl, args.ttl_seconds, args.ttl_note = _lease(args, store)
    if args.find_max_from is None:
        args.find_max_from = min(FIND_MAX_FROM[store], args.find_max_to)
    fleet = Fleet(store, [], server_cpus=args.server_cpus if store == "etcd" else str(SERVER_CPU))
    with tempfile.TemporaryDirectory(prefix="mesh-bench-registry-") as tmp:
        try:
            start_fleet(store, args, Path(tmp), fleet)
            os.sched_setaffinity(0, {CLIENT_CPU})
            if fleet.etcd is not None:
                replicas = ", ".join(str(r.pid) for r in fleet.registries)
                members = ", ".join(str(pid) for pid in fleet.etcd.pids)
                where = (
                    f"all on CPU {SERVER_CPU}"
                    if fleet.server_cpus == str(SERVER_CPU)
                    else f"on CPUs {fleet.server_cpus} (not pinned)"
                )
                print(
                    f"{len(fleet.registries)} registry replicas (--dev: no join tokens) pids"
                    f" {replicas} and {len(fleet.etcd.pids)} etcd members ({fleet.etcd.version},"
                    f" data in {tempfile.gettempdir()}) pids {members}, {where}; generator"
                    f" (asyncio on uvloop, HTTP/1.1 by hand) on CPU {CLIENT_CPU}; instances'"
                    f" lease {args.ttl}; python {sys.version.split()[0]}, load average"
                    f" {os.getloadavg()[0]:.2f}",
                    file=out,
                    flush=True,
                )
            else:
                print(
                    f"registry (--dev: no join tokens) pid {fleet.registries[0].pid} on CPU"
                    f" {SERVER_CPU}, generator (asyncio on uvloop, HTTP/1.1 by hand) on CPU"
                    f" {CLIENT_CPU}; python {sys.version.split()[0]}, load average"
                    f" {os.getloadavg()[0]:.2f}",
                    file=out,
                    flush=True,
                )
            if args.ttl_note:
                print(args.ttl_note, file=out, flush=True)

            async def bounded() -> Results:
                async with asyncio.timeout(budget):
                    return await run(args, fleet, out)

            return uvloop.run(bounded())
        except TimeoutError:
            raise BenchError(f"did not finish within {budget:.0f} s") from None
        except BaseException:
            for n, registry in enumerate(fleet.registries, start=1):
                name = "registry" if len(fleet.registries) == 1 else f"replica {n}"
                print(f"{name} log (tail):\n{registry.log_tail()}", file=sys.stderr)
            raise
        finally:
            fleet.stop()


BAR_LINES = {
    "renewal_p99_under_50ms": f"renewal p99 < {RENEWAL_P99_BAR_MS:.0f} ms",
    "generator_kept_up": "the generator kept to its schedule",
    "watch_p99_under_1s": f"watch p99 < {WATCH_P99_BAR_MS / 1000:.0f} s from the change",
    "every_watcher_woke": "every watcher woke",
    "no_expiries": "no lease expired",
}


def _bar_line(key: str) -> str:
    name, _, rate = key.partition("@")
    return BAR_LINES[name] + (f" at {rate}/s" if rate else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=30, help="measured renewal seconds")
    parser.add_argument("--warmup", type=float, default=5, help="renewal warm-up seconds")
    parser.add_argument("--instances", type=int, default=10_000)
    parser.add_argument("--services", type=int, default=50)
    parser.add_argument("--period", type=float, default=10.0, help="seconds between renewals")
    parser.add_argument(
        "--ttl", default=None, help="the instances' lease (default 30s; etcd: 120s, see README)"
    )
    parser.add_argument("--connections", type=int, default=48, help="renewal connections")
    parser.add_argument("--watchers", type=int, default=500)
    parser.add_argument("--changes", type=int, default=5)
    parser.add_argument(
        "--change-every", type=float, default=3.0, help="seconds from one change to the next"
    )
    parser.add_argument("--no-check", action="store_true", help="print only; exit 0")
    parser.add_argument("--json", action="store_true", help="write the figures as JSON to stdout")
    parser.add_argument(
        "--store",
        choices=STORES,
        default="sqlite",
        help="sqlite: one registry (default); etcd: replicas on a 3-member etcd cluster",
    )
    parser.add_argument("--replicas", type=int, default=3, help="etcd: registry replicas")
    parser.add_argument(
        "--server-cpus",
        choices=(str(SERVER_CPU), f"{SERVER_CPU},{CLIENT_CPU}"),
        default=str(SERVER_CPU),
        help=f"etcd: the CPUs of the replicas and etcd members (default {SERVER_CPU}, as the"
        f" SQLite registry; '{SERVER_CPU},{CLIENT_CPU}' shares the generator's CPU with them)",
    )
    parser.add_argument(
        "--etcd-leader",
        choices=("follower", "first"),
        default="follower",
        help="etcd: the member every replica calls first (m1) is a follower (default; m2"
        " leads) or the leader",
    )
    parser.add_argument(
        "--compare",
        action="store_true",
        help="run SQLite, then etcd, and print them side by side",
    )
    parser.add_argument(
        "--rates",
        default=None,
        help="renewal rates, comma-separated (default: instances / period); each runs both"
        " phases on the same instances",
    )
    parser.add_argument(
        "--find-max",
        action="store_true",
        help="renewals only: register more instances step by step (renewing every --period s)"
        " until p99 >= 50 ms or renewals are lost; --instances is not used",
    )
    parser.add_argument(
        "--find-max-from", type=float, default=None, help="first rate (/s; SQLite 250, etcd 100)"
    )
    parser.add_argument("--find-max-to", type=float, default=6000.0, help="highest rate (/s)")
    parser.add_argument("--step-seconds", type=float, default=8.0, help="find-max: measured")
    parser.add_argument("--step-warmup", type=float, default=2.0, help="find-max: warm-up")
    args = parser.parse_args(argv)
    try:
        args.rate_list = (
            [float(x) for x in args.rates.split(",")]
            if args.rates
            else [args.instances / args.period]
        )
        if args.ttl is not None:
            _ttl_seconds(args.ttl)
    except ValueError:
        parser.error("--rates and --ttl must be numbers (a TTL may end in ms, s, m or h)")
    if not (
        1 <= args.seconds <= 600
        and 0 <= args.warmup <= 60
        and 1 <= args.services <= 100 <= args.instances <= 100_000
        and 1 <= args.period <= 60
        and 1 <= args.connections <= 256
        and 1 <= args.watchers <= 2000
        and 1 <= args.changes <= 50
        and 0 <= args.change_every <= 30
        and 1 <= args.replicas <= 5
        and 1 <= len(args.rate_list) <= 5
        and all(1 <= args.instances / r <= 120 for r in args.rate_list)
        and 10 <= (args.find_max_from or 100) <= args.find_max_to <= 20_000
        and (not args.find_max or args.find_max_to * args.period <= 100_000)
        and 1 <= args.step_seconds <= 60
        and 0 <= args.step_warmup <= 30
    ):
        parser.error("a value is out of range (see --help)")
    if args.find_max and args.rates:
        parser.error("--find-max chooses its own rates; --rates is for the phases")
    # The lowest rate first: a rate the registry cannot sustain leaves it busy for a while.
    args.rate_list.sort()
    stores = list(STORES) if args.compare else [args.store]
    try:
        for store in stores:
            _lease(args, store)
    except ValueError as exc:
        parser.error(str(exc))
    out: TextIO = sys.stderr if args.json else sys.stdout
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    all_results: list[Results] = []
    try:
        _check_machine()
        for store in stores:
            all_results.append(run_store(store, args, out))
    except BenchError as exc:
        print(f"registry bench failed: {exc}", file=sys.stderr)
        return 1
    missed: list[str] = []
    for results in all_results:
        prefix = f"{results.config['store_label']}: " if len(all_results) > 1 else ""
        for name, met in results.bars.items():
            print(f"  {prefix}{_bar_line(name)}: {'met' if met else 'MISSED'}", file=out)
            if not met:
                missed.append(prefix + _bar_line(name))
    rows = [row for results in all_results for row in _table_rows(results)]
    if len(all_results) > 1 or any(r.store == "etcd" for r in all_results):
        print("side by side:", file=out)
        _print_table(rows, out)
    print("all bars met" if not missed else f"MISSED: {'; '.join(missed)}", file=out)
    if args.json:
        if len(all_results) == 1:
            print(json.dumps(_jsonable(asdict(all_results[0])), indent=2))
        else:
            runs = [_jsonable(asdict(r)) for r in all_results]
            print(json.dumps({"runs": runs, "table": rows}, indent=2))
    return 0 if args.no_check or not missed else 1


if __name__ == "__main__":
    sys.exit(main())
