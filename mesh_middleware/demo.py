"""``mesh demo``: two sample apps with the mesh inside them, and traffic that shows what it does.

The demo needs a source checkout (it runs the apps in ``sample_apps/``) and the test extras
(FastAPI, Flask, gunicorn). It:

1. validates ``sample_apps/*/policy.yaml`` the way ``mesh policy check`` does;
2. creates a signing key (a stand-in for the registry's issuer) and writes its JWKS to a
   temporary directory;
3. starts ``inventory`` (FastAPI under uvicorn) and ``orders`` (Flask under gunicorn, two
   workers) as real processes on free loopback ports, each in its own process group, with
   their logs in the temporary directory;
4. drives a bounded mix of requests from callers with valid, missing, forged, expired and
   misaddressed identities, path-traversal attempts and a chaos header, printing a table of
   outcomes as it goes;
5. on Ctrl-C or at the end of ``--duration``, stops every process it started (terminate, wait,
   kill), removes the temporary directory and prints a summary: each denial with the rule that
   decided it, ``mesh policy explain``'s answer for the same requests, the faults injected and
   the would-be denials audit mode logged.

Exit status: 0 when every scenario got the answer the policies promise; 1 when an app failed
to start, an answer was unexpected, an expected outcome never showed up or a process was left
behind; 2 when the demo cannot run here (no ``sample_apps/``, missing packages).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

import httpx

import mesh_middleware
from mesh_middleware import defaults
from mesh_middleware.errors import PolicyError
from mesh_middleware.identity.issuer import TokenIssuer
from mesh_middleware.policy.compiled import CompiledPolicy, compile_policy
from mesh_middleware.policy.explain import explain
from mesh_middleware.policy.loader import load_policy

__all__ = ["run_demo"]

STARTUP_TIMEOUT_SECONDS = 20.0
"""How long an app may take to answer ``/healthz`` before the demo gives up."""

STOP_TIMEOUT_SECONDS = 10.0
"""How long stopped apps get to exit after SIGTERM before they are killed."""

MAX_DURATION_SECONDS = 3600.0
"""Without ``--duration`` the demo runs until Ctrl-C, and at most this long."""

REQUESTS_PER_SECOND = 25.0
"""The traffic rate: modest, so the demo never loads the machine."""

REQUEST_TIMEOUT_SECONDS = 5.0
SLOW_SECONDS = 0.1
"""A request slower than this counts as delayed (``slow-items`` delays by 100 ms)."""

_REQUIRED_MODULES = ("fastapi", "flask", "gunicorn", "uvicorn")
_EXPLAIN_CLI = "mesh policy explain {policy} --from {caller} --method {method} --path {path}"


# --------------------------------------------------------------------------------------------
# The apps


@dataclass(frozen=True, slots=True)
class _AppSpec:
    name: str
    server: str  # as shown
    runner: str  # uvicorn | gunicorn
    module: str

    @property
    def policy(self) -> str:
        """The policy file, relative to the repository root (the apps' working directory)."""
        return f"sample_apps/{self.name}/policy.yaml"

    def command(self, port: int) -> list[str]:
        if self.runner == "gunicorn":
            return [
                sys.executable,
                "-m",
                "gunicorn",
                "--workers",
                "2",
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


_APPS = (
    _AppSpec("inventory", "FastAPI under uvicorn", "uvicorn", "sample_apps.inventory.app"),
    _AppSpec("orders", "Flask under gunicorn, 2 workers", "gunicorn", "sample_apps.orders.app"),
)


@dataclass(slots=True)
class _RunningApp:
    spec: _AppSpec
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]
    pids: set[int] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pgid(self) -> int:
        return self.process.pid  # started with start_new_session: its own process group


# --------------------------------------------------------------------------------------------
# The traffic


@dataclass(frozen=True, slots=True)
class _Scenario:
    app: str
    who: str  # who the caller is, as shown
    identity: str  # valid | none | forged | expired | wrong-audience
    caller: str  # the service the token names (for identities that carry one)
    method: str
    path: str  # request target as sent; "{n}" is replaced by an item number
    expect: int
    note: str
    raw: bool = False  # send the target byte for byte (no client-side normalization)
    headers: tuple[tuple[str, str], ...] = ()
    body: bool = False
    explain_as: str | None = None  # caller for `mesh policy explain`; None: not explainable
    weight: int = 1

    @property
    def label(self) -> str:
        return f"{self.app}: {self.who} {self.method} {self.path}"


_SCENARIOS = (
    # inventory: strict identity, rules, faults
    _Scenario("inventory", "gateway", "valid", "gateway", "GET", "/items/{n}", 200,
              "allowed by gateway-read-items; slow-items delays 10%",
              explain_as="gateway", weight=3),
    _Scenario("inventory", "orders", "valid", "orders", "POST", "/reserve", 200,
              "allowed by orders-reserve", body=True, explain_as="orders", weight=2),
    _Scenario("inventory", "gateway", "valid", "gateway", "POST", "/reserve", 403,
              "no allow rule matches: denied by default", body=True, explain_as="gateway"),
    _Scenario("inventory", "gateway", "valid", "gateway", "GET", "/admin/stats", 403,
              "deny rule no-admin", explain_as="gateway"),
    _Scenario("inventory", "anonymous", "none", "", "GET", "/items/{n}", 401,
              "strict: a mesh identity is required", explain_as="anonymous"),
    _Scenario("inventory", "forged gateway", "forged", "gateway", "GET", "/items/{n}", 401,
              "signed by another key under the real kid"),
    _Scenario("inventory", "expired gateway", "expired", "gateway", "GET", "/items/{n}", 401,
              "token expired 50 min ago"),
    _Scenario("inventory", "gateway->orders", "wrong-audience", "gateway", "GET", "/items/{n}",
              401, "token addressed to orders, not inventory"),
    _Scenario("inventory", "gateway", "valid", "gateway", "GET", "/items/..%2Fadmin", 400,
              "encoded slash: rejected before any rule", raw=True, explain_as="gateway"),
    _Scenario("inventory", "gateway", "valid", "gateway", "GET", "/public/../admin/stats", 403,
              "normalized to /admin/stats, then no-admin", raw=True, explain_as="gateway"),
    _Scenario("inventory", "gateway", "valid", "gateway", "GET", "/items/{n}", 503,
              "x-chaos: on -> fault chaos-switch aborts", headers=(("x-chaos", "on"),)),
    _Scenario("inventory", "anonymous", "none", "", "GET", "/healthz", 200,
              "public path: no identity needed", explain_as="anonymous"),
    # orders: permissive identity, authorization in audit mode
    _Scenario("orders", "gateway", "valid", "gateway", "POST", "/orders", 201,
              "no allow rules: allowed", body=True, explain_as="gateway"),
    _Scenario("orders", "anonymous", "none", "", "POST", "/orders", 201,
              "audit: would be denied by no-anonymous-orders", body=True,
              explain_as="anonymous"),
    _Scenario("orders", "anonymous", "none", "", "GET", "/orders/{n}", 200,
              "permissive: anonymous callers go on to the rules", explain_as="anonymous"),
    _Scenario("orders", "forged gateway", "forged", "gateway", "POST", "/orders", 401,
              "an invalid identity is 401 in every mode", body=True),
)  # fmt: skip


@dataclass(slots=True)
class _Tally:
    statuses: Counter[int | str] = field(default_factory=Counter)
    first_body: dict[int | str, str] = field(default_factory=dict)
    slow: int = 0
    workers: set[int] = field(default_factory=set)

    @property
    def total(self) -> int:
        return sum(self.statuses.values())


class _Tokens:
    """Identity tokens for each kind of caller, minted once and renewed at half their life."""

    def __init__(self, issuer: TokenIssuer) -> None:
        self.issuer = issuer
        # A forger who copied the real key id from the public JWKS, but not the private key.
        self.forger = TokenIssuer(trust_domain=issuer.trust_domain)
        self.forger.kid = issuer.kid
        self._cache: dict[tuple[str, str, str], tuple[str, float]] = {}

    def get(self, identity: str, caller: str, audience: str) -> str | None:
        if identity == "none":
            return None
        key = (identity, caller, audience)
        cached = self._cache.get(key)
        now = time.time()
        if cached is not None and (identity == "expired" or now < cached[1]):
            return cached[0]
        lifetime = self.issuer.lifetime
        if identity == "valid":
            token = self.issuer.mint(caller, audience)
        elif identity == "wrong-audience":
            token = self.issuer.mint(caller, "orders" if audience != "orders" else "inventory")
        elif identity == "forged":
            token = self.forger.mint(caller, audience)
        elif identity == "expired":
            token = self.issuer.mint(caller, audience, now=now - 3600)
        else:
            raise ValueError(f"unknown identity kind {identity!r}")
        self._cache[key] = (token, now + lifetime / 2)
        return token


# --------------------------------------------------------------------------------------------
# Signals: Ctrl-C (and SIGTERM) become KeyboardInterrupt, deferred while a process is spawned


class _Interrupts:
    def __init__(self) -> None:
        self._deferring = False
        self._pending = False
        self._installed = threading.current_thread() is threading.main_thread()
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self._deferring:
            self._pending = True
            return
        raise KeyboardInterrupt

    def install(self) -> None:
        if self._installed:
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handler)

    def restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """Hold interrupts back (e.g. between spawning a process and recording it)."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
        if self._pending:
            self._pending = False
            raise KeyboardInterrupt

    @contextmanager
    def ignored(self) -> Iterator[None]:
        """Ignore interrupts entirely (while stopping: cleanup must run to its end)."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
            self._pending = False


# --------------------------------------------------------------------------------------------
# Processes


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if the demo itself dies (Linux only)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _descendants(pid: int) -> set[int]:
    """The process and its descendants, from /proc (empty elsewhere)."""
    found: set[int] = set()
    stack = [pid]
    while stack:
        current = stack.pop()
        try:
            tasks = list(Path(f"/proc/{current}/task").iterdir())
        except OSError:
            continue
        found.add(current)
        for task in tasks:
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            stack.extend(int(child) for child in children if int(child) not in found)
    return found


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal_group(pgid: int, signum: int) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 8192))
            text = handle.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"(no log: {exc})"
    return "\n".join("    | " + line for line in text.splitlines()[-lines:])


_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit)\b.*")


def _first_error(path: Path) -> str | None:
    """The first ``SomeError: ...`` line of a log: usually the cause, not a consequence."""
    try:
        text = path.read_text("utf-8", "replace")
    except OSError:
        return None
    for line in text.splitlines():
        if _EXCEPTION_LINE.match(line):
            return line.strip()
    return None


class _StartError(Exception):
    pass


def _check_policies(repo: Path) -> dict[str, CompiledPolicy] | None:
    """Validate the sample apps' policy files the way ``mesh policy check`` does."""
    policies: dict[str, CompiledPolicy] = {}
    for spec in _APPS:
        try:
            loaded = load_policy(repo / spec.policy)
        except PolicyError as exc:
            for issue in exc.issues:
                print(issue, file=sys.stderr)
            continue
        # Name the file as the apps (and a user in the checkout) do, so reasons read the same.
        compiled = compile_policy(dataclasses.replace(loaded, source=spec.policy))
        policies[spec.name] = compiled
        rules = len(compiled.authorizer.rules)
        faults = len(compiled.loaded.policy.inbound.faults)
        print(f"  policy ok   {spec.policy} ({_plural(rules, 'rule')}, {_plural(faults, 'fault')})")
    return policies if len(policies) == len(_APPS) else None


# --------------------------------------------------------------------------------------------
# The demo


class _Demo:
    def __init__(
        self,
        root: Path,
        duration: float | None,
        policies: dict[str, CompiledPolicy],
        interrupts: _Interrupts,
    ) -> None:
        self.repo = root.parent  # root is sample_apps/; the apps run from the checkout
        self.duration = duration
        self.policies = policies
        self.interrupts = interrupts
        self.workdir = Path(tempfile.mkdtemp(prefix="mesh-demo-"))
        self.apps: list[_RunningApp] = []
        self.tallies = {s: _Tally() for s in _SCENARIOS}
        self.started_pids: set[int] = set()
        self.problems: list[str] = []
        self.rounds = 0
        self.sent = 0
        self.elapsed = 0.0
        self.interrupted = False
        self.tty = sys.stdout.isatty()
        self._table_lines = 0
        self._printed_at = -1
        self.finished = False
        self.audit_lines: list[str] = []
        self.leftover: list[int] = []

    # -- setup ---------------------------------------------------------------------------

    def _spawn(self, spec: _AppSpec, env: dict[str, str]) -> _RunningApp:
        port = _free_port()
        log_path = self.workdir / f"{spec.name}.log"
        with self.interrupts.deferred():
            log_file = log_path.open("ab")
            process = subprocess.Popen(
                spec.command(port),
                cwd=self.repo,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
            app = _RunningApp(spec, port, process, log_path, log_file, {process.pid})
            self.apps.append(app)
            self.started_pids.add(process.pid)
        return app

    def start_apps(self, client: httpx.Client, issuer: TokenIssuer) -> None:
        env = dict(os.environ)
        env.update(
            MESH_POLICY="",
            MESH_JWKS=str(self.workdir / "jwks.json"),
            MESH_ISSUER=issuer.issuer,
            MESH_TRUST_DOMAIN=issuer.trust_domain,
            PYTHONPATH=os.pathsep.join(p for p in (str(self.repo), env.get("PYTHONPATH", "")) if p),
            PYTHONUNBUFFERED="1",
            NO_COLOR="1",
        )
        for name in ("MESH_REGISTRY_URL", "MESH_JOIN_TOKEN"):
            env.pop(name, None)
        envs = {spec.name: {**env, "MESH_POLICY": spec.policy} for spec in _APPS}
        running = [self._spawn(spec, envs[spec.name]) for spec in _APPS]
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        for index, app in enumerate(running):
            for attempt in range(3):
                problem = self._wait_ready(client, app, deadline)
                if problem is None:
                    break
                in_use = "address already in use" in _log_tail(app.log_path, 40).lower()
                if app.process.poll() is not None and in_use and attempt < 2:
                    self._stop_one(app)  # someone took the port between probe and bind: retry
                    app = self._spawn(app.spec, envs[app.spec.name])
                    running[index] = app
                    continue
                cause = _first_error(app.log_path)
                raise _StartError(
                    f"{app.spec.name} ({app.spec.server}) did not start: {problem}\n"
                    + (f"  first error in its log: {cause}\n" if cause else "")
                    + f"  last lines of its log:\n{_log_tail(app.log_path)}"
                )
        for app in running:
            app.pids |= _descendants(app.process.pid)
            self.started_pids |= app.pids
            workers = sorted(app.pids - {app.process.pid})
            extra = f" (workers {', '.join(map(str, workers))})" if workers else ""
            print(
                f"  {app.spec.name:<10} {app.spec.server:<32} {app.url}  "
                f"pid {app.process.pid}{extra}"
            )
        print(f"  started pids: {' '.join(map(str, sorted(self.started_pids)))}")

    def _wait_ready(self, client: httpx.Client, app: _RunningApp, deadline: float) -> str | None:
        last = "no answer yet"
        while time.monotonic() < deadline:
            code = app.process.poll()
            if code is not None:
                return f"the process exited with status {code}"
            try:
                response = client.get(f"{app.url}/healthz", timeout=1.0)
                if response.status_code == 200:
                    return None
                last = f"/healthz answered {response.status_code}"
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}"
            time.sleep(0.1)
        return f"no healthy /healthz within {STARTUP_TIMEOUT_SECONDS:.0f} s ({last})"

    # -- traffic -------------------------------------------------------------------------

    def drive(self, client: httpx.Client, tokens: _Tokens) -> None:
        urls = {app.spec.name: app.url for app in self.apps}
        deck = [s for s in _SCENARIOS for _ in range(s.weight)]
        numbers = itertools.cycle(range(1, 6))
        limit = self.duration if self.duration is not None else MAX_DURATION_SECONDS
        start = time.monotonic()
        next_at = start
        next_table = start + (1.0 if self.tty else 5.0)
        try:
            while True:
                for scenario in deck:
                    now = time.monotonic()
                    if now - start >= limit and self.rounds >= 1:
                        return
                    if now < next_at:
                        time.sleep(next_at - now)
                    next_at = max(next_at + 1.0 / REQUESTS_PER_SECOND, time.monotonic() - 1.0)
                    self._send(client, urls, tokens, scenario, next(numbers))
                    self.elapsed = time.monotonic() - start
                    if time.monotonic() >= next_table:
                        self.print_table()
                        next_table = time.monotonic() + (1.0 if self.tty else 5.0)
                self.rounds += 1
        finally:
            self.elapsed = time.monotonic() - start

    def _send(
        self,
        client: httpx.Client,
        urls: dict[str, str],
        tokens: _Tokens,
        scenario: _Scenario,
        number: int,
    ) -> None:
        path = scenario.path.replace("{n}", str(number))
        headers = dict(scenario.headers)
        token = tokens.get(scenario.identity, scenario.caller, scenario.app)
        if token is not None:
            headers[defaults.IDENTITY_HEADER] = token
        url = urls[scenario.app] + ("/" if scenario.raw else path)
        extensions = {"target": path.encode("ascii")} if scenario.raw else None
        body = {"item": number, "quantity": 1} if scenario.body else None
        tally = self.tallies[scenario]
        began = time.monotonic()
        try:
            response = client.request(
                scenario.method, url, headers=headers, json=body, extensions=extensions
            )
        except httpx.HTTPError as exc:
            tally.statuses["err"] += 1
            tally.first_body.setdefault("err", f"{type(exc).__name__}: {exc}")
            self.sent += 1
            return
        took = time.monotonic() - began
        self.sent += 1
        status: int = response.status_code
        tally.statuses[status] += 1
        tally.first_body.setdefault(status, response.text[:300])
        if took >= SLOW_SECONDS:
            tally.slow += 1
        if scenario.app == "orders" and status < 300:
            try:
                worker = response.json().get("worker")
            except ValueError:
                worker = None
            if isinstance(worker, int):
                tally.workers.add(worker)

    # -- output --------------------------------------------------------------------------

    def _columns(self) -> list[int | str]:
        seen: set[int | str] = {200, 400, 401, 403, 503}
        for tally in self.tallies.values():
            seen |= set(tally.statuses)
        numbers = sorted(c for c in seen if isinstance(c, int))
        return [*numbers, *(["err"] if "err" in seen else [])]

    def table(self) -> list[str]:
        columns = self._columns()
        rate = self.sent / self.elapsed if self.elapsed > 0 else 0.0
        if self.finished:
            until = "stopped"
        elif self.duration is not None:
            until = f"running for {self.duration:g} s"
        else:
            until = f"running until Ctrl-C (at most {MAX_DURATION_SECONDS / 3600:g} h)"
        lines = [
            f"t={self.elapsed:5.1f} s  requests={self.sent}  ({rate:.1f}/s), {until}",
            f"  {'app':<10} {'caller':<15} {'request':<27} {'want':>4} "
            + " ".join(f"{c!s:>5}" for c in columns)
            + "  what it shows",
        ]
        for scenario, tally in self.tallies.items():
            counts = " ".join(f"{tally.statuses.get(c, 0) or '.'!s:>5}" for c in columns)
            unexpected = any(k != scenario.expect for k in tally.statuses)
            flag = "!" if unexpected else " "
            request = f"{scenario.method:<4} {scenario.path}"
            lines.append(
                f"{flag} {scenario.app:<10} {scenario.who:<15} {request:<27} "
                f"{scenario.expect:>4} {counts}  {scenario.note}"
            )
        return lines

    def print_table(self, *, final: bool = False) -> None:
        """Print the table; on a terminal, redraw it in place."""
        self.finished = final
        if not self.tty and final and self._printed_at == self.sent:
            return  # the last periodic table already shows these counts
        self._printed_at = self.sent
        lines = self.table()
        if self.tty:
            # Cut lines to the terminal's width: a wrapped line would break the redraw.
            width = max(40, shutil.get_terminal_size().columns - 1)
            lines = [line[:width] for line in lines]
            if self._table_lines:
                sys.stdout.write(f"\x1b[{self._table_lines}F\x1b[J")
        sys.stdout.write("\n".join(lines) + "\n")
        if not self.tty:
            sys.stdout.write("\n")
        sys.stdout.flush()
        self._table_lines = len(lines) if self.tty else 0

    # -- stopping ------------------------------------------------------------------------

    def _stop_one(self, app: _RunningApp) -> None:
        app.pids |= _descendants(app.process.pid)
        self.started_pids |= app.pids
        _signal_group(app.pgid, signal.SIGTERM)
        try:
            app.process.wait(timeout=STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            _signal_group(app.pgid, signal.SIGKILL)
            app.process.wait(timeout=5)
        app.log_file.close()
        if app in self.apps:
            self.apps.remove(app)
        self._reap_group(app)

    def _reap_group(self, app: _RunningApp) -> None:
        deadline = time.monotonic() + 3.0
        while _group_alive(app.pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _group_alive(app.pgid):
            _signal_group(app.pgid, signal.SIGKILL)
            time.sleep(0.2)

    def stop_all(self) -> None:
        """Stop every process the demo started: SIGTERM, a bounded wait, then SIGKILL."""
        apps = list(self.apps)
        for app in apps:
            app.pids |= _descendants(app.process.pid)
            self.started_pids |= app.pids
            _signal_group(app.pgid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
        for app in apps:
            try:
                app.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"  {app.spec.name} did not stop within {STOP_TIMEOUT_SECONDS:.0f} s: killed")
                _signal_group(app.pgid, signal.SIGKILL)
                app.process.wait(timeout=5)
            app.log_file.close()
            self._reap_group(app)
        self.apps.clear()
        for app in apps:
            if app.spec.name == "orders":
                self.audit_lines = _would_be_denials(app.log_path)
        self.leftover = sorted(pid for pid in self.started_pids if _alive(pid))

    # -- summary -------------------------------------------------------------------------

    def summarize(self) -> None:
        totals: Counter[int | str] = Counter()
        for tally in self.tallies.values():
            totals.update(tally.statuses)
        print()
        print("summary")
        print(
            f"  {self.sent} requests in {self.elapsed:.1f} s ({self.rounds} full rounds); totals: "
            + " ".join(f"{c}={totals.get(c, 0)}" for c in self._columns())
        )
        self._print_denials()
        self._print_explain()
        self._print_faults_and_audit()
        self._check(totals)

    def _print_denials(self) -> None:
        print("  denials: what the mesh answered, and the rule that decided")
        for scenario, tally in self.tallies.items():
            for status in sorted(s for s in tally.statuses if isinstance(s, int) and s >= 400):
                if status == 503:
                    continue
                document = _json(tally.first_body.get(status, ""))
                rule = document.get("rule")
                decided = f"rule {rule}" if rule else "no rule (default)"
                if status in (400, 401):
                    decided = str(document.get("error", "?"))
                print(
                    f"    {status} {scenario.app:<10} {scenario.who:<15} "
                    f"{scenario.method:<4} {scenario.path:<24} {decided}: "
                    f"{document.get('reason', tally.first_body.get(status, ''))}"
                )

    def _explained(self, scenario: _Scenario) -> tuple[dict[str, Any], bool, str]:
        assert scenario.explain_as is not None
        path = scenario.path.replace("{n}", "1")
        answer = explain(
            self.policies[scenario.app],
            caller=scenario.explain_as,
            method=scenario.method,
            path=path,
            headers=dict(scenario.headers),
        )
        tally = self.tallies[scenario]
        observed = [s for s in tally.statuses if isinstance(s, int)]
        if not observed:
            return answer, True, "not observed"
        status = max(observed, key=lambda s: tally.statuses[s])
        denied = status in (400, 401, 403)
        body_rule = _json(tally.first_body.get(status, "")).get("rule")
        if answer["decision"] == "deny":
            agrees = denied and answer["status"] == status and answer["rule"] == body_rule
        else:
            agrees = not denied
        seen = f"{status}" + (f" rule {body_rule}" if body_rule else "")
        return answer, agrees, seen

    def _print_explain(self) -> None:
        example = next(s for s in _SCENARIOS if s.path == "/admin/stats")
        tally = self.tallies[example]
        if tally.statuses.get(403):
            answer, agrees, _ = self._explained(example)
            command = _EXPLAIN_CLI.format(
                policy=f"sample_apps/{example.app}/policy.yaml",
                caller=example.explain_as,
                method=example.method,
                path=example.path,
            )
            print(f"  why was {example.who} denied {example.method} {example.path}?")
            print(f"    the app answered: 403 {tally.first_body[403]}")
            print(f"    $ {command}")
            rule = f" rule {answer['rule']!r}" if answer["rule"] else ""
            print(f"    {answer['decision']} ({answer['status']}){rule}: {answer['reason']}")
            print(f"    -> {'same status, same rule' if agrees else 'MISMATCH'}")
        print("  mesh policy explain, for every request it can model (caller, method, path):")
        for scenario in _SCENARIOS:
            if scenario.explain_as is None:
                continue
            answer, agrees, seen = self._explained(scenario)
            rule = f" rule {answer['rule']}" if answer["rule"] else ""
            if str(answer["reason"]).startswith("audit"):
                rule = f" (audit: would deny by {answer['rule']})"
            print(
                f"    {'ok' if agrees else 'MISMATCH':<8} {scenario.app:<10} "
                f"{scenario.explain_as:<10} {scenario.method:<4} {scenario.path:<24} "
                f"explain: {answer['decision']} {answer['status']}{rule}; app: {seen}"
            )
            if not agrees:
                self.problems.append(
                    f"mesh policy explain disagrees with the app for {scenario.label}"
                )

    def _print_faults_and_audit(self) -> None:
        chaos = next(s for s in _SCENARIOS if s.headers)
        tally = self.tallies[chaos]
        print(
            f"  faults: chaos-switch answered {tally.statuses.get(503, 0)} of {tally.total} "
            "requests carrying x-chaos: on with 503"
        )
        items = self.tallies[_SCENARIOS[0]]
        share = 100.0 * items.slow / items.total if items.total else 0.0
        print(
            f"          slow-items: {items.slow} of {items.total} GET /items/* took >= "
            f"{SLOW_SECONDS * 1000:.0f} ms ({share:.0f}%; the policy delays 10%)"
        )
        anonymous_orders = next(
            s for s in _SCENARIOS if s.app == "orders" and s.who == "anonymous" and s.body
        )
        let_through = self.tallies[anonymous_orders].statuses.get(201, 0)
        rules = Counter(_rule_of(line) for line in self.audit_lines)
        named = ", ".join(f"{rule} x{count}" for rule, count in rules.items()) or "none"
        print(
            f"  audit: orders let {let_through} anonymous POST /orders through; its log has "
            f"{len(self.audit_lines)} request_would_be_denied events (rules: {named})"
        )
        if let_through and not self.audit_lines:
            self.problems.append("orders (audit mode) logged no request_would_be_denied event")
        workers = set().union(*(t.workers for s, t in self.tallies.items() if s.app == "orders"))
        if workers:
            print(
                f"  orders was answered by {len(workers)} gunicorn worker(s), "
                f"each with its own Mesh: pids {' '.join(map(str, sorted(workers)))}"
            )

    def _check(self, totals: Counter[int | str]) -> None:
        for scenario, tally in self.tallies.items():
            unexpected = False
            for status, count in tally.statuses.items():
                if status != scenario.expect:
                    unexpected = True
                    detail = tally.first_body.get(status, "")
                    self.problems.append(
                        f"{scenario.label}: expected {scenario.expect}, "
                        f"got {status} x{count}: {detail[:200]}"
                    )
            if self.rounds >= 1 and not unexpected and not tally.statuses.get(scenario.expect):
                self.problems.append(f"{scenario.label}: never answered {scenario.expect}")
        if self.rounds >= 1:
            for status in (200, 400, 401, 403, 503):
                if not totals.get(status):
                    self.problems.append(f"no {status} was seen at all")
        elif self.interrupted:
            print("  interrupted before one full round of traffic: nothing more to check")


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _json(text: str) -> dict[str, Any]:
    try:
        document = json.loads(text)
    except ValueError:
        return {}
    return document if isinstance(document, dict) else {}


_RULE = re.compile(r"""rule=['"]?([\w.-]+)""")


def _rule_of(line: str) -> str:
    found = _RULE.search(line)
    return found.group(1) if found else "?"


def _would_be_denials(path: Path) -> list[str]:
    try:
        text = path.read_text("utf-8", "replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if "request_would_be_denied" in line]


def _sample_apps() -> Path | None:
    root = Path(mesh_middleware.__file__).resolve().parents[1] / "sample_apps"
    return root if (root / "inventory" / "app.py").is_file() else None


def run_demo(duration: float | None) -> int:
    """Run ``mesh demo``: sample apps with the mesh, traffic, a live table; return the exit status.

    ``duration`` is in seconds; ``None`` runs until Ctrl-C (at most an hour).
    """
    root = _sample_apps()
    if root is None:
        print(
            "mesh demo: sample_apps/ not found next to the mesh_middleware package.\n"
            "The demo runs the sample apps of a source checkout: clone the repository and run\n"
            "`pip install -e '.[test]'` there, then `mesh demo`.",
            file=sys.stderr,
        )
        return 2
    if os.name != "posix":
        print("mesh demo: needs a POSIX system (it runs gunicorn).", file=sys.stderr)
        return 2
    missing = [m for m in _REQUIRED_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        print(
            f"mesh demo: the sample apps need {', '.join(missing)}: "
            "pip install -e '.[test]' (or pip install fastapi flask gunicorn 'uvicorn[standard]')",
            file=sys.stderr,
        )
        return 2
    if duration is not None and not duration >= 0:
        print(f"mesh demo: --duration must be 0 or more seconds, got {duration}", file=sys.stderr)
        return 2

    print("mesh demo: two sample apps with the mesh inside them, and traffic from many callers")
    policies = _check_policies(root.parent)
    if policies is None:
        return 1
    interrupts = _Interrupts()
    interrupts.install()
    try:
        return _run(_Demo(root, duration, policies, interrupts))
    finally:
        interrupts.restore()


def _run(demo: _Demo) -> int:
    failed_start: str | None = None
    try:
        issuer = TokenIssuer()
        (demo.workdir / "jwks.json").write_text(json.dumps(issuer.jwks()))
        print(
            f"  identity    a fresh Ed25519 issuer for spiffe://{issuer.trust_domain} "
            f"(key id {issuer.kid[:12]}...)\n"
            f"  workdir     {demo.workdir}: JWKS and app logs (removed at exit)"
        )
        with httpx.Client(timeout=REQUEST_TIMEOUT_SECONDS, trust_env=False) as client:
            demo.start_apps(client, issuer)
            print("  traffic     Ctrl-C stops the demo and every process it started\n")
            demo.drive(client, _Tokens(issuer))
    except _StartError as exc:
        failed_start = str(exc)
        sys.stdout.flush()
        print(f"mesh demo: {failed_start}", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        demo.interrupted = True
    finally:
        # Cleanup runs to its end: a Ctrl-C that lands here (even before `ignored` is
        # entered) is swallowed and the stop is tried again, so nothing is left behind.
        while True:
            try:
                with demo.interrupts.ignored():
                    if demo.sent:
                        demo.print_table(final=True)
                    if demo.apps:
                        print(f"stopping {len(demo.apps)} apps ...", flush=True)
                    demo.stop_all()
                    shutil.rmtree(demo.workdir, ignore_errors=True)
                break
            except KeyboardInterrupt:
                demo.interrupted = True

    if demo.sent:
        demo.summarize()
    elif demo.interrupted:
        print("mesh demo: interrupted before any traffic was sent")
    pids = " ".join(map(str, sorted(demo.started_pids))) or "none"
    if demo.leftover:
        demo.problems.append(f"processes still running after stop: {demo.leftover}")
        print(f"  stopped processes: {pids}; STILL RUNNING: {demo.leftover}")
    else:
        print(f"  stopped processes: {pids} (none left running)")
    if failed_start is not None:
        return 1
    if demo.problems:
        print("\nmesh demo: FAILED")
        for problem in demo.problems:
            print(f"  - {problem}")
        return 1
    if demo.sent:
        print("\nmesh demo: ok, every request got the answer its policy promises")
    return 0
