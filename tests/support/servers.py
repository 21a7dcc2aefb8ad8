"""Real server processes for tests: free loopback ports, readiness, and certain cleanup."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx

from mesh_middleware.demo._processes import free_port

REPO = Path(__file__).resolve().parents[2]

__all__ = ["REPO", "free_port", "gunicorn_argv", "running", "stop", "uvicorn_argv"]


@contextmanager
def running(
    argv: Sequence[str],
    *,
    port: int,
    env: Mapping[str, str] | None = None,
    ready_path: str = "/healthz",
    timeout: float = 30.0,
    log_path: Path | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """Start a server process, wait until ``ready_path`` answers, stop it (and its group) after."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    log = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(
        list(argv), env=full_env, cwd=REPO, stdout=log, stderr=log, start_new_session=True
    )
    try:
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{port}{ready_path}"
        while True:
            if proc.poll() is not None:
                detail = log_path.read_text(errors="replace")[-3000:] if log_path else ""
                raise RuntimeError(f"server exited with {proc.returncode}: {argv}\n{detail}")
            try:
                httpx.get(url, timeout=1.0)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"server not ready after {timeout}s: {argv}") from None
                time.sleep(0.05)
        yield proc
    finally:
        stop(proc)
        if log_path:
            log.close()  # type: ignore[union-attr]


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Terminate a process group started by :func:`running`, killing it if it lingers."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def uvicorn_argv(app: str, port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "uvicorn",
        app,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--no-access-log",
    ]


def gunicorn_argv(app: str, port: int, workers: int = 2) -> list[str]:
    return [
        sys.executable,
        "-m",
        "gunicorn",
        app,
        "-b",
        f"127.0.0.1:{port}",
        "-w",
        str(workers),
        "--log-level",
        "warning",
        "--graceful-timeout",
        "3",
    ]
