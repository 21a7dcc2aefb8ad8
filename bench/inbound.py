"""Inbound overhead: the same trivial Starlette app served bare and behind ``MeshMiddleware``.

Measured as DESIGN §7 says the published figures were: one uvicorn worker (uvloop, httptools,
no access log) pinned to CPU 0, wrk (1 thread, 16 connections) pinned to CPU 1, interleaved
rounds pooled. Three servers, the very same app:

- ``bare``: the app alone;
- ``mesh``: behind ``MeshMiddleware``, which verifies a real Ed25519 JWT-SVID, authorizes every
  request against a 20-rule policy whose matching rule is not the first (``--policy FILE``
  measures another policy for service ``bench``), records Prometheus request metrics and a
  server span continuing the ``traceparent`` every request carries;
- ``mesh+log``: the same, plus one JSON access-log line per request (``sample: 1.0``), written
  to the server's stderr, which goes to a file (``--access-log-sink devnull``: to /dev/null);
- ``mesh+users`` (with ``--end-users``): the same server and policy as ``mesh`` plus end-user
  authentication (one issuer, an inline JWKS of an RSA key made for the run, audience
  ``bench``) and end-user conditions (``users``, ``claims``) on the rule that admits the
  requests, which also carry ``Authorization: Bearer <RS256 token>``. Compared with ``mesh``:
  the issue's bar is mesh+users >= 0.90x mesh (a verified token is cached, so what a request
  adds is finding the token, a cache hit and the conditions).

Besides requests/s and wrk's latency percentiles it reports the server's CPU time per request,
read from ``/proc/<pid>/stat`` (utime + stime) around each run: steadier than requests/s on
shared machines. Exit 1 when a bar (issue 5) is missed: mesh >= 0.70x and mesh+log >= 0.60x
the bare app's requests/s (median of the rounds' paired ratios); with ``--end-users`` also
mesh+users >= 0.90x mesh.

    .venv/bin/python bench/inbound.py                    # 3 rounds x 10 s
    .venv/bin/python bench/inbound.py --end-users        # and mesh+users against mesh
    .venv/bin/python bench/inbound.py --rounds 5 --seconds 15 --json > inbound.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import yaml
from _processes import PinnedProcess, free_port
from apps import PACKAGE_LINE

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO / "bench"
SERVER_CPU = 0
CLIENT_CPU = 1
CONNECTIONS = 16
ITEM_PATH = "/items/42"
IDENTITY_HEADER = "x-mesh-identity"
# Every request continues a sampled trace, as traffic from another meshed service would.
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
METRICS_PATH = "/metrics"
BARE, MESH, MESH_LOG, MESH_USERS = "bare", "mesh", "mesh+log", "mesh+users"
AGAINST = "@against"  # the name suffix of the variants run from --against's checkout
# Issue 5: requests/s of each meshed variant relative to the bare app in the same run.
BARS = {MESH: 0.70, MESH_LOG: 0.60}
# End-user authentication: mesh+users' requests/s relative to mesh's in the same run.
USERS_BAR = 0.90
USER_ISSUER = "https://idp.bench"
USER_SUBJECT = "alice"
USER_GROUPS = ["readers", "staff"]
USER_KID = "bench-user-key"
USER_TOKEN_LIFETIME = 30 * 24 * 3600
# What mesh+users adds to the rule that admits GET /items/* from the caller.
USER_CONDITIONS: dict[str, Any] = {"users": [f"{USER_ISSUER}/*"], "claims": {"groups": ["readers"]}}
CALLER = "caller"
SERVICE = "bench"
READY_TIMEOUT = 30.0
SATURATED_PCT = 90  # a server below this share of its core was waiting for wrk, not working
OTHER_LOAD_PCT = 25  # on a quiet machine this is near 0 (softirqs are charged to the processes)
WRK_GRACE = 30.0
LOG_TAIL_BYTES = 64 * 1024

# 20 rules as a real service would have them: denies first, allows for several callers, paths,
# methods and a couple of header conditions. The rule that admits the benchmark's requests
# (GET /items/* from 'caller') is 16th; other rules on /items/* are candidates it must beat.
POLICY = """\
service: bench
inbound:
  authentication: strict
  public: [/healthz]
  authorization:
    mode: enforce
    rules:
      - name: deny-admin-from-edge
        action: deny
        from: [gateway, web-frontend]
        paths: [/admin/*]
      - name: deny-debug-without-ticket
        action: deny
        paths: [/debug/*, /internal/*]
        headers:
          x-ops-ticket: {present: false}
      - name: deny-legacy-deletes
        action: deny
        methods: [DELETE]
        paths: [/v1/*]
      - name: deny-blocked-tenant-items
        action: deny
        paths: [/items/*, /orders/*]
        headers:
          x-tenant: {values: [blocked-co, suspended-*]}
      - name: orders-reserve
        action: allow
        from: [orders]
        methods: [POST]
        paths: [/reserve, /reservations/*]
      - name: gateway-catalog-read
        action: allow
        from: [gateway]
        methods: [GET, HEAD]
        paths: [/catalog/*, /search]
      - name: billing-invoices
        action: allow
        from: [billing]
        paths: [/invoices/*]
        not_methods: [DELETE]
      - name: prometheus-scrape
        action: allow
        from: [prometheus]
        methods: [GET]
        paths: [/metrics]
      - name: ops-admin
        action: allow
        from: [ops-console]
        paths: [/admin/*]
        headers:
          x-ops-ticket: {present: true}
      - name: inventory-sync-writes
        action: allow
        from: [inventory-sync]
        methods: [PUT, PATCH]
        paths: [/items/*]
      - name: reporting-exports
        action: allow
        from: [reporting]
        methods: [GET]
        paths: ["*.csv", "*.json"]
      - name: search-any-caller
        action: allow
        from: ["*"]
        methods: [GET]
        paths: [/search, /search/*]
      - name: orders-read-orders
        action: allow
        from: [orders, checkout]
        methods: [GET]
        paths: [/orders/*]
      - name: checkout-stock
        action: allow
        from: [checkout]
        methods: [GET, POST]
        paths: [/stock/*]
      - name: warehouse-items-write
        action: allow
        from: [warehouse]
        methods: [POST, PUT]
        paths: [/items/*]
        not_paths: ["*/price"]
      - name: caller-items-read
        action: allow
        from: [caller]
        methods: [GET, HEAD]
        paths: [/items/*]
      - name: recommendations-read
        action: allow
        from: [recommendations]
        methods: [GET]
        paths: [/items/*, /catalog/*]
      - name: support-lookup
        action: allow
        from: [support-tools]
        not_from: [support-tools-canary]
        methods: [GET]
        paths: [/customers/*, /orders/*]
      - name: audit-log-read
        action: allow
        from: [auditor]
        methods: [GET]
        paths: [/audit/*]
      - name: health-probes
        action: allow
        from: ["*"]
        methods: [GET]
        paths: [/readyz, /livez]
"""

_LATENCY = re.compile(r"^\s*(50|75|90|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s)\s*$", re.MULTILINE)
_REQUESTS = re.compile(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m)", re.MULTILINE)
_NON_2XX = re.compile(r"Non-2xx or 3xx responses:\s*(\d+)")
_SOCKET_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_UNIT_US = {"us": 1.0, "ms": 1_000.0, "s": 1_000_000.0, "m": 60_000_000.0}


class BenchError(RuntimeError):
    """The benchmark cannot run or its figures would be meaningless."""


@dataclass
class Run:
    """One wrk run against one server."""

    variant: str
    round: int
    requests: int
    seconds: float
    requests_per_second: float
    p50_us: float
    p99_us: float
    cpu_seconds: float
    cpu_us_per_request: float
    server_busy_pct: float
    wrk_busy_pct: float
    other_load_pct: float


@dataclass
class Summary:
    """All runs of one variant, pooled."""

    variant: str
    runs: list[Run] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return sum(r.requests for r in self.runs)

    @property
    def requests_per_second(self) -> float:
        return self.requests / sum(r.seconds for r in self.runs)

    @property
    def cpu_us_per_request(self) -> float:
        return sum(r.cpu_seconds for r in self.runs) * 1e6 / self.requests

    @property
    def p50_us(self) -> float:
        return statistics.median(r.p50_us for r in self.runs)

    @property
    def p99_us(self) -> float:
        return statistics.median(r.p99_us for r in self.runs)

    @property
    def best_requests_per_second(self) -> float:
        return max(r.requests_per_second for r in self.runs)

    @property
    def best_cpu_us_per_request(self) -> float:
        return min(r.cpu_us_per_request for r in self.runs)

    def as_dict(self) -> dict[str, Any]:
        return {
            "best_requests_per_second": round(self.best_requests_per_second, 1),
            "best_cpu_us_per_request": round(self.best_cpu_us_per_request, 2),
            "requests": self.requests,
            "requests_per_second": round(self.requests_per_second, 1),
            "p50_us": round(self.p50_us, 1),
            "p99_us": round(self.p99_us, 1),
            "cpu_us_per_request": round(self.cpu_us_per_request, 2),
            "runs": [asdict(r) for r in self.runs],
        }


class Server(PinnedProcess):
    """One uvicorn worker process serving ``bench/apps.py``, pinned to one CPU."""

    def __init__(
        self,
        name: str,
        env: dict[str, str],
        log_dir: Path,
        *,
        stderr_to_null: bool = False,
        variant: str | None = None,
        cwd: Path = REPO,
        request_headers: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        # Sent with every request (by wrk and the checks) besides the identity and traceparent.
        self.request_headers = dict(request_headers or {})
        self.variant = variant or name  # what it runs; the name also says from which checkout
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.url = f"{self.base}{ITEM_PATH}"
        self.stderr_to_null = stderr_to_null
        command = [
            sys.executable, "-m", "uvicorn", "apps:app",
            "--app-dir", str(BENCH_DIR),
            "--host", "127.0.0.1", "--port", str(self.port),
            "--loop", "uvloop", "--http", "httptools",
            "--no-access-log", "--log-level", "warning",
        ]  # fmt: skip
        if stderr_to_null:
            # sh execs the interpreter (same pid, so its CPU is still read from it) with stderr,
            # where the access log writes, on /dev/null; stdout stays in the log file.
            command = ["sh", "-c", 'exec "$0" "$@" 2>/dev/null', *command]
        log_path = log_dir / f"{name.replace('+', '-').replace('@', '-')}.log"
        self.log_path = log_path
        super().__init__(command, log_path, cpu=SERVER_CPU, cwd=cwd, env=env)

    def package_dir(self) -> Path | None:
        """Where the server imported mesh_middleware from (``bench/apps.py`` says so)."""
        for line in self.log_end().splitlines():
            if line.startswith(PACKAGE_LINE):
                return Path(line.removeprefix(PACKAGE_LINE)).resolve()
        return None

    def log_end(self) -> str:
        """The last lines of the server's log (stdout and stderr), without reading it all."""
        with self.log_path.open("rb") as log:
            size = log.seek(0, os.SEEK_END)
            log.seek(max(0, size - LOG_TAIL_BYTES))
            return log.read().decode("utf-8", "replace")

    def log_size(self) -> int:
        return self.log_path.stat().st_size

    def wait_ready(self, token: str) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if self.process.poll() is not None:
                raise BenchError(
                    f"{self.name} server exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            try:
                _get(self.url, token, self.request_headers)
                return
            except (OSError, urllib.error.URLError):
                if time.monotonic() > deadline:
                    raise BenchError(
                        f"{self.name} server not ready after {READY_TIMEOUT:.0f} s:\n"
                        f"{self.log_tail()}"
                    ) from None
                time.sleep(0.1)


def _get(url: str, token: str | None, extra: dict[str, str] | None = None) -> tuple[int, bytes]:
    headers = {"traceparent": TRACEPARENT}
    if token:
        headers[IDENTITY_HEADER] = token
    headers.update(extra or {})
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


def ensure_tools() -> str:
    """Return wrk's path, installing the Debian package when running as root."""
    if shutil.which("taskset") is None:
        raise BenchError("taskset (util-linux) is required to pin the server and wrk to CPUs")
    allowed = os.sched_getaffinity(0)
    if not {SERVER_CPU, CLIENT_CPU} <= allowed:
        raise BenchError(f"need CPUs {SERVER_CPU} and {CLIENT_CPU}; this process may use {allowed}")
    wrk = shutil.which("wrk")
    if wrk is not None:
        return wrk
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise BenchError(
            "wrk is not installed and cannot be installed from here: "
            "run `apt-get install -y wrk` as root (Debian/Ubuntu) and try again"
        )
    print("wrk missing: installing it with apt-get ...", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for step in (["apt-get", "update"], ["apt-get", "install", "-y", "wrk"]):
        done = subprocess.run(step, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise BenchError(f"`{' '.join(step)}` failed:\n{done.stderr[-2000:]}")
    wrk = shutil.which("wrk")
    if wrk is None:
        raise BenchError("apt-get installed wrk but it is not on PATH")
    return wrk


def with_telemetry(policy_text: str, *, access_log: bool) -> str:
    """The policy with metrics on (at ``/metrics``) and the access log on at sample 1.0 or off;
    the rest of its ``telemetry:`` section (tracing) is kept."""
    try:
        document = yaml.safe_load(policy_text)
    except yaml.YAMLError as exc:
        raise BenchError(f"invalid bench policy: {exc}") from None
    if not isinstance(document, dict):
        raise BenchError("invalid bench policy: not a mapping")
    telemetry = dict(document.get("telemetry") or {})
    telemetry["metrics"] = {"enabled": True, "path": METRICS_PATH}
    telemetry["access_log"] = {"enabled": access_log, "sample": 1.0}
    document["telemetry"] = telemetry
    return yaml.safe_dump(document, sort_keys=False)


def write_mesh_files(directory: Path, policy_text: str) -> tuple[dict[str, Path], Path, str, int]:
    """Write the policy files (one per meshed variant) and the JWKS file; return them, a token
    for the caller and the number of authorization rules."""
    from mesh_middleware import PolicyError, TokenIssuer
    from mesh_middleware.policy.compiled import compile_policy_text

    policies: dict[str, Path] = {}
    rules = 0
    for variant, access_log in ((MESH, False), (MESH_LOG, True)):
        text = with_telemetry(policy_text, access_log=access_log)
        try:
            compiled = compile_policy_text(text, "bench policy")
        except PolicyError as exc:
            raise BenchError(f"invalid bench policy: {exc}") from None
        if compiled.service != SERVICE:
            raise BenchError(f"the bench policy must be for service {SERVICE!r}")
        rules = len(compiled.authorizer.rules)
        policies[variant] = directory / f"policy-{variant.replace('+', '-')}.yaml"
        policies[variant].write_text(text)
    issuer = TokenIssuer()
    token = issuer.mint(CALLER, SERVICE, lifetime=3600)
    jwks = directory / "jwks.json"
    jwks.write_text(json.dumps(issuer.jwks()))
    return policies, jwks, token, rules


@dataclass(frozen=True)
class EndUserTokens:
    """What mesh+users runs with: its issuer's JWKS (JSON text, the public key only), a token
    that policy admits, and that token with its payload changed (the signature no longer
    verifies)."""

    jwks: str
    token: str
    tampered: str

    @property
    def header(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def end_user_tokens() -> EndUserTokens:
    """A fresh RSA key (2048 bits) for issuer ``USER_ISSUER``, and RS256 tokens signed with it
    for user ``USER_SUBJECT`` (groups ``USER_GROUPS``, audience ``bench``, expiring in 30
    days)."""
    import base64

    from joserfc import jwt
    from joserfc.jwk import RSAKey

    key = RSAKey.generate_key(2048, parameters={"kid": USER_KID, "use": "sig", "alg": "RS256"})
    now = int(time.time())
    claims = {
        "iss": USER_ISSUER,
        "sub": USER_SUBJECT,
        "aud": SERVICE,
        "groups": USER_GROUPS,
        "iat": now,
        "exp": now + USER_TOKEN_LIFETIME,
    }
    token = jwt.encode({"alg": "RS256", "kid": USER_KID, "typ": "JWT"}, claims, key)
    header, _, signature = token.split(".")
    forged = json.dumps({**claims, "sub": "mallory"}, separators=(",", ":")).encode()
    payload = base64.urlsafe_b64encode(forged).rstrip(b"=").decode()
    jwks = json.dumps({"keys": [key.as_dict(private=False)]}, separators=(",", ":"))
    return EndUserTokens(jwks=jwks, token=token, tampered=f"{header}.{payload}.{signature}")


def with_end_users(policy_text: str, jwks: str) -> tuple[str, str]:
    """The mesh variant's policy with end-user authentication (issuer ``USER_ISSUER``, keys
    ``jwks`` inline, audience ``bench``) and ``USER_CONDITIONS`` added to the rule that admits
    ``GET /items/42`` from the caller; and that rule's name."""
    from mesh_middleware import PolicyError
    from mesh_middleware.identity.end_user import EndUser
    from mesh_middleware.policy.compiled import compile_policy_text

    text = with_telemetry(policy_text, access_log=False)
    try:
        admitting = compile_policy_text(text, "bench policy").authorizer.decide(
            CALLER, "GET", ITEM_PATH, {}
        )
    except PolicyError as exc:
        raise BenchError(f"invalid bench policy: {exc}") from None
    if not admitting.allowed or admitting.rule is None:
        raise BenchError(f"no rule of the bench policy allows GET {ITEM_PATH} from {CALLER!r}")
    document = yaml.safe_load(text)
    inbound = document.setdefault("inbound", {})
    rules = (inbound.get("authorization") or {}).get("rules") or []
    rule = next((r for r in rules if r.get("name") == admitting.rule), None)
    if rule is None:
        raise BenchError(f"cannot find rule {admitting.rule!r} in the bench policy")
    rule["users"] = list(USER_CONDITIONS["users"])
    rule["claims"] = {**(rule.get("claims") or {}), **USER_CONDITIONS["claims"]}
    inbound["end_users"] = {
        "issuers": [{"issuer": USER_ISSUER, "jwks": jwks, "audiences": [SERVICE]}]
    }
    text = yaml.safe_dump(document, sort_keys=False)
    try:
        authorizer = compile_policy_text(text, "bench policy (end users)").authorizer
    except PolicyError as exc:
        raise BenchError(f"invalid bench policy with end users: {exc}") from None
    user = EndUser(
        issuer=USER_ISSUER,
        subject=USER_SUBJECT,
        claims={"sub": USER_SUBJECT, "groups": USER_GROUPS},
        expires_at=time.time() + USER_TOKEN_LIFETIME,
    )
    if not authorizer.decide(CALLER, "GET", ITEM_PATH, {}, user).allowed:
        raise BenchError(f"the end-user policy does not admit {USER_SUBJECT!r}")
    if authorizer.decide(CALLER, "GET", ITEM_PATH, {}, None).allowed:
        raise BenchError("the end-user policy admits an anonymous user")
    return text, admitting.rule


def mesh_version() -> str:
    from mesh_middleware import __version__

    return __version__


def request_path_build() -> str:
    """How the servers' request path runs: compiled by the install (setup.py), or its source."""
    from mesh_middleware import _compiled

    return "compiled (mypyc)" if _compiled.compiled() else "Python source"


def check_servers(servers: list[Server], token: str, users: EndUserTokens | None = None) -> None:
    """Fail unless the meshed servers really verify identities (and mesh+users end users) and
    all servers answer alike."""
    for server in servers:
        status, body = _get(server.url, token, server.request_headers)
        if status != 200 or json.loads(body).get("id") != 42:
            raise BenchError(f"{server.name}: GET {ITEM_PATH} with a token gave {status} {body!r}")
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    for mesh in servers:
        if mesh.variant == BARE:
            continue
        extra = mesh.request_headers
        status, body = _get(mesh.url, None, extra)
        if status != 401:
            raise BenchError(
                f"{mesh.name}: GET {ITEM_PATH} without a token gave {status}, expected 401"
            )
        status, body = _get(mesh.url, forged, extra)
        if status != 401:
            raise BenchError(
                f"{mesh.name}: GET {ITEM_PATH} with a forged token gave {status}, expected 401"
            )
        status, body = _get(mesh.base + "/admin/x", token, extra)
        if status != 403:
            raise BenchError(f"{mesh.name}: GET /admin/x as {CALLER!r} gave {status}, expected 403")
        if mesh.variant != MESH_USERS:
            continue
        if users is None:
            raise BenchError(f"{mesh.name}: no end-user tokens to check it with")
        status, body = _get(mesh.url, token)
        if status != 403:
            raise BenchError(
                f"{mesh.name}: GET {ITEM_PATH} without an end-user token (an anonymous user)"
                f" gave {status}, expected 403"
            )
        status, body = _get(mesh.url, token, {"Authorization": f"Bearer {users.tampered}"})
        if status != 401:
            raise BenchError(
                f"{mesh.name}: GET {ITEM_PATH} with a tampered end-user token gave {status},"
                " expected 401"
            )


def check_packages(servers: list[Server], against: Path | None) -> None:
    """Fail unless each meshed server runs the mesh_middleware of the checkout it is for."""
    for server in servers:
        if server.variant == BARE:
            continue
        checkout = against if server.name.endswith(AGAINST) else REPO
        assert checkout is not None
        found = server.package_dir()
        if found != checkout.resolve() / "mesh_middleware":
            raise BenchError(f"{server.name}: runs mesh_middleware from {found}, not {checkout}")


_COUNTED = re.compile(
    r"^mesh_requests_total\{(.*)\} ([0-9.e+]+)$",  # a route template may hold braces
    re.MULTILINE,
)


def counted_requests(server: Server) -> float:
    """The server's ``mesh_requests_total`` for ``GET /items/{item_id:int}`` answered 200 to
    the caller, from its metrics page."""
    status, body = _get(server.base + METRICS_PATH, None)
    if status != 200:
        raise BenchError(f"{server.name}: GET {METRICS_PATH} gave {status}, expected 200")
    total = 0.0
    for labels, value in _COUNTED.findall(body.decode("utf-8", "replace")):
        if (
            f'source_service="{CALLER}"' in labels
            and 'route="/items/{item_id:int}"' in labels
            and 'response_code="200"' in labels
            and 'reporter="destination"' in labels
        ):
            total += float(value)
    return total


def check_telemetry(servers: list[Server], counted_before: dict[str, float], requests: int) -> None:
    """Fail unless the meshed servers counted the measured requests in their metrics and only
    ``mesh+log`` wrote access lines, continuing the trace of the requests' ``traceparent``."""
    for server in servers:
        if server.variant == BARE:
            continue
        counted = counted_requests(server) - counted_before[server.name]
        if counted < requests:
            raise BenchError(
                f"{server.name}: mesh_requests_total grew by {counted:.0f} during the runs,"
                f" wrk made at least {requests} requests: are metrics on?"
            )
        lines = [line for line in server.log_end().splitlines() if '"event":"access"' in line]
        if server.variant in (MESH, MESH_USERS):
            if lines:
                raise BenchError(f"{server.name}: wrote access lines, its access log is off")
            continue
        if server.stderr_to_null:
            continue  # the lines went to /dev/null: nothing to look at
        if not lines:
            raise BenchError(f"{server.name}: no access lines in {server.log_path}")
        last = json.loads(lines[-1])
        if last.get("trace_id") != TRACE_ID or last.get("caller") != CALLER:
            raise BenchError(
                f"{server.name}: the last access line does not continue the trace of the"
                f" requests' traceparent or lacks the caller: {lines[-1]}"
            )


def _micros(value: str, unit: str) -> float:
    return float(value) * _UNIT_US[unit]


def parse_wrk(output: str) -> tuple[int, float, dict[str, float]]:
    """Requests, duration in seconds and latency percentiles (µs) from ``wrk --latency``."""
    totals = _REQUESTS.search(output)
    latencies = {p: _micros(v, u) for p, v, u in _LATENCY.findall(output)}
    if totals is None or "50" not in latencies or "99" not in latencies:
        raise BenchError(f"cannot parse wrk output:\n{output}")
    non_2xx = _NON_2XX.search(output)
    if non_2xx is not None and int(non_2xx.group(1)) > 0:
        raise BenchError(f"wrk saw {non_2xx.group(1)} non-2xx responses:\n{output}")
    errors = _SOCKET_ERRORS.search(output)
    if errors is not None and any(int(n) for n in errors.groups()):
        raise BenchError(f"wrk saw socket errors:\n{output}")
    seconds = _micros(totals.group(2), totals.group(3)) / 1e6
    return int(totals.group(1)), seconds, latencies


def _busy_seconds(cpus: tuple[int, ...]) -> float:
    """Time ``cpus`` have spent busy (not idle or waiting on I/O) since boot, all processes."""
    busy = 0
    names = {f"cpu{cpu}" for cpu in cpus}
    for line in Path("/proc/stat").read_text().splitlines():
        name, _, rest = line.partition(" ")
        if name in names:
            # user nice system idle iowait irq softirq steal ...
            ticks = [int(n) for n in rest.split()]
            busy += ticks[0] + ticks[1] + ticks[2] + ticks[5] + ticks[6] + ticks[7]
            names.discard(name)
    if names:
        raise BenchError(f"no {sorted(names)} in /proc/stat")
    return busy / os.sysconf("SC_CLK_TCK")


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass
class _Cpu:
    server: float
    wrk: float
    other: float


def run_wrk(wrk: str, server: Server, token: str, seconds: int) -> tuple[str, _Cpu]:
    """Run wrk against ``server``; return its output and the CPU seconds the server, wrk and
    everything else on both cores (other processes, softirqs, the idle server) used meanwhile."""
    command = [
        "taskset", "-c", str(CLIENT_CPU), wrk,
        "-t1", f"-c{CONNECTIONS}", f"-d{seconds}s", "--latency",
        "-H", f"{IDENTITY_HEADER}: {token}",
        "-H", f"traceparent: {TRACEPARENT}",
        *(f for name, value in server.request_headers.items() for f in ("-H", f"{name}: {value}")),
        server.url,
    ]  # fmt: skip
    cores = (SERVER_CPU, CLIENT_CPU)
    server_before, busy_before = server.cpu_seconds(), _busy_seconds(cores)
    wrk_before = _children_cpu_seconds()
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=seconds + WRK_GRACE, check=False
    )
    wrk_cpu = _children_cpu_seconds() - wrk_before
    server_cpu = server.cpu_seconds() - server_before
    busy = _busy_seconds(cores) - busy_before
    if done.returncode != 0:
        raise BenchError(f"wrk failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    if server.process.poll() is not None:
        raise BenchError(f"{server.name} server died during the run:\n{server.log_tail()}")
    return done.stdout, _Cpu(server_cpu, wrk_cpu, max(0.0, busy - server_cpu - wrk_cpu))


def measure(wrk: str, server: Server, token: str, seconds: int, round_: int) -> Run:
    output, cpu = run_wrk(wrk, server, token, seconds)
    requests, elapsed, latencies = parse_wrk(output)
    if requests == 0:
        raise BenchError(f"wrk made no requests:\n{output}")
    return Run(
        variant=server.name,
        round=round_,
        requests=requests,
        seconds=elapsed,
        requests_per_second=requests / elapsed,
        p50_us=latencies["50"],
        p99_us=latencies["99"],
        cpu_seconds=cpu.server,
        cpu_us_per_request=cpu.server * 1e6 / requests,
        server_busy_pct=100 * cpu.server / elapsed,
        wrk_busy_pct=100 * cpu.wrk / elapsed,
        other_load_pct=100 * cpu.other / elapsed,
    )


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--seconds", type=int, default=10, help="seconds per wrk run (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up seconds per server")
    parser.add_argument("--json", action="store_true", help="write the figures as JSON to stdout")
    parser.add_argument(
        "--no-check", action="store_true", help="print only: exit 0 if a bar is missed"
    )
    parser.add_argument(
        "--policy",
        type=Path,
        help="use this policy file instead of the built-in 20-rule one (service 'bench', must"
        " allow GET /items/42 from 'caller' and deny GET /admin/x); its telemetry section gets"
        " metrics on and the access log off (mesh) or on at sample 1.0 (mesh+log)",
    )
    parser.add_argument(
        "--access-log-sink",
        choices=("file", "devnull"),
        default="file",
        help="where mesh+log's stderr (its access lines) goes: its log file in the temporary"
        " directory (default) or /dev/null",
    )
    parser.add_argument(
        "--against",
        type=Path,
        metavar="CHECKOUT",
        help="also run mesh and mesh+log with the mesh_middleware of another checkout (this"
        " checkout's app), in the same rounds, and print each against its counterpart: on a"
        " noisy machine, the way to see what a change does",
    )
    parser.add_argument(
        "--end-users",
        action="store_true",
        help="also run mesh+users: mesh's server and policy plus end-user authentication (an"
        " inline JWKS) and user and claim conditions on the admitting rule, every request"
        " carrying an RS256 user token; bar: mesh+users >= 0.90x mesh's requests/s (this"
        " checkout only, also with --against)",
    )
    args = parser.parse_args(argv)
    if args.against is not None and not (args.against / "mesh_middleware").is_dir():
        parser.error(f"--against: no mesh_middleware package in {args.against}")
    if not (1 <= args.rounds <= 20 and 1 <= args.seconds <= 120 and 0 <= args.warmup <= 30):
        parser.error("--rounds 1..20, --seconds 1..120, --warmup 0..30")
    out: TextIO = sys.stderr if args.json else sys.stdout
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    servers: list[Server] = []
    summaries: dict[str, Summary] = {}
    rules = 0
    try:
        wrk = ensure_tools()
        with tempfile.TemporaryDirectory(prefix="mesh-bench-") as tmp:
            directory = Path(tmp)
            try:
                policy_text = args.policy.read_text() if args.policy else POLICY
            except OSError as exc:
                raise BenchError(f"cannot read {args.policy}: {exc}") from None
            policies, jwks, token, rules = write_mesh_files(directory, policy_text)
            users: EndUserTokens | None = None
            users_rule = ""
            if args.end_users:
                users = end_user_tokens()
                users_policy, users_rule = with_end_users(policy_text, users.jwks)
                policies[MESH_USERS] = directory / "policy-mesh-users.yaml"
                policies[MESH_USERS].write_text(users_policy)
            common = {"BENCH_JWKS": str(jwks)}
            servers.append(Server(BARE, {**common, "BENCH_MESH": "0"}, directory))
            for variant in (MESH, MESH_LOG):
                env = {**common, "BENCH_MESH": "1", "BENCH_POLICY": str(policies[variant])}
                to_null = variant == MESH_LOG and args.access_log_sink == "devnull"
                servers.append(Server(variant, env, directory, stderr_to_null=to_null))
                if args.against is not None:
                    # Started from the other checkout, `python -m` puts its package first on
                    # the path, ahead of this checkout's (editable) install.
                    servers.append(
                        Server(
                            f"{variant}{AGAINST}",
                            env,
                            directory,
                            stderr_to_null=to_null,
                            variant=variant,
                            cwd=args.against.resolve(),
                        )
                    )
            if users is not None:
                env = {**common, "BENCH_MESH": "1", "BENCH_POLICY": str(policies[MESH_USERS])}
                servers.append(Server(MESH_USERS, env, directory, request_headers=users.header))
            for server in servers:
                server.wait_ready(token)
            check_servers(servers, token, users)
            check_packages(servers, args.against)
            log_server = next(s for s in servers if s.name == MESH_LOG)
            sink = (
                "/dev/null"
                if args.access_log_sink == "devnull"
                else f"a file ({log_server.log_path}, with the server's other output)"
            )
            print(
                f"mesh-middleware {mesh_version()} ({request_path_build()}),"
                f" {args.policy or 'built-in policy'}:"
                f" {rules} rules,"
                f" python {sys.version.split()[0]}, load average {os.getloadavg()[0]:.2f}",
                file=out,
            )
            if request_path_build() != "compiled (mypyc)":
                from mesh_middleware import _compiled

                print(
                    "  NOTE: the servers run the mesh's Python source (an install without a C"
                    f" compiler, or {_compiled.PURE_PYTHON_ENV} set): the bars are for the"
                    " compiled build",
                    file=out,
                )
            print(
                f"server on CPU {SERVER_CPU}, wrk on CPU {CLIENT_CPU}, {CONNECTIONS} connections, "
                f"{args.rounds} rounds x {args.seconds} s, warm-up {args.warmup} s",
                file=out,
            )
            print(
                f"  bare: the app; mesh: identity + authorization + metrics + a server span"
                f" continuing each request's traceparent; mesh+log: and a JSON access line per"
                f" request, to stderr = {sink}",
                file=out,
            )
            if users is not None:
                print(
                    f"  mesh+users: mesh's policy plus end users (issuer {USER_ISSUER}, an inline"
                    f" RSA JWKS, audience {SERVICE}) and {json.dumps(USER_CONDITIONS)} on rule"
                    f" {users_rule!r}; its requests also carry Authorization: Bearer <RS256"
                    f" token, {len(users.token)} characters> for {USER_SUBJECT!r}",
                    file=out,
                )
            print(
                f"  rounds alternate the order ({', '.join(s.name for s in servers)},"
                " then the reverse);"
                " busy = % of one CPU during the run; other = busy time of both cores spent"
                " neither in the server nor in wrk (kernel softirqs, other processes)",
                file=out,
            )
            if args.warmup:
                for server in servers:
                    run_wrk(wrk, server, token, args.warmup)
            counted_before = {s.name: counted_requests(s) for s in servers if s.variant != BARE}
            summaries = {s.name: Summary(s.name) for s in servers}
            width = len(MESH_USERS) if users is not None else 8  # the variant's column
            for round_ in range(1, args.rounds + 1):
                order = servers if round_ % 2 else servers[::-1]
                for server in order:
                    run = measure(wrk, server, token, args.seconds, round_)
                    summaries[server.name].runs.append(run)
                    print(
                        f"  round {round_} {run.variant:<{width}}"
                        f"  {run.requests_per_second:9.1f} req/s"
                        f"  p50 {run.p50_us / 1000:6.2f} ms  p99 {run.p99_us / 1000:6.2f} ms"
                        f"  cpu {run.cpu_us_per_request:6.1f} us/req"
                        f"  (busy: server {run.server_busy_pct:3.0f}%, wrk"
                        f" {run.wrk_busy_pct:3.0f}%, other {run.other_load_pct:3.0f}%)",
                        file=out,
                    )
            check_telemetry(servers, counted_before, min(s.requests for s in summaries.values()))
            check_servers(servers, token, users)
    except BenchError as exc:
        print(f"inbound bench failed: {exc}", file=sys.stderr)
        return 1
    finally:
        for server in servers:
            server.stop()
    met = report(summaries, args, rules, out)
    if not met and not args.no_check:
        return 1
    return 0


@dataclass
class _Arm:
    """One meshed variant against the bare app of the same run."""

    ratio: float
    added_cpu: float
    cpu_ratio: float
    best_ratio: float
    best_added: float
    paired: list[float]
    paired_cpu: list[float]

    @property
    def paired_ratio(self) -> float:
        return statistics.median(self.paired)

    @property
    def paired_added(self) -> float:
        return statistics.median(self.paired_cpu)


def compare(bare: Summary, arm: Summary) -> _Arm:
    # Each meshed run against the bare run of the same round: drift of the shared machine
    # between rounds cancels out of these pairs.
    return _Arm(
        ratio=arm.requests_per_second / bare.requests_per_second,
        added_cpu=arm.cpu_us_per_request - bare.cpu_us_per_request,
        cpu_ratio=bare.cpu_us_per_request / arm.cpu_us_per_request,
        best_ratio=arm.best_requests_per_second / bare.best_requests_per_second,
        best_added=arm.best_cpu_us_per_request - bare.best_cpu_us_per_request,
        paired=[
            m.requests_per_second / b.requests_per_second
            for b, m in zip(bare.runs, arm.runs, strict=True)
        ],
        paired_cpu=[
            m.cpu_us_per_request - b.cpu_us_per_request
            for b, m in zip(bare.runs, arm.runs, strict=True)
        ],
    )


def report(
    summaries: dict[str, Summary], args: argparse.Namespace, rules: int, out: TextIO
) -> bool:
    """Print the pooled figures and the bars; whether every bar is met."""
    bare = summaries[BARE]
    meshed = [summaries[MESH], summaries[MESH_LOG]]
    print("\npooled (p50/p99: median of the rounds' wrk percentiles)", file=out)
    print(f"  {'variant':<10}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'cpu us/req':>12}", file=out)
    users = summaries.get(MESH_USERS)
    for summary in (bare, *meshed, *([users] if users is not None else [])):
        print(
            f"  {summary.variant:<10}{summary.requests_per_second:10.1f}"
            f"{summary.p50_us / 1000:9.2f}{summary.p99_us / 1000:9.2f}"
            f"{summary.cpu_us_per_request:12.1f}",
            file=out,
        )
    arms: dict[str, _Arm] = {}
    for summary in meshed:
        arm = arms[summary.variant] = compare(bare, summary)
        name = f"{summary.variant}/bare"
        print(
            f"  {name}: {arm.ratio:.2f}x requests/s, {arm.added_cpu:+.1f} us CPU per request, "
            f"p50 {(summary.p50_us - bare.p50_us) / 1000:+.2f} ms, "
            f"p99 {(summary.p99_us - bare.p99_us) / 1000:+.2f} ms",
            file=out,
        )
        print(
            f"    requests/s ratio a saturated server would show (bare CPU / {summary.variant}"
            f" CPU per request): {arm.cpu_ratio:.2f}x",
            file=out,
        )
        print(
            f"    best rounds (least disturbed): bare {bare.best_requests_per_second:.1f} req/s"
            f" {bare.best_cpu_us_per_request:.1f} us/req, {summary.variant}"
            f" {summary.best_requests_per_second:.1f} req/s"
            f" {summary.best_cpu_us_per_request:.1f} us/req -> {arm.best_ratio:.2f}x,"
            f" {arm.best_added:+.1f} us CPU per request",
            file=out,
        )
        print(
            f"    paired rounds (median of {len(arm.paired)}): {arm.paired_ratio:.2f}x"
            f" requests/s (range {min(arm.paired):.2f}-{max(arm.paired):.2f}),"
            f" {arm.paired_added:+.1f} us CPU per request",
            file=out,
        )
    log_added = summaries[MESH_LOG].cpu_us_per_request - summaries[MESH].cpu_us_per_request
    print(f"  the access log adds {log_added:+.1f} us CPU per request to mesh", file=out)
    users_arm: _Arm | None = None
    if users is not None:
        mesh_summary = summaries[MESH]
        users_arm = compare(mesh_summary, users)
        print(
            f"  mesh+users/mesh: {users_arm.ratio:.2f}x requests/s,"
            f" {users_arm.added_cpu:+.1f} us CPU per request"
            f" ({mesh_summary.cpu_us_per_request:.1f} -> {users.cpu_us_per_request:.1f} us/req),"
            f" p50 {(users.p50_us - mesh_summary.p50_us) / 1000:+.2f} ms,"
            f" p99 {(users.p99_us - mesh_summary.p99_us) / 1000:+.2f} ms",
            file=out,
        )
        print(
            "    requests/s ratio a saturated server would show (mesh CPU / mesh+users CPU per"
            f" request): {users_arm.cpu_ratio:.2f}x",
            file=out,
        )
        print(
            f"    paired rounds (median of {len(users_arm.paired)}): {users_arm.paired_ratio:.2f}x"
            f" requests/s (range {min(users_arm.paired):.2f}-{max(users_arm.paired):.2f}),"
            f" {users_arm.paired_added:+.1f} us CPU per request (range"
            f" {min(users_arm.paired_cpu):+.1f} to {max(users_arm.paired_cpu):+.1f})",
            file=out,
        )
    runs = [r for s in summaries.values() for r in s.runs]
    starved = [r for r in runs if r.server_busy_pct < SATURATED_PCT]
    loaded = [r for r in runs if r.other_load_pct > OTHER_LOAD_PCT]
    contended = bool(starved or loaded)
    if contended:
        print(
            f"  WARNING: {len(starved)} of {len(runs)} runs kept the server under"
            f" {SATURATED_PCT}% busy and {len(loaded)} saw over {OTHER_LOAD_PCT}% of a CPU of"
            " other load: the machine is shared right now, so requests/s (and the ratio) are"
            " unreliable; CPU us/request is the steadier figure.",
            file=out,
        )
    # Each bar: (variant, what it is measured against, its comparison, the bar).
    checks = [(variant, "bare", arms[variant], bar) for variant, bar in BARS.items()]
    if users_arm is not None:
        checks.append((MESH_USERS, MESH, users_arm, USERS_BAR))
    bars: dict[str, bool] = {}
    for variant, base, arm, bar in checks:
        bars[variant] = arm.paired_ratio >= bar
        print(
            f"  {variant}/{base} requests/s >= {bar:.2f}x (paired median {arm.paired_ratio:.2f}x,"
            f" CPU ratio {arm.cpu_ratio:.2f}x): {'met' if bars[variant] else 'MISSED'}",
            file=out,
        )
        if bars[variant] and arm.cpu_ratio < bar:
            print(
                f"    note: by CPU per request a saturated server would show {arm.cpu_ratio:.2f}x,"
                f" under the bar: the requests/s ratio is flattered when the servers were not"
                f" saturated (see busy)",
                file=out,
            )
    met = all(bars.values())
    print("all bars met" if met else "a bar was missed", file=out)
    against = {
        v: compare(summaries[v + AGAINST], summaries[v]) for v in arms if v + AGAINST in summaries
    }
    for variant, arm in against.items():
        print(
            f"  {variant} against {args.against}: {arm.paired_ratio:.2f}x requests/s"
            f" (paired, range {min(arm.paired):.2f}-{max(arm.paired):.2f}),"
            f" {arm.paired_added:+.1f} us CPU per request (paired; pooled"
            f" {summaries[variant + AGAINST].cpu_us_per_request:.1f} ->"
            f" {summaries[variant].cpu_us_per_request:.1f} us/req)",
            file=out,
        )
    if args.json:
        mesh = arms[MESH]
        figures = {
            "settings": {
                "rounds": args.rounds,
                "seconds": args.seconds,
                "warmup": args.warmup,
                "connections": CONNECTIONS,
                "server_cpu": SERVER_CPU,
                "client_cpu": CLIENT_CPU,
                "policy": str(args.policy) if args.policy else "built-in",
                "policy_rules": rules,
                "traceparent": TRACEPARENT,
                "access_log_sink": args.access_log_sink,
                "end_users": args.end_users,
            },
            "bare": bare.as_dict(),
            "mesh": summaries[MESH].as_dict(),
            "mesh+log": summaries[MESH_LOG].as_dict(),
            # mesh against bare, under the keys earlier versions of this script wrote
            "ratio_requests_per_second": round(mesh.ratio, 3),
            "added_cpu_us_per_request": round(mesh.added_cpu, 2),
            "cpu_ratio": round(mesh.cpu_ratio, 3),
            "best_rounds_ratio_requests_per_second": round(mesh.best_ratio, 3),
            "paired_median_ratio_requests_per_second": round(mesh.paired_ratio, 3),
            "paired_median_added_cpu_us_per_request": round(mesh.paired_added, 2),
            "best_rounds_added_cpu_us_per_request": round(mesh.best_added, 2),
            "arms": {
                variant: {
                    "ratio_requests_per_second": round(arm.ratio, 3),
                    "added_cpu_us_per_request": round(arm.added_cpu, 2),
                    "cpu_ratio": round(arm.cpu_ratio, 3),
                    "best_rounds_ratio_requests_per_second": round(arm.best_ratio, 3),
                    "best_rounds_added_cpu_us_per_request": round(arm.best_added, 2),
                    "paired_ratios": [round(r, 3) for r in arm.paired],
                    "paired_median_ratio_requests_per_second": round(arm.paired_ratio, 3),
                    "paired_median_added_cpu_us_per_request": round(arm.paired_added, 2),
                    "bar": BARS[variant],
                    "bar_met": bars[variant],
                }
                for variant, arm in arms.items()
            },
            "access_log_added_cpu_us_per_request": round(log_added, 2),
            # mesh+users against mesh (--end-users)
            "mesh+users": users.as_dict() if users is not None else None,
            "end_users": {
                "ratio_requests_per_second": round(users_arm.ratio, 3),
                "added_cpu_us_per_request": round(users_arm.added_cpu, 2),
                "cpu_ratio": round(users_arm.cpu_ratio, 3),
                "paired_ratios": [round(r, 3) for r in users_arm.paired],
                "paired_added_cpu_us_per_request": [round(c, 2) for c in users_arm.paired_cpu],
                "paired_median_ratio_requests_per_second": round(users_arm.paired_ratio, 3),
                "paired_median_added_cpu_us_per_request": round(users_arm.paired_added, 2),
                "bar": USERS_BAR,
                "bar_met": bars[MESH_USERS],
            }
            if users_arm is not None
            else None,
            "against": {
                "checkout": str(args.against),
                **{v + AGAINST: summaries[v + AGAINST].as_dict() for v in against},
                "paired": {
                    variant: {
                        "ratios_requests_per_second": [round(r, 3) for r in arm.paired],
                        "added_cpu_us_per_request": [round(c, 2) for c in arm.paired_cpu],
                    }
                    for variant, arm in against.items()
                },
            }
            if against
            else None,
            "all_bars_met": met,
            "machine_contended": contended,
        }
        json.dump(figures, sys.stdout, indent=2)
        sys.stdout.write("\n")
    return met


if __name__ == "__main__":
    sys.exit(main())
