"""The sample shop as real processes: the registry and every app of the shop's contract.

``Shop.start(workdir)`` starts, on free ports of 127.0.0.1 and from the repository root:

- the registry: ``python -m mesh_middleware registry --dev`` with its embedded SQLite store in
  ``workdir/registry``;
- ``gateway`` (uvicorn), ``orders`` (gunicorn, 2 workers, ``PROMETHEUS_MULTIPROC_DIR`` in
  ``workdir/prometheus-orders``), ``inventory-v1-a``, ``inventory-v1-b`` and ``inventory-v2``
  (uvicorn, ``MESH_VERSION`` v1/v1/v2), ``payments-a`` and ``payments-b`` (uvicorn).

Every app gets ``MESH_REGISTRY_URL``, its ``MESH_POLICY`` (``sample_apps/<service>/policy.yaml``)
and ``MESH_REPORT_INTERVAL=1s``; no other ``MESH_*`` variable of the caller's environment is
passed on. Each process runs in its own process group (a signal reaches gunicorn's workers
too), gets SIGTERM if the process that started it dies (Linux), and logs to
``workdir/logs/<name>.log``. ``start`` returns once the registry answers ``/healthz`` and every
app answers ``/healthz`` *and* is listed, healthy, in the registry's catalog; otherwise it
stops what it started and raises :class:`ShopError` with the failing app's log tail.

Processes are started from one thread the shop keeps for that purpose, not from the caller's:
Linux sends the die-with-parent signal when the *thread* that forked a child ends, so a
restart asked for from a short-lived thread (a test's load helper) must not fork there. The
shop's methods may be called from any thread.

Use it as a context manager::

    from mesh_middleware.demo.shop import Shop

    with Shop.start(tmp_path) as shop:
        httpx.get(f"{shop.gateway_url}/shop/items/1", timeout=5)
        shop.instances("inventory")   # [Instance(name="inventory-v1-a", version="v1", ...), ...]
        shop.kill("payments-a")       # SIGKILL to its process group, waits for it to exit
        shop.restart_registry()       # same port, same data dir: registrations survive
    assert shop.leftover() == []      # stop() ran: no process left behind

The API: :meth:`Shop.start`, :attr:`Shop.registry_url`, :attr:`Shop.gateway_url`,
:meth:`Shop.url` and :meth:`Shop.metrics_url` (an instance, a single-instance service or
``"registry"``), :meth:`Shop.instances`, :meth:`Shop.registered` (the registry's view),
:meth:`Shop.kill`, :meth:`Shop.restart` and :meth:`Shop.restart_registry`, :meth:`Shop.stop`
(idempotent), :meth:`Shop.pids`, :meth:`Shop.leftover`, :meth:`Shop.log_path` and
:meth:`Shop.log_paths`; ``Shop(workdir).launch()`` is :meth:`Shop.start` for a caller that
stops the shop itself whatever happens (``mesh demo`` does: a Ctrl-C may land anywhere, and
every process started is recorded by the spawning thread before ``launch`` hears of it).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import httpx

import mesh_middleware
from mesh_middleware.demo._processes import (
    ProcessRef,
    descendants,
    die_with_parent,
    first_error,
    free_port,
    log_tail,
    process_ref,
    signal_group,
)

__all__ = [
    "REPO",
    "SHOP_APPS",
    "STARTUP_TIMEOUT_SECONDS",
    "AppSpec",
    "Instance",
    "Shop",
    "ShopError",
]

REPO = Path(mesh_middleware.__file__).resolve().parents[1]
"""The checkout the package was imported from: ``sample_apps/`` lives there."""

STARTUP_TIMEOUT_SECONDS = 60.0
"""How long the whole shop may take to be healthy and registered (2 shared cores, 10 processes)."""

STOP_TIMEOUT_SECONDS = 10.0
"""How long stopped processes get after SIGTERM before they are killed."""

REGISTRY = "registry"
_PROBE_TIMEOUT = 1.0
_PORT_ATTEMPTS = 3


@dataclass(frozen=True, slots=True)
class AppSpec:
    """One app process of the shop, as the contract describes it."""

    name: str
    service: str
    module: str
    version: str | None = None
    workers: int = 1

    @property
    def server(self) -> str:
        """The server, as shown."""
        return f"gunicorn, {self.workers} workers" if self.workers > 1 else "uvicorn"

    @property
    def policy(self) -> str:
        """The policy file, relative to the repository root (the apps' working directory)."""
        return f"sample_apps/{self.service}/policy.yaml"

    def argv(self, port: int) -> list[str]:
        """The command line, listening on ``127.0.0.1:port``."""
        if self.workers > 1:
            return [
                sys.executable,
                "-m",
                "gunicorn",
                "--workers",
                str(self.workers),
                "--bind",
                f"127.0.0.1:{port}",
                "--graceful-timeout",
                "5",
                f"{self.module}:app",
            ]
        return [
            sys.executable,
            "-m",
            "uvicorn",
            f"{self.module}:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-access-log",
        ]


SHOP_APPS: tuple[AppSpec, ...] = (
    AppSpec("gateway", "gateway", "sample_apps.gateway.app"),
    AppSpec("orders", "orders", "sample_apps.orders.app", workers=2),
    AppSpec("inventory-v1-a", "inventory", "sample_apps.inventory.app", version="v1"),
    AppSpec("inventory-v1-b", "inventory", "sample_apps.inventory.app", version="v1"),
    AppSpec("inventory-v2", "inventory", "sample_apps.inventory.app", version="v2"),
    AppSpec("payments-a", "payments", "sample_apps.payments.app"),
    AppSpec("payments-b", "payments", "sample_apps.payments.app"),
)
"""The shop's processes, in the contract's order."""


@dataclass(frozen=True, slots=True)
class Instance:
    """A running app process of the shop."""

    name: str
    service: str
    version: str | None
    port: int
    pid: int
    worker_pids: tuple[int, ...] = ()
    instance_id: str | None = None  # the registry's id for it

    @property
    def url(self) -> str:
        """Where it listens."""
        return f"http://127.0.0.1:{self.port}"


class ShopError(Exception):
    """The shop could not be started (or restarted): which process, why, and its log's tail."""


@dataclass(slots=True)
class _Process:
    name: str
    spec: AppSpec | None  # None: the registry
    port: int
    env: dict[str, str]
    log_path: Path
    argv: list[str] = field(default_factory=list)
    popen: subprocess.Popen[bytes] | None = None
    log_file: IO[bytes] | None = None
    refs: set[ProcessRef] = field(default_factory=set)
    instance_id: str | None = None
    version: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def describe(self) -> str:
        return self.name if self.spec is None else f"{self.name} ({self.spec.server})"


class Shop:
    """The registry and the shop's apps as real processes; see the module docstring."""

    def __init__(
        self,
        workdir: Path,
        *,
        repo: Path = REPO,
        apps: Sequence[AppSpec] = SHOP_APPS,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """Prepare (start nothing yet); :meth:`start` is the usual way in."""
        self.workdir = workdir
        self.repo = repo
        self._specs = tuple(apps)
        self._extra_env = dict(env or {})
        self._processes: dict[str, _Process] = {}
        self._refs: set[ProcessRef] = set()
        self._lock = threading.Lock()
        self._spawner = ThreadPoolExecutor(1, thread_name_prefix="mesh-shop-spawner")
        self._spawning: set[Future[None]] = set()
        self._stopped = False
        self._http = httpx.Client(timeout=_PROBE_TIMEOUT, trust_env=False)

    # -- starting ----------------------------------------------------------------------------

    @classmethod
    def start(
        cls,
        workdir: Path,
        *,
        repo: Path = REPO,
        apps: Sequence[AppSpec] = SHOP_APPS,
        env: Mapping[str, str] | None = None,
        timeout: float = STARTUP_TIMEOUT_SECONDS,
    ) -> Shop:
        """Start the registry and every app; return once all are healthy and registered.

        ``env`` is added to every app's environment (after the shop's own variables, so it
        may override ``MESH_REPORT_INTERVAL``). Raises :class:`ShopError` (after stopping
        whatever it started) when something does not come up within ``timeout`` seconds.
        """
        shop = cls(workdir, repo=repo, apps=apps, env=env)
        try:
            shop.launch(timeout)
        except BaseException:
            shop.stop()
            raise
        return shop

    def launch(self, timeout: float = STARTUP_TIMEOUT_SECONDS) -> None:
        """Start everything and wait for it, as :meth:`start` does, but without stopping what
        was started when it fails: for a caller that stops the shop itself in any case."""
        deadline = time.monotonic() + timeout
        for sub in ("logs", "registry"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        registry = _Process(REGISTRY, None, 0, self._base_env(), self.workdir / "logs/registry.log")
        self._processes[REGISTRY] = registry
        self._launch(registry, deadline)
        for spec in self._specs:
            process = _Process(spec.name, spec, 0, self._app_env(spec), self._log(spec.name))
            self._processes[spec.name] = process
            self._spawn(process, self._unused_port())
        self._wait_apps([self._processes[spec.name] for spec in self._specs], deadline)

    def _base_env(self) -> dict[str, str]:
        # Proxy variables are dropped: every call in the shop is to 127.0.0.1, and httpx would
        # send the apps' registry calls through a proxy they name.
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith("MESH_")
            and key != "PROMETHEUS_MULTIPROC_DIR"
            and not key.lower().endswith("_proxy")
        }
        path = os.pathsep.join(p for p in (str(self.repo), env.get("PYTHONPATH", "")) if p)
        env.update(PYTHONPATH=path, PYTHONUNBUFFERED="1", NO_COLOR="1")
        return env

    def _app_env(self, spec: AppSpec) -> dict[str, str]:
        env = self._base_env()
        env.update(
            MESH_POLICY=spec.policy,
            MESH_REPORT_INTERVAL="1s",
            SHOP_FORWARD_CHAOS="1",  # the demo's chaos orders switch payments' fault on
        )
        if spec.version is not None:
            env["MESH_VERSION"] = spec.version
        if spec.workers > 1:
            metrics_dir = self.workdir / f"prometheus-{spec.name}"
            metrics_dir.mkdir(parents=True, exist_ok=True)
            env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
        env.update(self._extra_env)
        return env

    def _log(self, name: str) -> Path:
        return self.workdir / "logs" / f"{name}.log"

    def _unused_port(self) -> int:
        taken = {p.port for p in self._processes.values()}
        for _ in range(100):
            port = free_port()
            if port not in taken:
                return port
        raise ShopError("no free port on 127.0.0.1")

    def _argv(self, process: _Process, port: int) -> list[str]:
        if process.spec is not None:
            return process.spec.argv(port)
        data = self.workdir / "registry"
        return [
            sys.executable,
            "-m",
            "mesh_middleware",
            "registry",
            "--dev",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--data-dir",
            str(data),
        ]

    def _spawn(self, process: _Process, port: int) -> None:
        process.port = port
        process.argv = self._argv(process, port)
        if process.spec is not None:
            process.env["MESH_REGISTRY_URL"] = self.registry_url
        future = self._spawner.submit(self._popen, process)
        with self._lock:
            self._spawning.add(future)
        future.result()
        with self._lock:
            self._spawning.discard(future)

    def _popen(self, process: _Process) -> None:
        """On the spawner thread: start the process and record it before anyone is told."""
        log_file = process.log_path.open("ab")
        try:
            popen = subprocess.Popen(
                process.argv,
                cwd=self.repo,
                env=process.env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent if sys.platform == "linux" else None,
            )
        except BaseException:
            log_file.close()
            raise
        ref = process_ref(popen.pid)
        with self._lock:
            process.popen = popen
            process.log_file = log_file
            process.refs.add(ref)
            self._refs.add(ref)

    def _launch(self, process: _Process, deadline: float, *, port: int | None = None) -> None:
        """Spawn one process and wait until it is ready (new ports if its port was taken)."""
        for attempt in range(_PORT_ATTEMPTS):
            self._spawn(process, port if port is not None else self._unused_port())
            problem = self._wait_ready(process, deadline)
            if problem is None:
                return
            if port is None and self._lost_port(process) and attempt < _PORT_ATTEMPTS - 1:
                self._terminate([process])
                continue
            raise ShopError(self._failure(process, problem))

    def _wait_apps(self, apps: list[_Process], deadline: float) -> None:
        waiting = list(apps)
        attempts = dict.fromkeys((p.name for p in apps), 1)
        problems: dict[str, str] = {}
        while waiting:
            catalog: dict[str, list[dict[str, Any]]] = {}
            for process in list(waiting):
                problem = self._probe(process, catalog)
                if problem is None:
                    waiting.remove(process)
                    continue
                problems[process.name] = problem
                if process.running:
                    continue
                if self._lost_port(process) and attempts[process.name] < _PORT_ATTEMPTS:
                    attempts[process.name] += 1
                    self._terminate([process])
                    self._spawn(process, self._unused_port())
                    continue
                raise ShopError(self._failure(process, problem))
            if waiting and time.monotonic() > deadline:
                first = waiting[0]
                others = ", ".join(f"{p.name}: {problems.get(p.name, '?')}" for p in waiting[1:])
                raise ShopError(
                    self._failure(first, f"not ready within the timeout ({problems[first.name]})")
                    + (f"\n  also not ready: {others}" if others else "")
                )
            if waiting:
                time.sleep(0.2)

    def _wait_ready(self, process: _Process, deadline: float) -> str | None:
        problem = "no answer yet"
        while True:
            catalog: dict[str, list[dict[str, Any]]] = {}
            found = self._probe(process, catalog)
            if found is None:
                return None
            problem = found
            if not process.running:
                return problem
            if time.monotonic() > deadline:
                return f"not ready within the timeout ({problem})"
            time.sleep(0.1)

    def _probe(self, process: _Process, catalog: dict[str, list[dict[str, Any]]]) -> str | None:
        """``None`` when ready: healthy, and (an app) listed healthy in the catalog."""
        assert process.popen is not None
        code = process.popen.poll()
        if code is not None:
            return f"exited with status {code}"
        try:
            response = self._http.get(f"{process.url}/healthz")
        except httpx.HTTPError as exc:
            return f"/healthz: {type(exc).__name__}"
        if response.status_code != 200:
            return f"/healthz answered {response.status_code}"
        if process.spec is None:
            return None
        try:
            reported = response.json().get("instance")
        except (ValueError, AttributeError):
            reported = None
        service = process.spec.service
        if service not in catalog:
            try:
                catalog[service] = self.registered(service)
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                return f"registry catalog: {type(exc).__name__}"
        for entry in catalog[service]:
            # A restarted app on the same port finds its predecessor's entry still leased: it
            # is ready once it names that entry as its own (its registration was acknowledged).
            if (
                entry.get("port") == process.port
                and entry.get("healthy")
                and (reported is None or reported == entry.get("id"))
            ):
                process.instance_id = str(entry.get("id"))
                version = entry.get("version")
                process.version = str(version) if version else None
                return None
        return f"healthy, not yet registered in the catalog of {service!r}"

    def _lost_port(self, process: _Process) -> bool:
        """Whether it exited because someone took its port between our probe and its bind."""
        if process.running:
            return False
        return "address already in use" in log_tail(process.log_path, 40).lower()

    def _failure(self, process: _Process, problem: str) -> str:
        cause = first_error(process.log_path)
        return (
            f"{process.describe()} did not start: {problem}\n"
            + (f"  first error in its log: {cause}\n" if cause else "")
            + f"  last lines of {process.log_path}:\n{log_tail(process.log_path)}"
        )

    # -- looking ----------------------------------------------------------------------------

    @property
    def registry_url(self) -> str:
        """The registry's base URL."""
        return self._processes[REGISTRY].url

    @property
    def dashboard_url(self) -> str:
        """The registry's dashboard, signed in: the login link carries the viewer token (the
        registry writes it at first start)."""
        token = (self.workdir / "registry" / "viewer.token").read_text().strip()
        return f"{self.registry_url}/ui/login?token={token}"

    @property
    def gateway_url(self) -> str:
        """The gateway's base URL: the shop's public entry."""
        return self.url("gateway")

    def _named(self, name: str) -> _Process:
        if name in self._processes:
            return self._processes[name]
        matches = [p for p in self._processes.values() if p.spec and p.spec.service == name]
        if len(matches) == 1:
            return matches[0]
        known = ", ".join(self._processes)
        raise KeyError(f"no single process named {name!r} (known: {known})")

    def url(self, name: str) -> str:
        """The base URL of an instance (``"inventory-v2"``), a one-instance service
        (``"gateway"``, ``"orders"``) or ``"registry"``."""
        return self._named(name).url

    def metrics_url(self, name: str) -> str:
        """The metrics page of an instance, a one-instance service or the registry."""
        return self._named(name).url + "/metrics"

    def log_path(self, name: str) -> Path:
        """The file a process logs to (stdout and stderr)."""
        return self._named(name).log_path

    def log_paths(self, *, apps_only: bool = False) -> list[Path]:
        """The log files of every process started (or only the apps')."""
        return [
            p.log_path
            for p in self._processes.values()
            if p.popen is not None and (p.spec is not None or not apps_only)
        ]

    def instances(self, service: str | None = None) -> list[Instance]:
        """The running app processes (of ``service``, or all), in the contract's order."""
        found = []
        for process in self._processes.values():
            spec = process.spec
            if spec is None or not process.running or process.popen is None:
                continue
            if service is not None and spec.service != service:
                continue
            pid = process.popen.pid
            workers = tuple(sorted(descendants(pid) - {pid})) if spec.workers > 1 else ()
            found.append(
                Instance(
                    name=spec.name,
                    service=spec.service,
                    version=process.version or spec.version,
                    port=process.port,
                    pid=pid,
                    worker_pids=workers,
                    instance_id=process.instance_id,
                )
            )
        return found

    def registered(self, service: str) -> list[dict[str, Any]]:
        """The registry's catalog entries for ``service`` (``GET /v1/catalog/services/...``)."""
        response = self._http.get(f"{self.registry_url}/v1/catalog/services/{service}")
        response.raise_for_status()
        instances: list[dict[str, Any]] = response.json()["instances"]
        return instances

    def pids(self) -> list[int]:
        """Every process the shop started (gunicorn's workers included), running or not."""
        self._note_descendants(self._processes.values())
        with self._lock:
            return sorted({ref.pid for ref in self._refs})

    def leftover(self) -> list[int]:
        """The processes the shop started that still run."""
        with self._lock:
            refs = list(self._refs)
        return sorted(ref.pid for ref in refs if ref.alive())

    # -- disturbing ---------------------------------------------------------------------------

    def kill(self, name: str, signum: int = signal.SIGKILL, *, wait: bool = True) -> None:
        """Send ``signum`` to a process's group (gunicorn's workers too).

        With ``wait`` (for signals that end it), wait until it has exited; a process still
        running after the stop timeout is a :class:`ShopError`.
        """
        process = self._named(name)
        if process.popen is None:
            return
        self._note_descendants([process])
        signal_group(process.popen.pid, signum)
        if not wait:
            return
        try:
            process.popen.wait(timeout=STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            raise ShopError(
                f"{name} still runs {STOP_TIMEOUT_SECONDS:g} s after signal {signum}"
            ) from None
        self._wait_gone([process], time.monotonic() + 3.0)
        self._close_log(process)

    def restart(self, name: str, *, timeout: float = STARTUP_TIMEOUT_SECONDS) -> None:
        """Stop a process (if it runs) and start it again on the same port; wait until ready.

        The registry keeps its data directory, so registrations survive (telemetry does not).
        """
        process = self._named(name)
        if process.running:
            self._terminate([process])
        self._launch(process, time.monotonic() + timeout, port=process.port)

    def restart_registry(self, *, timeout: float = STARTUP_TIMEOUT_SECONDS) -> None:
        """Stop the registry and start it again on the same port and data directory."""
        self.restart(REGISTRY, timeout=timeout)

    # -- stopping ----------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop every process: apps first (so they deregister), then the registry.

        SIGTERM, a bounded wait, then SIGKILL; idempotent. :meth:`leftover` tells whether
        anything survived.
        """
        with self._lock:
            spawning = set(self._spawning)
        wait(spawning, timeout=STOP_TIMEOUT_SECONDS)  # a spawn a Ctrl-C cut short is recorded
        apps = [p for p in self._processes.values() if p.spec is not None]
        self._terminate(apps)
        self._terminate([p for p in self._processes.values() if p.spec is None])
        if not self._stopped:
            self._stopped = True
            # Only now: the thread's end sends the die-with-parent signal to what it started.
            self._spawner.shutdown(wait=True)
            self._http.close()

    def _note_descendants(self, processes: Iterable[_Process]) -> None:
        for process in processes:
            if process.running and process.popen is not None:
                refs = {process_ref(pid) for pid in descendants(process.popen.pid)}
                with self._lock:
                    process.refs |= refs
                    self._refs |= refs

    def _terminate(self, processes: list[_Process]) -> None:
        self._note_descendants(processes)
        running = [p for p in processes if p.popen is not None and p.popen.poll() is None]
        for process in running:
            assert process.popen is not None
            signal_group(process.popen.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
        for process in running:
            assert process.popen is not None
            try:
                process.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                signal_group(process.popen.pid, signal.SIGKILL)
                # One stuck even past SIGKILL (uninterruptible I/O) must not stop the others
                # from being stopped: leftover() reports it.
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.popen.wait(timeout=5)
        self._wait_gone(processes, time.monotonic() + 3.0)
        for process in processes:
            self._close_log(process)

    def _wait_gone(self, processes: list[_Process], deadline: float) -> None:
        """Wait for every recorded process (workers too) to exit; kill the stragglers."""
        refs = set().union(*(p.refs for p in processes)) if processes else set()
        while any(ref.alive() for ref in refs) and time.monotonic() < deadline:
            time.sleep(0.05)
        for process in processes:
            if any(ref.alive() for ref in process.refs) and process.popen is not None:
                signal_group(process.popen.pid, signal.SIGKILL)
        end = time.monotonic() + 2.0
        while any(ref.alive() for ref in refs) and time.monotonic() < end:
            time.sleep(0.05)

    @staticmethod
    def _close_log(process: _Process) -> None:
        if process.log_file is not None:
            process.log_file.close()
            process.log_file = None

    def __enter__(self) -> Shop:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
