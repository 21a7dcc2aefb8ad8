"""mTLS: what mutual TLS costs against plaintext, both through the mesh, side by side in one run.

Against a real ``mesh registry --dev`` (its CA signs every certificate), two servers of the same
app run under ``mesh run`` (uvicorn, uvloop, httptools, one process each, both pinned to CPU 0,
``--timeout-keep-alive 120``): ``tests.support.asgi_app:app`` (FastAPI behind
``MeshMiddleware``, ``Mesh.from_env()``, so each registers itself in the registry), as

- ``bench-plain``: policy ``inbound: {authentication: strict, mtls: off, ...}``: plaintext;
- ``bench-tls``: the same policy with ``mtls: strict``: TLS only, a client certificate from the
  mesh CA required, registered with ``mtls: strict`` metadata.

This script, pinned to CPU 1, is the caller ``bench-caller``: a ``Mesh`` with the registry,
whose httpx clients discover both services by name and call ``http://<service>/items/42`` with
an identity token; to ``bench-tls`` the mesh opens TLS connections presenting its own
certificate (fetched from the registry on first need) and checking the server's SPIFFE ID. Four
arms, each its own client (an ``AsyncMeshTransport``) in one asyncio event loop:

1. ``plain``: kept-alive connections to ``bench-plain``, 16 concurrent tasks;
2. ``mtls``: kept-alive connections to ``bench-tls``, 16 concurrent tasks;
3. ``plain-new-conn``: a new TCP connection per request (``max_keepalive_connections=0``),
   4 concurrent tasks;
4. ``mtls-new-conn``: a new TCP connection and TLS handshake per request, 4 concurrent tasks.

Before measuring, each arm is checked: 200 with the app's answer, the caller seen as
``bench-caller``, TLS used for the mTLS arms only (the ``mesh.tls`` request extension and
httpcore's trace events), and one TCP connection per request in the new-connection arms.

Then, after 1 s un-timed per arm, rounds of the four arms, their order rotated from round to
round (plain, mtls, plain-new-conn, mtls-new-conn; then mtls, plain, mtls-new-conn, plain-new-conn;
then the new-connection pair first...) so that drift and position hit every arm alike: over each
four rounds every arm runs once in each position, and plain and mtls each once right after
mtls-new-conn (runs after another arm can be slower, see bench/README.md on outbound.py; keep
``--rounds`` a multiple of 4). Each timed run follows 0.5 s un-timed of the same arm.

Per run: requests/s, server CPU per request (the server process's user + system time from
``/proc``, all its threads), client CPU per request (``time.process_time`` of this process,
all its threads), p50/p99 latency of each call, the share of each core busy with other
processes, and the mesh's retries (which would hide failed tries). Printed: a table per arm
(medians over rounds) and, from each round's pair of runs, mtls/plain requests/s and the CPU
per request mTLS adds on the server and on the client, for kept-alive and new connections
(medians over rounds, with their range). No bar: exit status 1 if any request failed (not
answered 200, timed or not; each failure is printed), 0 otherwise. The kept-alive clients
keep idle connections 60 s (httpx's default is 5 s), so they are still open when their arm's
turn comes again.

    .venv/bin/python bench/mtls.py                        # 8 rounds x 3 s per arm, ~2 minutes
    .venv/bin/python bench/mtls.py --rounds 12 --seconds 5
    .venv/bin/python bench/mtls.py --json > mtls.json     # figures as JSON on stdout
    .venv/bin/python bench/mtls.py --keep-logs            # keep the servers' logs, print where
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import httpx
import structlog
from _processes import PinnedProcess, core_busy_seconds, free_port

REPO = Path(__file__).resolve().parent.parent
SERVER_CPU = 0
CLIENT_CPU = 1
APP = "tests.support.asgi_app:app"
ITEM_PATH = "/items/42"
CALLER = "bench-caller"
PLAIN_SERVICE = "bench-plain"
TLS_SERVICE = "bench-tls"
READY_TIMEOUT = 40.0
MAX_REQUESTS_PER_RUN = 2_000_000  # every loop is bounded by a count as well as a time
PREFLIGHT_CALLS = 3
WARMUP_SECONDS = 1.0
PRE_RUN_SECONDS = 0.5
KEEP_ALIVE_SECONDS = 120  # the servers' --timeout-keep-alive: idle connections outlive a round
CLIENT_KEEP_ALIVE_SECONDS = 60.0

SERVER_POLICY = """\
service: {service}
inbound:
  authentication: strict
  mtls: {mtls}
  authorization:
    rules:
      - name: all
        action: allow
        from: ["*"]
"""

CALLER_POLICY = f"""\
service: {CALLER}
outbound:
  services:
    {PLAIN_SERVICE}: {{}}
    {TLS_SERVICE}: {{}}
"""

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


class BenchError(RuntimeError):
    """The benchmark cannot run or its figures would be meaningless."""


# -- processes ---------------------------------------------------------------------------------


class Registry(PinnedProcess):
    """``mesh registry --dev`` on a free loopback port, pinned to ``SERVER_CPU``."""

    # Closed clients' discovery watches may still hold long-polls open, which a graceful
    # shutdown would wait out; the registry holds nothing worth a graceful stop here.
    grace = 0.5

    def __init__(self, log_dir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [
            sys.executable, "-m", "mesh_middleware", "registry", "--dev",
            "--port", str(self.port), "--data-dir", str(log_dir / "registry-data"),
        ]  # fmt: skip
        super().__init__(
            argv,
            log_dir / "registry.log",
            cpu=SERVER_CPU,
            cwd=REPO,
            env={"PYTHONPATH": str(REPO)},
        )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if self.process.poll() is not None:
                raise BenchError(
                    f"the registry exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            try:
                if httpx.get(self.url + "/healthz", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise BenchError(f"the registry not ready after {READY_TIMEOUT:.0f} s")
            time.sleep(0.05)


class MeshRun(PinnedProcess):
    """``mesh run APP`` for one service on a free loopback port, pinned to ``SERVER_CPU``.

    ``mesh run`` serves uvicorn in its own process (``taskset`` execs the interpreter), so the
    pid's CPU time is the server's: the app, the middleware, TLS, and the certificate renewal
    and registry threads.
    """

    def __init__(self, service: str, mtls: str, registry_url: str, log_dir: Path) -> None:
        self.service = service
        self.mtls = mtls
        self.registry_url = registry_url
        self.port = free_port()
        policy = log_dir / f"{service}.yaml"
        policy.write_text(SERVER_POLICY.format(service=service, mtls=mtls))
        argv = [
            sys.executable, "-m", "mesh_middleware", "run", APP,
            "--port", str(self.port), "--timeout-keep-alive", str(KEEP_ALIVE_SECONDS),
        ]  # fmt: skip
        env = {
            "PYTHONPATH": str(REPO),
            "MESH_POLICY": str(policy),
            "MESH_REGISTRY_URL": registry_url,
            "MESH_ADVERTISE": f"127.0.0.1:{self.port}",
        }
        super().__init__(argv, log_dir / f"{service}.log", cpu=SERVER_CPU, cwd=REPO, env=env)

    def instance(self) -> dict[str, Any] | None:
        """The registry's catalog entry for this server's port, if it has one."""
        try:
            answer = httpx.get(
                f"{self.registry_url}/v1/catalog/services/{self.service}", timeout=2.0
            )
        except httpx.TransportError:
            return None
        if answer.status_code != 200:
            return None
        for instance in answer.json().get("instances", []):
            if instance.get("port") == self.port:
                return dict(instance)
        return None

    def wait_registered(self) -> dict[str, Any]:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if self.process.poll() is not None:
                raise BenchError(
                    f"mesh run for {self.service} exited with {self.process.returncode}:\n"
                    f"{self.log_tail()}"
                )
            instance = self.instance()
            if instance is not None:
                metadata = instance.get("metadata") or {}
                wanted = "strict" if self.mtls == "strict" else None
                if metadata.get("mtls") != wanted:
                    raise BenchError(
                        f"{self.service} registered with metadata {metadata}, expected mtls"
                        f" {wanted}"
                    )
                return instance
            if time.monotonic() > deadline:
                raise BenchError(
                    f"{self.service} not in the registry's catalog after {READY_TIMEOUT:.0f} s:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.1)


# -- arms and load -----------------------------------------------------------------------------


@dataclass
class Arm:
    name: str
    service: str
    tls: bool
    new_connections: bool
    concurrency: int
    client: httpx.AsyncClient | None = None
    server: MeshRun | None = None

    @property
    def url(self) -> str:
        return f"http://{self.service}{ITEM_PATH}"

    def send(self) -> Awaitable[httpx.Response]:
        assert self.client is not None
        return self.client.get(self.url)


@dataclass
class Run:
    """One timed run of one arm."""

    arm: str
    round: int
    requests: int
    failures: int
    seconds: float
    requests_per_second: float
    server_cpu_us_per_request: float
    client_cpu_us_per_request: float
    p50_ms: float
    p99_ms: float
    server_core_pct: float
    client_core_pct: float
    server_core_other_pct: float
    client_core_other_pct: float
    retries: float
    statuses: dict[int, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)


@dataclass
class Load:
    made: int
    elapsed: float
    statuses: Counter[int]
    errors: Counter[str]
    latencies: list[float]

    @property
    def failures(self) -> int:
        return sum(n for status, n in self.statuses.items() if status != 200) + sum(
            self.errors.values()
        )


async def drive(
    send: Callable[[], Awaitable[httpx.Response]], *, concurrency: int, seconds: float
) -> Load:
    """``concurrency`` tasks call ``send`` until ``seconds`` pass (or the count bound is hit)."""
    statuses: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    latencies: list[float] = []
    made = 0
    started = time.monotonic()
    end = started + seconds

    async def worker() -> None:
        nonlocal made
        while made < MAX_REQUESTS_PER_RUN and time.monotonic() < end:
            made += 1
            began = time.perf_counter()
            try:
                response = await send()
            except Exception as exc:
                errors[type(exc).__name__] += 1
            else:
                latencies.append(time.perf_counter() - began)
                statuses[response.status_code] += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return Load(made, time.monotonic() - started, statuses, errors, latencies)


def percentile(ordered: list[float], q: float) -> float:
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def retries_so_far() -> float:
    """Retries this process's mesh clients have sent (``mesh_outbound_retries``), all labels."""
    from prometheus_client import REGISTRY

    total = 0.0
    for metric in REGISTRY.collect():
        if metric.name == "mesh_outbound_retries":
            total += sum(s.value for s in metric.samples if s.name.endswith("_total"))
    return total


async def timed_run(arm: Arm, round_: int, seconds: float) -> Run:
    server = arm.server
    assert server is not None
    retries_before = retries_so_far()
    server_busy, client_busy = core_busy_seconds(SERVER_CPU), core_busy_seconds(CLIENT_CPU)
    cpu_before, server_before = time.process_time(), server.cpu_seconds()
    load = await drive(arm.send, concurrency=arm.concurrency, seconds=seconds)
    client_cpu = time.process_time() - cpu_before
    server_cpu = server.cpu_seconds() - server_before
    server_other = max(core_busy_seconds(SERVER_CPU) - server_busy - server_cpu, 0.0)
    client_other = max(core_busy_seconds(CLIENT_CPU) - client_busy - client_cpu, 0.0)
    retries = retries_so_far() - retries_before
    ordered = sorted(load.latencies)
    made, elapsed = max(load.made, 1), load.elapsed
    return Run(
        arm=arm.name,
        round=round_,
        requests=load.made,
        failures=load.failures,
        seconds=elapsed,
        requests_per_second=load.made / elapsed,
        server_cpu_us_per_request=server_cpu * 1e6 / made,
        client_cpu_us_per_request=client_cpu * 1e6 / made,
        p50_ms=percentile(ordered, 0.50) * 1e3,
        p99_ms=percentile(ordered, 0.99) * 1e3,
        server_core_pct=100 * server_cpu / elapsed,
        client_core_pct=100 * client_cpu / elapsed,
        server_core_other_pct=100 * server_other / elapsed,
        client_core_other_pct=100 * client_other / elapsed,
        retries=retries,
        statuses=dict(load.statuses),
        errors=dict(load.errors),
    )


# -- checks before measuring -------------------------------------------------------------------


async def preflight(arm: Arm, out: TextIO) -> dict[str, Any]:
    """Check that ``arm`` calls what it should, over what it should; describe its TLS."""
    assert arm.client is not None
    events: Counter[str] = Counter()

    async def trace(name: str, info: dict[str, Any]) -> None:
        events[name] += 1

    seen: dict[str, Any] = {}
    for n in range(PREFLIGHT_CALLS):
        response = await arm.client.get(arm.url, extensions={"trace": trace})
        if response.status_code != 200:
            raise BenchError(
                f"{arm.name}: GET {arm.url} gave {response.status_code} {response.text[:300]!r}"
            )
        body = response.json()
        if body.get("path") != ITEM_PATH or body.get("caller") != CALLER:
            raise BenchError(f"{arm.name}: unexpected answer {body!r}")
        used_tls = response.request.extensions.get("mesh.tls")
        if used_tls is not arm.tls:
            raise BenchError(f"{arm.name}: the mesh sent it with mesh.tls={used_tls!r}")
        if n == 0 and arm.tls and not arm.new_connections:
            stream = response.extensions.get("network_stream")
            ssl_object = stream.get_extra_info("ssl_object") if stream is not None else None
            if ssl_object is None:
                raise BenchError(f"{arm.name}: no TLS on the connection")
            seen["tls_version"] = ssl_object.version()
            seen["cipher"] = ssl_object.cipher()[0]
            seen["server_certificate"] = describe_certificate(
                ssl_object.getpeercert(binary_form=True)
            )
    connects = events["connection.connect_tcp.started"]
    handshakes = events["connection.start_tls.started"]
    if arm.new_connections and connects != PREFLIGHT_CALLS:
        raise BenchError(
            f"{arm.name}: {connects} TCP connections for {PREFLIGHT_CALLS} requests, expected"
            " one per request"
        )
    if not arm.new_connections and connects > 1:
        raise BenchError(f"{arm.name}: {connects} TCP connections: keep-alive is not working")
    if arm.tls and handshakes != connects:
        raise BenchError(f"{arm.name}: {handshakes} TLS handshakes for {connects} connections")
    if not arm.tls and handshakes:
        raise BenchError(f"{arm.name}: {handshakes} TLS handshakes to the plaintext server")
    print(
        f"  check {arm.name:<15} {PREFLIGHT_CALLS} x 200 from {arm.service} as {CALLER},"
        f" {'TLS' if arm.tls else 'plaintext'}, {connects} new connection(s), {handshakes}"
        " handshake(s)",
        file=out,
    )
    return seen


def describe_certificate(der: bytes | None) -> str:
    if not der:
        return "none"
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

        certificate = x509.load_der_x509_certificate(der)
        key = certificate.public_key()
        if isinstance(key, ec.EllipticCurvePublicKey):
            kind = f"ECDSA {key.curve.name}"
        elif isinstance(key, rsa.RSAPublicKey):
            kind = f"RSA {key.key_size}"
        elif isinstance(key, ed25519.Ed25519PublicKey):
            kind = "Ed25519"
        else:
            kind = type(key).__name__
        uris = certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value.get_values_for_type(x509.UniformResourceIdentifier)
        return f"{kind}, {', '.join(uris)}"
    except Exception as exc:  # a description only
        return f"(not described: {exc!r})"


# -- the run -----------------------------------------------------------------------------------

# Each round's order (indices into make_arms' list): over four rounds each arm takes each
# position once, each pair is flipped every other round, and plain and mtls each follow
# mtls-new-conn once.
ORDERS = ((0, 1, 2, 3), (1, 0, 3, 2), (2, 3, 0, 1), (3, 2, 1, 0))


def make_arms(args: argparse.Namespace, plain: MeshRun, tls: MeshRun) -> list[Arm]:
    return [
        Arm("plain", PLAIN_SERVICE, False, False, args.concurrency, server=plain),
        Arm("mtls", TLS_SERVICE, True, False, args.concurrency, server=tls),
        Arm("plain-new-conn", PLAIN_SERVICE, False, True, args.new_conn_concurrency, server=plain),
        Arm("mtls-new-conn", TLS_SERVICE, True, True, args.new_conn_concurrency, server=tls),
    ]


Measured = tuple[dict[str, list[Run]], dict[str, Any], int]


async def measure(
    registry_url: str, arms: list[Arm], args: argparse.Namespace, out: TextIO
) -> Measured:
    from mesh_middleware import Mesh
    from mesh_middleware.adapters.httpx import AsyncMeshTransport
    from mesh_middleware.policy.compiled import compile_policy_text

    policy = compile_policy_text(CALLER_POLICY, "bench caller policy")
    mesh = Mesh(policy, watch=False, registry_url=registry_url)
    warmup_failures = 0
    try:
        mesh.outbound.prefetch()
        for arm in arms:
            limits = (
                httpx.Limits(max_connections=arm.concurrency, max_keepalive_connections=0)
                if arm.new_connections
                else httpx.Limits(
                    max_connections=arm.concurrency,
                    max_keepalive_connections=arm.concurrency,
                    # Idle while the three other arms run (httpx's default expiry is 5 s); the
                    # servers keep them longer still, so the client always closes first.
                    keepalive_expiry=CLIENT_KEEP_ALIVE_SECONDS,
                )
            )
            # The limits go to the transport: httpx ignores a client's own when given one.
            arm.client = httpx.AsyncClient(
                transport=AsyncMeshTransport(mesh, limits=limits), timeout=10.0
            )
        tls_seen: dict[str, Any] = {}
        for arm in arms:
            tls_seen |= await preflight(arm, out)
        if tls_seen:
            print(
                f"  TLS to {TLS_SERVICE}: {tls_seen['tls_version']}, {tls_seen['cipher']};"
                f" server certificate {tls_seen['server_certificate']}",
                file=out,
            )
        for arm in arms:  # warm-up: connections, caches, estimates
            load = await drive(arm.send, concurrency=arm.concurrency, seconds=WARMUP_SECONDS)
            if load.failures:
                warmup_failures += load.failures
                print(
                    f"  FAILURES in {arm.name}'s warm-up: {load.failures} of {load.made}:"
                    f" statuses {dict(load.statuses)}, errors {dict(load.errors)}",
                    file=out,
                )
        runs: dict[str, list[Run]] = {arm.name: [] for arm in arms}
        for round_ in range(1, args.rounds + 1):
            for index in ORDERS[(round_ - 1) % len(ORDERS)]:
                arm = arms[index]
                # Un-timed: the arm's connections and caches are hot when the clock starts.
                load = await drive(arm.send, concurrency=arm.concurrency, seconds=PRE_RUN_SECONDS)
                if load.failures:
                    warmup_failures += load.failures
                    print(
                        f"  FAILURES in {arm.name}'s un-timed run before round {round_}:"
                        f" {load.failures} of {load.made}: statuses {dict(load.statuses)},"
                        f" errors {dict(load.errors)}",
                        file=out,
                    )
                run = await timed_run(arm, round_, args.seconds)
                runs[arm.name].append(run)
                print(
                    f"  round {round_} {arm.name:<15} {run.requests_per_second:8.1f} req/s"
                    f"  server {run.server_cpu_us_per_request:7.1f} us/req"
                    f"  client {run.client_cpu_us_per_request:7.1f} us/req"
                    f"  p50 {run.p50_ms:6.2f} ms  p99 {run.p99_ms:6.2f} ms"
                    f"  ({run.requests} requests, {run.failures} failed, retries"
                    f" {run.retries:g}; other load: server core {run.server_core_other_pct:.0f}%,"
                    f" client core {run.client_core_other_pct:.0f}%)",
                    file=out,
                )
                if run.failures:
                    print(
                        f"  FAILURES in {arm.name}: statuses {run.statuses}, errors {run.errors}",
                        file=out,
                    )
    finally:
        for arm in arms:
            if arm.client is not None:
                await arm.client.aclose()
        mesh.close()
    return runs, tls_seen, warmup_failures


def spread(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def summarize(runs: dict[str, list[Run]], args: argparse.Namespace, out: TextIO) -> dict[str, Any]:
    table: dict[str, dict[str, float]] = {}
    columns = (
        ("requests_per_second", "req/s", "{:9.1f}"),
        ("server_cpu_us_per_request", "server us/req", "{:13.1f}"),
        ("client_cpu_us_per_request", "client us/req", "{:13.1f}"),
        ("p50_ms", "p50 ms", "{:7.2f}"),
        ("p99_ms", "p99 ms", "{:7.2f}"),
        ("server_core_pct", "server core", "{:10.0f}%"),
        ("client_core_pct", "client core", "{:10.0f}%"),
    )
    header = f"  {'arm':<15} {'conc':>4}" + "".join(
        f" {title:>{len(fmt.format(0.0))}}" for _, title, fmt in columns
    )
    header += f" {'requests':>9} {'failed':>6} {'retries':>7}"
    print(f"medians over {args.rounds} rounds of {args.seconds:g} s per arm:", file=out)
    print(header, file=out)
    for name, arm_runs in runs.items():
        row = {key: statistics.median(getattr(r, key) for r in arm_runs) for key, _, _ in columns}
        row["requests"] = sum(r.requests for r in arm_runs)
        row["failures"] = sum(r.failures for r in arm_runs)
        row["retries"] = sum(r.retries for r in arm_runs)
        table[name] = row
        concurrency = args.new_conn_concurrency if "new-conn" in name else args.concurrency
        line = f"  {name:<15} {concurrency:>4}" + "".join(
            " " + fmt.format(row[key]) for key, _, fmt in columns
        )
        line += f" {row['requests']:>9.0f} {row['failures']:>6.0f} {row['retries']:>7.0f}"
        print(line, file=out)
    print(
        "  (server/client core: the share of one core the server process / this client used)",
        file=out,
    )
    ratios: dict[str, Any] = {}
    print(
        f"mtls against plain, from each round's pair of runs (median over {args.rounds} rounds,"
        " range in brackets):",
        file=out,
    )
    for label, plain, mtls in (
        ("keep-alive", "plain", "mtls"),
        ("new connection", "plain-new-conn", "mtls-new-conn"),
    ):
        pairs = list(zip(runs[plain], runs[mtls], strict=True))
        rps = spread([m.requests_per_second / p.requests_per_second for p, m in pairs])
        server = spread(
            [m.server_cpu_us_per_request - p.server_cpu_us_per_request for p, m in pairs]
        )
        client = spread(
            [m.client_cpu_us_per_request - p.client_cpu_us_per_request for p, m in pairs]
        )
        server_ratio = statistics.median(
            m.server_cpu_us_per_request / p.server_cpu_us_per_request for p, m in pairs
        )
        client_ratio = statistics.median(
            m.client_cpu_us_per_request / p.client_cpu_us_per_request for p, m in pairs
        )
        print(
            f"  {label + ':':<16} requests/s {rps[0]:.3f}x [{rps[1]:.3f}-{rps[2]:.3f}];"
            f" added server CPU {server[0]:+.1f} us/req [{server[1]:+.1f} to {server[2]:+.1f}]"
            f" ({server_ratio:.2f}x); added client CPU {client[0]:+.1f} us/req"
            f" [{client[1]:+.1f} to {client[2]:+.1f}] ({client_ratio:.2f}x)",
            file=out,
        )
        ratios[label.replace(" ", "_").replace("-", "_")] = {
            "rps_ratio": round(rps[0], 4),
            "rps_ratio_range": [round(rps[1], 4), round(rps[2], 4)],
            "added_server_cpu_us": round(server[0], 1),
            "added_server_cpu_us_range": [round(server[1], 1), round(server[2], 1)],
            "server_cpu_ratio": round(server_ratio, 3),
            "added_client_cpu_us": round(client[0], 1),
            "added_client_cpu_us_range": [round(client[1], 1), round(client[2], 1)],
            "client_cpu_ratio": round(client_ratio, 3),
        }
    everything = [r for arm_runs in runs.values() for r in arm_runs]
    contended = [
        r for r in everything if r.client_core_other_pct > 10 or r.server_core_other_pct > 10
    ]
    if contended:
        print(
            f"  WARNING: in {len(contended)} of {len(everything)} runs other processes took over"
            " 10% of the server's or the client's core: requests/s is unreliable, CPU per"
            " request is steadier",
            file=out,
        )
    return {"arms": table, "mtls_vs_plain": ratios}


# -- main ------------------------------------------------------------------------------------


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


class Terminated(Exception):
    """SIGTERM arrived while the event loop ran: the measurement was cancelled and cleaned up."""


async def until_sigterm(work: Awaitable[Measured]) -> Measured:
    """``work``, cancelled (its clients closed, its Mesh closed) if SIGTERM arrives.

    Raising out of a signal handler while the loop runs would skip the loop's shutdown, and
    the worker threads of ``anyio.to_thread`` (not daemons) would then keep the interpreter
    from exiting; cancelling the task lets everything end the ordinary way. (Ctrl-C is handled
    the same way by ``asyncio.run`` itself.)
    """
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(work)
    terminated = False

    def on_sigterm() -> None:
        nonlocal terminated
        terminated = True
        task.cancel()

    loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    try:
        return await task
    except asyncio.CancelledError:
        if terminated:
            raise Terminated from None
        raise
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        signal.signal(signal.SIGTERM, _raise_on_sigterm)  # remove_signal_handler set SIG_DFL


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--rounds", type=int, default=8, help="rounds of the four arms, a multiple of 4 (8)"
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per arm per round (3)")
    parser.add_argument(
        "--concurrency", type=int, default=16, help="tasks in the keep-alive arms (16)"
    )
    parser.add_argument(
        "--new-conn-concurrency",
        type=int,
        default=4,
        help="tasks in the new-connection arms (4)",
    )
    parser.add_argument("--json", action="store_true", help="write the figures as JSON to stdout")
    parser.add_argument(
        "--keep-logs", action="store_true", help="keep the servers' logs and print where they are"
    )
    args = parser.parse_args(argv)
    if not (
        1 <= args.rounds <= 50
        and 1 <= args.seconds <= 120
        and 1 <= args.concurrency <= 256
        and 1 <= args.new_conn_concurrency <= 64
    ):
        parser.error(
            "--rounds 1..50, --seconds 1..120, --concurrency 1..256, --new-conn-concurrency 1..64"
        )
    out: TextIO = sys.stderr if args.json else sys.stdout
    if args.rounds % len(ORDERS):
        print(
            f"note: --rounds {args.rounds} is not a multiple of {len(ORDERS)}: the arms' positions"
            " in the rounds are not balanced",
            file=out,
        )
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    allowed = os.sched_getaffinity(0)
    if not {SERVER_CPU, CLIENT_CPU} <= allowed:
        print(
            f"mtls bench: need CPUs {SERVER_CPU} and {CLIENT_CPU}; have {allowed}", file=sys.stderr
        )
        return 1
    os.sched_setaffinity(0, {CLIENT_CPU})
    # The mesh's own log lines (ejections, registry outages) go to stderr, figures to stdout.
    structlog.configure(
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
    )
    logs = Path(tempfile.mkdtemp(prefix="mesh-bench-mtls-"))
    processes: list[PinnedProcess] = []
    registry: Registry | None = None
    figures: dict[str, Any] = {}
    failed = 0
    try:
        registry = Registry(logs)
        registry.wait_ready()
        plain = MeshRun(PLAIN_SERVICE, "off", registry.url, logs)
        tls = MeshRun(TLS_SERVICE, "strict", registry.url, logs)
        processes += [plain, tls]
        instances = {server.service: server.wait_registered() for server in (plain, tls)}
        from mesh_middleware import __version__

        print(
            f"mesh-middleware {__version__}, python {sys.version.split()[0]}, httpx"
            f" {httpx.__version__}, load average {os.getloadavg()[0]:.2f}; servers: mesh run"
            f" {APP} (uvicorn, 1 process, keep-alive {KEEP_ALIVE_SECONDS} s) on CPU {SERVER_CPU}:"
            f" {PLAIN_SERVICE} (mtls: off, port {plain.port}, metadata"
            f" {instances[PLAIN_SERVICE].get('metadata') or {}}), {TLS_SERVICE} (mtls: strict,"
            f" port {tls.port}, metadata {instances[TLS_SERVICE].get('metadata') or {}}); this"
            f" client ({CALLER}, asyncio event loop) on CPU {CLIENT_CPU}",
            file=out,
        )
        print(
            f"{args.rounds} rounds x 4 arms x {args.seconds:g} s (each after {PRE_RUN_SECONDS:g} s"
            f" un-timed; {WARMUP_SECONDS:g} s warm-up per arm first); keep-alive arms"
            f" {args.concurrency} tasks, new-connection arms {args.new_conn_concurrency} tasks",
            file=out,
        )
        arms = make_arms(args, plain, tls)
        runs, tls_seen, warmup_failures = asyncio.run(
            until_sigterm(measure(registry.url, arms, args, out))
        )
        figures = summarize(runs, args, out)
        failed = sum(r.failures for arm_runs in runs.values() for r in arm_runs)
        figures["tls"] = tls_seen
        figures["warmup_failures"] = warmup_failures
        figures["runs"] = [asdict(r) for arm_runs in runs.values() for r in arm_runs]
        failed += warmup_failures
        for server in (plain, tls):
            if server.process.poll() is not None:
                print(
                    f"{server.service} exited with {server.process.returncode} during the run",
                    file=out,
                )
                failed += 1
    except BenchError as exc:
        print(f"mtls bench failed: {exc}", file=sys.stderr)
        return 1
    except Terminated:
        print("mtls bench: terminated (SIGTERM); stopping the servers", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("mtls bench: interrupted; stopping the servers", file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        for process in processes:
            process.stop()
        if registry is not None:
            registry.stop()
        if args.keep_logs:
            print(f"logs: {logs}", file=sys.stderr)
        else:
            shutil.rmtree(logs, ignore_errors=True)
    if failed:
        print(f"FAILED: {failed} failure(s), requests not answered 200 (see above)", file=out)
    else:
        print("every request answered 200", file=out)
    if args.json:
        json.dump({"settings": vars(args), **figures}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
