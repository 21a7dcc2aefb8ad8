"""Helpers for the outbound end-to-end tests: upstream processes, registrations, bounded load.

Upstreams are ``tests.support.upstream:app`` under uvicorn, one process each, started together
(their imports overlap) and stopped for certain. Load loops are bounded twice: a number of
requests and a wall-clock deadline, whichever comes first.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from tests.support.servers import REPO, free_port, stop, uvicorn_argv

UPSTREAM_APP = "tests.support.upstream:app"


@dataclass
class Upstream:
    """One running upstream process."""

    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stats(self) -> dict[str, int]:
        """What this upstream counted so far, by method (``"GET shadow"`` for shadows)."""
        response = httpx.get(f"{self.url}/stats", timeout=5.0)
        response.raise_for_status()
        counts: dict[str, int] = response.json()["counts"]
        return counts

    def last_headers(self) -> dict[str, str | None]:
        """The reported headers of the last request that was not a shadow."""
        response = httpx.get(f"{self.url}/stats", timeout=5.0)
        response.raise_for_status()
        headers: dict[str, str | None] = response.json()["last_headers"]
        return headers

    def kill(self) -> None:
        """SIGKILL the process group: no goodbye of any kind."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)


@contextmanager
def upstreams(
    specs: dict[str, dict[str, str]], log_dir: Path, timeout: float = 30.0
) -> Iterator[dict[str, Upstream]]:
    """Start one upstream per ``name -> extra environment``, all at once; stop them after."""
    log_dir.mkdir(parents=True, exist_ok=True)
    started: dict[str, Upstream] = {}
    try:
        for name, extra in specs.items():
            port = free_port()
            log_path = log_dir / f"upstream-{name}.log"
            env = {**os.environ, "PYTHONPATH": str(REPO), "UPSTREAM_NAME": name, **extra}
            with open(log_path, "wb") as log:
                proc = subprocess.Popen(
                    uvicorn_argv(UPSTREAM_APP, port),
                    env=env,
                    cwd=REPO,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,
                )
            started[name] = Upstream(name, port, proc, log_path)
        deadline = time.monotonic() + timeout
        waiting = dict(started)
        with httpx.Client(timeout=1.0) as probe:
            while waiting:
                for name, upstream in list(waiting.items()):
                    if upstream.proc.poll() is not None:
                        detail = upstream.log_path.read_text(errors="replace")[-2000:]
                        raise RuntimeError(f"upstream {name} exited:\n{detail}")
                    try:
                        probe.get(f"{upstream.url}/healthz")
                    except httpx.TransportError:
                        continue
                    del waiting[name]
                if waiting:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"upstreams not ready after {timeout}s: {list(waiting)}")
                    time.sleep(0.05)
        yield started
    finally:
        for upstream in started.values():
            stop(upstream.proc)


def register(
    registry_url: str,
    service: str,
    instance_id: str,
    port: int,
    *,
    version: str = "v1",
    zone: str = "z",
) -> int:
    """Register an instance (dev-mode registry: no token); return the registry's index."""
    response = httpx.put(
        f"{registry_url}/v1/catalog/services/{service}/instances/{instance_id}",
        json={"address": "127.0.0.1", "port": port, "version": version, "zone": zone, "ttl": "10m"},
        timeout=5.0,
    )
    assert response.status_code in (200, 201), response.text
    index: int = response.json()["index"]
    return index


async def eventually(predicate: Callable[[], bool], within: float, what: str) -> float:
    """Poll until ``predicate()`` holds (without blocking the event loop); fail after ``within``
    seconds. Returns the seconds it took."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > within:
            raise AssertionError(f"{what}: not within {within}s")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


def deltas(before: dict[str, int], after: dict[str, int]) -> Counter[str]:
    """What arrived between two :meth:`Upstream.stats` readings."""
    return Counter({key: after.get(key, 0) - before.get(key, 0) for key in after.keys() | before})


@dataclass
class LoadResult:
    """What a bounded load loop did."""

    sent: int = 0
    done: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    names: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def ok(self) -> int:
        return sum(n for status, n in self.statuses.items() if 200 <= status < 300)


async def load(
    send: Callable[[int], Awaitable[httpx.Response]],
    *,
    requests: int,
    concurrency: int,
    seconds: float,
    on_progress: Callable[[LoadResult], None] | None = None,
) -> LoadResult:
    """Send up to ``requests`` calls, ``concurrency`` at a time, for at most ``seconds``.

    ``send(i)`` makes call number ``i``. An exception is counted by type, never raised; the
    upstream's ``name`` in a JSON answer is counted. ``on_progress(result)`` runs after each
    call with the figures so far.
    """
    result = LoadResult()
    deadline = time.monotonic() + seconds
    counter = iter(range(requests))
    started = time.monotonic()

    async def worker() -> None:
        for i in counter:
            if time.monotonic() > deadline:
                return
            result.sent += 1
            try:
                response = await send(i)
            except Exception as exc:
                result.errors[type(exc).__name__] += 1
            else:
                result.statuses[response.status_code] += 1
                if response.headers.get("content-type") == "application/json":
                    name = response.json().get("name")
                    if isinstance(name, str):
                        result.names[name] += 1
            result.done += 1
            if on_progress is not None:
                on_progress(result)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.seconds = time.monotonic() - started
    return result


class RecordingServer:
    """A loopback HTTP server in a thread that answers 200 and records every request."""

    def __init__(self, name: str) -> None:
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self._lock = threading.Lock()
        owner = self
        payload = json.dumps({"name": name}).encode()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                if length:
                    self.rfile.read(length)
                with owner._lock:
                    owner.requests.append(
                        (self.command, self.path, {k.lower(): v for k, v in self.headers.items()})
                    )
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def seen(self) -> list[tuple[str, str, dict[str, str]]]:
        with self._lock:
            return list(self.requests)

    def __enter__(self) -> RecordingServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
