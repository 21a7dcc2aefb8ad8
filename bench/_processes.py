"""What the benchmark scripts share about the server processes they run: CPU use, ports,
and stopping them for certain."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
from pathlib import Path

__all__ = ["die_with_parent", "free_port", "proc_cpu_seconds", "stop_group"]

_PR_SET_PDEATHSIG = 1


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU time a process (all its threads) has used so far, from /proc."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    # Fields after "(comm)": state is field 3, utime field 14, stime field 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stop_group(process: subprocess.Popen[bytes], *, grace: float) -> None:
    """SIGTERM a process group, SIGKILL it if it outlives ``grace`` seconds."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=5)


def die_with_parent() -> None:
    """In the child before exec: get SIGTERM if the benchmark dies without cleaning up."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
