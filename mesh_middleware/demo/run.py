"""``mesh demo`` from start to end: preflight, the shop, traffic, the live table, the verdict."""

from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from mesh_middleware.demo._interrupts import Interrupts
from mesh_middleware.demo.board import Board, edge_rows, render_edges, render_status
from mesh_middleware.demo.preflight import (
    Preflight,
    check_policies,
    missing_apps,
    missing_modules,
)
from mesh_middleware.demo.scrape import (
    MetricsSnapshot,
    fetch_topology,
    scrape,
    would_be_denials,
)
from mesh_middleware.demo.shop import REPO, SHOP_APPS, Shop, ShopError
from mesh_middleware.demo.summary import Findings, evaluate, render_summary
from mesh_middleware.demo.traffic import REQUESTS_PER_SECOND, TrafficGenerator, TrafficTally

__all__ = ["MAX_DURATION_SECONDS", "run_demo"]

MAX_DURATION_SECONDS = 3600.0
"""Without ``--duration`` the traffic runs until Ctrl-C, and at most this long."""

WARM_UP_SECONDS = 30.0
"""How long the first read and the first order through the whole mesh may take."""

LIVE_WINDOW = "20s"
"""The registry window the live table's rates are over (two 10-second buckets at least)."""

REPORT_SETTLE_SECONDS = 1.5
"""After the traffic: time for each app's last edge report (sent every second) to arrive."""

EXIT_INTERRUPTED = 130


class _DemoError(Exception):
    """The demo could not get going (said why)."""


def run_demo(duration: float | None) -> int:
    """Run ``mesh demo``; return its exit status (0 every check holds, 1 something failed,
    2 the demo cannot run here, 130 interrupted before any traffic).

    ``duration`` is the traffic's length in seconds; ``None`` runs until Ctrl-C (at most an
    hour).
    """
    if os.name != "posix":
        print("mesh demo: needs a POSIX system (it runs gunicorn).", file=sys.stderr)
        return 2
    missing = missing_apps(REPO)
    if missing:
        print(
            f"mesh demo: the sample shop is not in {REPO}: missing {', '.join(missing)}.\n"
            "The demo runs the sample apps of a source checkout: clone the repository, run\n"
            "`pip install -e '.[test]'` there (or `./dev demo`), then `mesh demo`.",
            file=sys.stderr,
        )
        return 2
    modules = missing_modules()
    if modules:
        print(
            f"mesh demo: the sample apps need {', '.join(modules)}: pip install -e '.[test]' "
            "(or pip install fastapi flask gunicorn 'uvicorn[standard]')",
            file=sys.stderr,
        )
        return 2
    if duration is not None and not 0 <= duration <= MAX_DURATION_SECONDS:
        print(
            f"mesh demo: --duration must be 0 to {MAX_DURATION_SECONDS:g} seconds, got {duration}",
            file=sys.stderr,
        )
        return 2
    print(
        "mesh demo: the sample shop (gateway, orders, inventory v1 and v2, payments) with the "
        "mesh inside each app, a registry, and traffic at the gateway"
    )
    preflight = check_policies(REPO)
    print("\n".join(preflight.lines))
    if preflight.problems:
        print("\n".join(preflight.problems), file=sys.stderr)
        print("mesh demo: FAILED: a policy file does not pass `mesh policy check`")
        return 1
    interrupts = Interrupts()
    interrupts.install()
    try:
        return _Demo(duration, preflight, interrupts).run()
    except KeyboardInterrupt:  # a late one, after everything was stopped
        return EXIT_INTERRUPTED
    finally:
        interrupts.restore()


@dataclass(slots=True)
class _Final:
    metrics: MetricsSnapshot = field(default_factory=MetricsSnapshot)
    topology: dict[str, Any] | None = None


class _Demo:
    def __init__(
        self, duration: float | None, preflight: Preflight, interrupts: Interrupts
    ) -> None:
        self.duration = duration
        self.preflight = preflight
        self.interrupts = interrupts
        self.board = Board()
        self.http = httpx.Client(timeout=5.0, trust_env=False)
        self.workdir = Path(tempfile.mkdtemp(prefix="mesh-demo-"))
        self.shop = Shop(self.workdir)
        self.traffic: TrafficGenerator | None = None
        self.started = time.monotonic()
        self.interrupted = False

    def run(self) -> int:
        failure: str | None = None
        final = _Final()
        logged: Counter[str] = Counter()
        try:
            try:
                self._start()
                self._drive()
            except (ShopError, _DemoError) as exc:
                failure = str(exc)
            except KeyboardInterrupt:
                self.interrupted = True
            if failure is None:
                try:
                    final = self._collect()
                except KeyboardInterrupt:
                    self.interrupted = True
        finally:
            # Cleanup runs to its end: a Ctrl-C that lands here is dropped and the stop tried
            # again, so nothing is left behind.
            while True:
                try:
                    with self.interrupts.ignored():
                        self._stop_everything()
                        logged = would_be_denials(self.shop.log_paths(apps_only=True))
                        if failure is None:
                            shutil.rmtree(self.workdir, ignore_errors=True)
                        else:  # the error above points into these logs
                            print(f"  logs kept in {self.workdir}")
                    break
                except KeyboardInterrupt:
                    self.interrupted = True
        return self._verdict(failure, final, logged)

    # -- the phases ------------------------------------------------------------------------

    def _start(self) -> None:
        print(f"  workdir     {self.workdir} (logs, registry data; removed at exit)")
        print(f"  starting    the registry and {len(SHOP_APPS)} app processes ...", flush=True)
        began = time.monotonic()
        self.shop.launch()
        took = time.monotonic() - began
        registry = self.shop.registry_url
        print(
            f"  {'registry':<15} {'dev mode, sqlite':<21} {registry}  "
            f"metrics {self.shop.metrics_url('registry')}"
        )
        print(f"  {'dashboard':<15} {'open in a browser':<21} {self.shop.dashboard_url}")
        servers = {spec.name: spec.server for spec in SHOP_APPS}
        for instance in self.shop.instances():
            workers = f" (workers {' '.join(map(str, instance.worker_pids))})"
            print(
                f"  {instance.name:<15} {servers[instance.name]:<21} {instance.url}  "
                f"metrics {instance.url}/metrics  version {instance.version or '-'}  "
                f"pid {instance.pid}{workers if instance.worker_pids else ''}"
            )
        print(f"  started pids: {' '.join(map(str, self.shop.pids()))}")
        print(
            f"  all healthy and registered after {took:.1f} s; "
            f"see them with `mesh instances inventory --registry {registry}`"
        )
        self._warm_up()
        print(f"  watch the edges yourself: mesh stat --registry {registry} --edges")

    def _warm_up(self) -> None:
        """One item read and one order through the whole mesh before the measured traffic."""
        gateway = self.shop.gateway_url
        deadline = time.monotonic() + WARM_UP_SECONDS
        began = time.monotonic()
        for method, path, body, wanted in (
            ("GET", "/shop/items/1", None, 200),
            ("POST", "/shop/orders", {"item": 1, "quantity": 1}, 201),
        ):
            last = "no answer"
            while True:
                try:
                    response = self.http.request(method, gateway + path, json=body)
                    if response.status_code == wanted:
                        break
                    last = f"{response.status_code} {response.text[:300]}"
                except httpx.HTTPError as exc:
                    last = f"{type(exc).__name__}: {exc}"
                if time.monotonic() > deadline:
                    raise _DemoError(
                        f"{method} {path} at the gateway did not answer {wanted} within "
                        f"{WARM_UP_SECONDS:g} s; last answer: {last}"
                    )
                time.sleep(0.25)
        print(f"  warm-up     a read and an order went through the mesh in {_since(began)}")

    def _drive(self) -> None:
        limit = self.duration if self.duration is not None else MAX_DURATION_SECONDS
        until = (
            f"for {limit:g} s"
            if self.duration is not None
            else f"until Ctrl-C (at most {MAX_DURATION_SECONDS / 3600:g} h)"
        )
        print(
            f"  traffic     {REQUESTS_PER_SECOND:g} requests/s at {self.shop.gateway_url} {until}; "
            "Ctrl-C stops the demo and every process it started\n",
            flush=True,
        )
        self.traffic = TrafficGenerator(self.shop.gateway_url)
        self.traffic.start(limit)
        next_draw = time.monotonic() + self.board.interval
        while not self.traffic.wait(max(0.05, min(0.5, next_draw - time.monotonic()))):
            if time.monotonic() >= next_draw:
                self._draw(until)
                next_draw = time.monotonic() + self.board.interval
        self._draw("traffic stopped")
        self.board.release()

    def _draw(self, until: str) -> None:
        assert self.traffic is not None
        tally = self.traffic.snapshot()
        metrics = scrape(self.http, self._pages())
        topology = fetch_topology(self.http, self.shop.registry_url, LIVE_WINDOW)
        covered = (topology or {}).get("covered_seconds")
        # Early on the registry's window (10 s at least) is mostly time before the traffic.
        seconds = min(float(covered), tally.elapsed) if isinstance(covered, int | float) else None
        lines = [render_status(tally, until=until)]
        lines += render_edges(edge_rows(topology, metrics, seconds=seconds or None))
        self.board.show(lines)

    def _pages(self) -> dict[str, str]:
        return {i.name: f"{i.url}/metrics" for i in self.shop.instances()}

    def _collect(self) -> _Final:
        """The last figures, once the traffic has stopped and the last reports are in."""
        if self.traffic is None:
            return _Final()
        self.traffic.stop()
        time.sleep(REPORT_SETTLE_SECONDS)
        seconds = min(300, 10 * math.ceil((time.monotonic() - self.started) / 10) + 10)
        return _Final(
            scrape(self.http, self._pages()),
            fetch_topology(self.http, self.shop.registry_url, f"{seconds}s"),
        )

    def _stop_everything(self) -> None:
        if self.traffic is not None:
            self.traffic.stop()
        running = len(self.shop.instances())
        if running:
            print(f"\nstopping {running} apps and the registry ...", flush=True)
        self.shop.stop()
        self.http.close()

    # -- the verdict -------------------------------------------------------------------------

    def _verdict(self, failure: str | None, final: _Final, logged: Counter[str]) -> int:
        pids = self.shop.pids()
        leftover = self.shop.leftover()
        tally = self.traffic.snapshot() if self.traffic is not None else TrafficTally()
        if failure is not None:
            print(f"mesh demo: {failure}", file=sys.stderr, flush=True)
            print(_processes_line(pids, leftover))
            print("\nmesh demo: FAILED: the shop did not come up (see above)")
            return 1
        if not tally.sent:
            print(_processes_line(pids, leftover))
            if self.interrupted:
                print("mesh demo: interrupted before any traffic was sent")
                return 1 if leftover else EXIT_INTERRUPTED
            print("\nmesh demo: no traffic was sent (--duration 0): nothing to check")
            return 1 if leftover else 0
        findings = Findings(
            tally=tally,
            metrics=final.metrics,
            topology=final.topology,
            logged_would_be=logged,
            mirror_percent=self.preflight.mirror_percent,
            pids=pids,
            leftover=leftover,
        )
        checks = evaluate(findings)
        print("\n".join(render_summary(findings, checks)))
        failed = [c.name for c in checks if not c.passed]
        if self.interrupted:
            print("  (interrupted: the figures cover the traffic until Ctrl-C)")
        if failed:
            print(f"\nmesh demo: FAILED: {', '.join(failed)}")
            return 1
        print(f"\nmesh demo: ok, all {len(checks)} checks hold")
        return 0


def _since(began: float) -> str:
    return f"{time.monotonic() - began:.1f} s"


def _processes_line(pids: list[int], leftover: list[int]) -> str:
    shown = " ".join(map(str, pids)) or "none"
    if leftover:
        return f"  stopped processes: {shown}; STILL RUNNING: {' '.join(map(str, leftover))}"
    return f"  stopped processes: {shown} (none left running)"
