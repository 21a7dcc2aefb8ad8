"""Outbound: ``mesh.async_client()`` against a plain ``httpx.AsyncClient``, failover, retries.

Three phases, all against real uvicorn upstreams and a real ``mesh registry --dev``:

1. **Throughput**: one upstream worker (``bench/apps.py``, uvloop, httptools) pinned to CPU 0;
   this script pinned to CPU 1 runs 16 concurrent tasks in one event loop, alternating rounds
   of a plain ``httpx.AsyncClient`` to ``http://127.0.0.1:<port>/items/42`` and
   ``mesh.async_client()`` to ``http://bench-up/items/42`` (discovered through the registry,
   with an identity token on every call). Rounds go plain-mesh, mesh-plain, ... (each run
   after 0.5 s un-timed on its own client). Per run: requests/s, client CPU per request
   (``time.process_time``) and upstream CPU per request (``/proc``). Bar: the median over
   blocks of two rounds of the ratio mesh/plain >= 0.90.
2. **Failover**: three upstreams; one is SIGKILLed a third of the way into a run of GETs.
   Bar: >= 99.9% of the GETs succeed.
3. **Retries**: one upstream answering 30% of requests with 503 (``tests/support/upstream.py``,
   ``UPSTREAM_FAIL_PERCENT=30``), retries on 503 with the default budget (20% + 10/s over
   10 s). Printed: success rate, retries per request (counted by the upstream), and whether
   retries <= 0.2 x requests + 10/s x 10 s per window.

    .venv/bin/python bench/outbound.py                       # 8 rounds x 5 s, 8 s phases
    .venv/bin/python bench/outbound.py --rounds 12 --seconds 8 --duration 9
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
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
BENCH_DIR = REPO / "bench"
SERVER_CPU = 0
CLIENT_CPU = 1
ITEM_PATH = "/items/42"
READY_TIMEOUT = 30.0
BUDGET_WINDOW = 10  # seconds (DESIGN §6)
MAX_REQUESTS_PER_RUN = 2_000_000  # every loop is bounded by a count as well as a time
RATIO_BAR = 0.90
FAILOVER_BAR = 99.9

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


class BenchError(RuntimeError):
    """The benchmark cannot run or its figures would be meaningless."""


# -- processes ---------------------------------------------------------------------------------


class Server(PinnedProcess):
    """One uvicorn worker on a free loopback port, pinned to ``SERVER_CPU``."""

    def __init__(
        self,
        name: str,
        app: str,
        log_dir: Path,
        *,
        app_dir: Path | None = None,
        env: dict[str, str] | None = None,
        argv: list[str] | None = None,
        ready_path: str = ITEM_PATH,
        port: int | None = None,
    ) -> None:
        self.name = name
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ready_path = ready_path
        command = argv or [
            sys.executable, "-m", "uvicorn", app,
            *(["--app-dir", str(app_dir)] if app_dir else []),
            "--host", "127.0.0.1", "--port", str(self.port),
            "--loop", "uvloop", "--http", "httptools",
            "--no-access-log", "--log-level", "warning",
            # Each client's connections sit idle while the other arm runs: they must not expire
            # (uvicorn's default is 5 s) and be re-made inside a timed run.
            "--timeout-keep-alive", "120",
        ]  # fmt: skip
        full_env = {"PYTHONPATH": str(REPO), **(env or {})}
        super().__init__(command, log_dir / f"{name}.log", cpu=SERVER_CPU, cwd=REPO, env=full_env)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if self.process.poll() is not None:
                raise BenchError(
                    f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            try:
                if httpx.get(self.url + self.ready_path, timeout=1.0).status_code < 500:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise BenchError(
                    f"{self.name} not ready after {READY_TIMEOUT:.0f} s:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL the whole process group."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)


def registry_server(log_dir: Path) -> Server:
    port = free_port()
    data = log_dir / "registry-data"
    argv = [
        sys.executable, "-m", "mesh_middleware", "registry", "--dev",
        "--port", str(port), "--data-dir", str(data),
    ]  # fmt: skip
    server = Server("registry", "", log_dir, argv=argv, ready_path="/healthz", port=port)
    # Closed clients' discovery watches may still hold long-polls open, which a graceful
    # shutdown would wait out; the registry holds nothing worth a graceful stop here.
    server.grace = 0.5
    return server


def register(registry_url: str, service: str, instance_id: str, port: int) -> None:
    response = httpx.put(
        f"{registry_url}/v1/catalog/services/{service}/instances/{instance_id}",
        json={"address": "127.0.0.1", "port": port, "version": "v1", "ttl": "10m"},
        timeout=5.0,
    )
    if response.status_code not in (200, 201):
        raise BenchError(
            f"registering {service}/{instance_id}: {response.status_code} {response.text}"
        )


def make_mesh(registry_url: str, outbound_yaml: str = "") -> Any:
    from mesh_middleware import Mesh
    from mesh_middleware.policy.compiled import compile_policy_text

    policy = compile_policy_text(f"service: bench-caller\n{outbound_yaml}", "bench policy")
    return Mesh(policy, watch=False, registry_url=registry_url)


# -- load ------------------------------------------------------------------------------------


@dataclass
class Run:
    """One timed run of one arm."""

    arm: str
    round: int
    requests: int
    seconds: float
    requests_per_second: float
    client_cpu_us_per_request: float
    server_cpu_us_per_request: float
    client_core_other_pct: float
    statuses: dict[int, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)


async def drive(
    send: Callable[[], Awaitable[httpx.Response]],
    *,
    concurrency: int,
    seconds: float,
    on_tick: Callable[[float], None] | None = None,
) -> tuple[int, float, Counter[int], Counter[str]]:
    """``concurrency`` tasks call ``send`` until ``seconds`` pass (or the count bound is hit).

    Returns requests made, elapsed seconds, statuses and exception types. ``on_tick(elapsed)``
    runs after every call.
    """
    statuses: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    made = 0
    started = time.monotonic()
    end = started + seconds

    async def worker() -> None:
        nonlocal made
        while made < MAX_REQUESTS_PER_RUN:
            now = time.monotonic()
            if now >= end:
                return
            made += 1
            try:
                response = await send()
                await response.aread()
            except Exception as exc:
                errors[type(exc).__name__] += 1
            else:
                statuses[response.status_code] += 1
            if on_tick is not None:
                on_tick(time.monotonic() - started)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return made, time.monotonic() - started, statuses, errors


async def timed_run(
    arm: str,
    round_: int,
    send: Callable[[], Awaitable[httpx.Response]],
    server: Server,
    concurrency: int,
    seconds: float,
) -> Run:
    cpu_before, server_before = time.process_time(), server.cpu_seconds()
    busy_before = core_busy_seconds(CLIENT_CPU)
    made, elapsed, statuses, errors = await drive(send, concurrency=concurrency, seconds=seconds)
    client_cpu = time.process_time() - cpu_before
    server_cpu = server.cpu_seconds() - server_before
    other = max(core_busy_seconds(CLIENT_CPU) - busy_before - client_cpu, 0.0)
    if errors or set(statuses) != {200}:
        raise BenchError(f"{arm}: not every call answered 200: {dict(statuses)} {dict(errors)}")
    return Run(
        arm=arm,
        round=round_,
        requests=made,
        seconds=elapsed,
        requests_per_second=made / elapsed,
        client_cpu_us_per_request=client_cpu * 1e6 / made,
        server_cpu_us_per_request=server_cpu * 1e6 / made,
        client_core_other_pct=100 * other / elapsed,
        statuses=dict(statuses),
    )


# -- phases ----------------------------------------------------------------------------------


async def throughput(
    registry_url: str, server: Server, args: argparse.Namespace, out: TextIO
) -> dict[str, Any]:
    register(registry_url, "bench-up", "up-1", server.port)
    mesh = make_mesh(registry_url)
    try:
        limits = httpx.Limits(
            max_connections=args.concurrency, max_keepalive_connections=args.concurrency
        )
        async with (
            httpx.AsyncClient(timeout=10, limits=limits) as plain,
            mesh.async_client(timeout=10, limits=limits) as meshed,
        ):
            check = await meshed.get(f"http://bench-up{ITEM_PATH}")
            if check.status_code != 200 or check.json().get("id") != 42:
                raise BenchError(
                    f"mesh client: GET {ITEM_PATH} gave {check.status_code} {check.text!r}"
                )
            if mesh.cached_identity_token("bench-up") is None:
                raise BenchError("the mesh client holds no identity token for bench-up")
            arms: dict[str, Callable[[], Awaitable[httpx.Response]]] = {
                "plain": lambda: plain.get(server.url + ITEM_PATH),
                "mesh": lambda: meshed.get(f"http://bench-up{ITEM_PATH}"),
            }
            for send in arms.values():  # warm-up: connections, caches, estimates
                await drive(send, concurrency=args.concurrency, seconds=args.warmup)
            runs: dict[str, list[Run]] = {"plain": [], "mesh": []}
            for round_ in range(1, args.rounds + 1):
                order = ("plain", "mesh") if round_ % 2 else ("mesh", "plain")
                for name in order:
                    # Un-timed: the arm's connections and caches are hot when the clock starts.
                    await drive(arms[name], concurrency=args.concurrency, seconds=0.5)
                    run = await timed_run(
                        name, round_, arms[name], server, args.concurrency, args.seconds
                    )
                    runs[name].append(run)
                    print(
                        f"  round {round_} {name:<5} {run.requests_per_second:8.1f} req/s"
                        f"  client cpu {run.client_cpu_us_per_request:7.1f} us/req"
                        f"  upstream cpu {run.server_cpu_us_per_request:6.1f} us/req"
                        f"  ({run.requests} requests; other load on the client's core"
                        f" {run.client_core_other_pct:3.0f}%)",
                        file=out,
                    )
    finally:
        mesh.close()
    # A run right after the client switched arms is 20-40% slower than one after a run of
    # the same arm (whichever arm; cause not found). Rounds go plain-mesh, mesh-plain, ...;
    # a block of two such rounds puts each arm once in each position, so block ratios cancel
    # the effect where single-round ratios swing with it.
    blocks = [
        (runs["plain"][i : i + 2], runs["mesh"][i : i + 2])
        for i in range(0, len(runs["plain"]) - 1, 2)
    ]

    def rps(rs: list[Run]) -> float:
        return sum(r.requests for r in rs) / sum(r.seconds for r in rs)

    def cpu(rs: list[Run]) -> float:
        return statistics.fmean(r.client_cpu_us_per_request for r in rs)

    paired = [rps(m) / rps(p) for p, m in blocks]
    added_cpu = [cpu(m) - cpu(p) for p, m in blocks]
    cpu_ratios = [cpu(p) / cpu(m) for p, m in blocks]

    def pooled(arm: str) -> tuple[float, float, float]:
        rs = runs[arm]
        n = sum(r.requests for r in rs)
        rps = n / sum(r.seconds for r in rs)
        client = statistics.median(r.client_cpu_us_per_request for r in rs)
        upstream = statistics.median(r.server_cpu_us_per_request for r in rs)
        return rps, client, upstream

    p_rps, p_cpu, p_up = pooled("plain")
    m_rps, m_cpu, m_up = pooled("mesh")
    ratio = statistics.median(paired)
    print(
        f"  plain {p_rps:8.1f} req/s, client cpu {p_cpu:6.1f} us/req (median), upstream {p_up:5.1f}"
        f" us/req\n  mesh  {m_rps:8.1f} req/s, client cpu {m_cpu:6.1f} us/req (median), upstream"
        f" {m_up:5.1f} us/req\n  mesh/plain pooled: {m_rps / p_rps:.2f}x requests/s\n"
        f"  mesh/plain, paired blocks of 2 rounds (median of {len(paired)}): {ratio:.2f}x"
        f" requests/s (range {min(paired):.2f}-{max(paired):.2f}),"
        f" {statistics.median(added_cpu):+.1f} us client CPU per request\n"
        f"  requests/s ratio a saturated client would show (plain CPU / mesh CPU per request,"
        f" median of blocks): {statistics.median(cpu_ratios):.2f}x",
        file=out,
    )
    contended = [r for r in runs["plain"] + runs["mesh"] if r.client_core_other_pct > 10]
    if contended:
        print(
            f"  WARNING: in {len(contended)} of {2 * args.rounds} runs other processes took over"
            " 10% of the client's core: requests/s is unreliable, CPU per request is steadier",
            file=out,
        )
    return {
        "paired_ratio": round(ratio, 3),
        "paired_range": [round(min(paired), 3), round(max(paired), 3)],
        "pooled_ratio": round(m_rps / p_rps, 3),
        "plain_rps": round(p_rps, 1),
        "mesh_rps": round(m_rps, 1),
        "plain_client_cpu_us": round(p_cpu, 1),
        "mesh_client_cpu_us": round(m_cpu, 1),
        "added_client_cpu_us": round(statistics.median(added_cpu), 1),
        "cpu_ratio": round(statistics.median(cpu_ratios), 3),
        "runs": [asdict(r) for r in runs["plain"] + runs["mesh"]],
    }


async def failover(
    registry_url: str, servers: list[Server], args: argparse.Namespace, out: TextIO
) -> dict[str, Any]:
    for i, server in enumerate(servers):
        register(registry_url, "bench-trio", f"trio-{i}", server.port)
    victim = servers[1]
    mesh = make_mesh(registry_url)
    killed_at: list[float] = []

    def tick(elapsed: float) -> None:
        if not killed_at and elapsed >= args.duration / 3:
            victim.kill()
            killed_at.append(elapsed)

    try:
        async with mesh.async_client(timeout=10) as client:
            url = f"http://bench-trio{ITEM_PATH}"
            await client.get(url)
            made, elapsed, statuses, errors = await drive(
                lambda: client.get(url),
                concurrency=args.concurrency,
                seconds=args.duration,
                on_tick=tick,
            )
    finally:
        mesh.close()
    if not killed_at:
        raise BenchError("the run ended before the instance was killed")
    ok = statuses.get(200, 0)
    pct = 100 * ok / made
    print(
        f"  {made} GETs in {elapsed:.1f} s, one of three instances SIGKILLed at"
        f" {killed_at[0]:.1f} s: {ok} succeeded = {pct:.3f}%"
        f"  (statuses {dict(statuses)}, errors {dict(errors)})",
        file=out,
    )
    return {"requests": made, "succeeded": ok, "success_pct": round(pct, 4), "errors": dict(errors)}


async def retries(
    registry_url: str, server: Server, args: argparse.Namespace, out: TextIO
) -> dict[str, Any]:
    register(registry_url, "bench-flaky", "flaky-1", server.port)
    mesh = make_mesh(
        registry_url,
        "outbound:\n  services:\n    bench-flaky:\n      retries: {on: [503]}\n",
    )
    try:
        async with httpx.AsyncClient(timeout=5) as control, mesh.async_client(timeout=10) as client:
            (await control.post(f"{server.url}/reset")).raise_for_status()
            url = f"http://bench-flaky{ITEM_PATH}"
            made, elapsed, statuses, errors = await drive(
                lambda: client.get(url), concurrency=args.concurrency, seconds=args.duration
            )
            counts = (await control.get(f"{server.url}/stats")).json()["counts"]
    finally:
        mesh.close()
    tries = int(counts.get("GET", 0))
    retried = tries - made
    ok = statuses.get(200, 0)
    windows = math.ceil((elapsed + 1) / BUDGET_WINDOW)  # the budget's buckets are whole seconds
    allowed = 0.2 * made + 10 * BUDGET_WINDOW * windows
    held = retried <= allowed
    print(
        f"  {made} GETs in {elapsed:.1f} s against 30% injected 503s:"
        f" {100 * ok / made:.2f}% succeeded (no retries would give ~70%); the upstream saw"
        f" {tries} tries = {retried / made:.3f} retries per request; budget allows"
        f" {allowed:.0f} retries ({windows} window(s)): {'held' if held else 'EXCEEDED'}"
        f"  (errors {dict(errors)})",
        file=out,
    )
    return {
        "requests": made,
        "success_pct": round(100 * ok / made, 3),
        "tries": tries,
        "retries_per_request": round(retried / made, 4),
        "budget_allowed": allowed,
        "budget_held": held,
    }


# -- main ------------------------------------------------------------------------------------


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--rounds", type=int, default=8, help="throughput rounds, an even number (8)"
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per round (5)")
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds per arm (2)")
    parser.add_argument("--duration", type=float, default=8.0, help="failover/retry run (8 s)")
    parser.add_argument("--concurrency", type=int, default=16, help="tasks in the client (16)")
    parser.add_argument("--no-check", action="store_true", help="exit 0 even if a bar is missed")
    parser.add_argument("--json", action="store_true", help="write the figures as JSON to stdout")
    args = parser.parse_args(argv)
    if not (
        2 <= args.rounds <= 50
        and args.rounds % 2 == 0
        and 1 <= args.seconds <= 120
        and 0 <= args.warmup <= 30
        and 3 <= args.duration <= 120
        and 1 <= args.concurrency <= 256
    ):
        parser.error(
            "--rounds 2..50 and even, --seconds 1..120, --warmup 0..30, --duration 3..120,"
            " --concurrency 1..256"
        )
    out: TextIO = sys.stderr if args.json else sys.stdout
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    allowed = os.sched_getaffinity(0)
    if not {SERVER_CPU, CLIENT_CPU} <= allowed:
        print(
            f"outbound bench: need CPUs {SERVER_CPU} and {CLIENT_CPU}; have {allowed}",
            file=sys.stderr,
        )
        return 1
    os.sched_setaffinity(0, {CLIENT_CPU})
    # The mesh's own log lines (ejections, registry outages) go to stderr, figures to stdout.
    structlog.configure(
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
    )
    servers: list[Server] = []
    figures: dict[str, Any] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="mesh-bench-outbound-") as tmp:
            logs = Path(tmp)
            registry = registry_server(logs)
            servers.append(registry)
            one = Server("upstream", "apps:app", logs, app_dir=BENCH_DIR)
            trio = [Server(f"trio-{i}", "apps:app", logs, app_dir=BENCH_DIR) for i in range(3)]
            flaky = Server(
                "flaky",
                "tests.support.upstream:app",
                logs,
                env={"UPSTREAM_NAME": "flaky", "UPSTREAM_FAIL_PERCENT": "30"},
                ready_path="/healthz",
            )
            servers += [one, *trio, flaky]
            for server in servers:
                server.wait_ready()
            from mesh_middleware import __version__

            print(
                f"mesh-middleware {__version__}, python {sys.version.split()[0]}, httpx"
                f" {httpx.__version__}, load average {os.getloadavg()[0]:.2f}; upstreams"
                f" (uvicorn, uvloop, httptools, 1 worker) on CPU {SERVER_CPU}, this client on CPU"
                f" {CLIENT_CPU}, {args.concurrency} concurrent tasks, asyncio event loop",
                file=out,
            )
            print(
                f"throughput: plain httpx.AsyncClient vs mesh.async_client(), {args.rounds}"
                f" alternating rounds x {args.seconds:g} s (warm-up {args.warmup:g} s per arm)",
                file=out,
            )
            figures["throughput"] = asyncio.run(throughput(registry.url, one, args, out))
            print(f"failover ({args.duration:g} s):", file=out)
            figures["failover"] = asyncio.run(failover(registry.url, trio, args, out))
            print(f"retries on 503 with the default budget ({args.duration:g} s):", file=out)
            figures["retries"] = asyncio.run(retries(registry.url, flaky, args, out))
    except BenchError as exc:
        print(f"outbound bench failed: {exc}", file=sys.stderr)
        return 1
    finally:
        for server in servers:
            server.stop()
    bars = {
        f"mesh/plain requests/s >= {RATIO_BAR:.2f}x": figures["throughput"]["paired_ratio"]
        >= RATIO_BAR,
        f"failover success >= {FAILOVER_BAR}%": figures["failover"]["success_pct"] >= FAILOVER_BAR,
        "retry budget held": figures["retries"]["budget_held"],
    }
    for name, met in bars.items():
        print(f"  {name}: {'met' if met else 'MISSED'}", file=out)
    print("all bars met" if all(bars.values()) else "some bars MISSED", file=out)
    if args.json:
        json.dump({"settings": vars(args), **figures, "bars": bars}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    return 0 if all(bars.values()) or args.no_check else 1


if __name__ == "__main__":
    sys.exit(main())
