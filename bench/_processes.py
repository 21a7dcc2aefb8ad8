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

__all__ = ["PinnedProcess", "die_with_parent", "free_port", "proc_cpu_seconds", "stop_group"]

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


class PinnedProcess:
    """A server pinned to one CPU, in a process group of its own, its output in a log file.

    ``taskset`` execs the interpreter, so the pid is the server's own (its CPU use is read
    from it). Stopped for certain by :meth:`stop`, and by the kernel if the benchmark dies.
    """

    grace = 5.0

    def __init__(
        self,
        command: list[str],
        log_path: Path,
        *,
        cpu: int,
        cwd: Path,
        env: dict[str, str] | None = None,
    ) -> None:
        self._log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            ["taskset", "-c", str(cpu), *command],
            cwd=cwd,
            env={**os.environ, **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 30) -> str:
        self._log.flush()
        text = self._log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def cpu_seconds(self) -> float:
        """User + system CPU time the process (all its threads) has used so far."""
        return proc_cpu_seconds(self.pid)

    def stop(self) -> None:
        stop_group(self.process, grace=self.grace)
        self._log.close()


def core_busy_seconds(cpu: int) -> float:
    """Time one CPU has spent busy (any process; not idle or waiting on I/O) since boot, from
    /proc/stat."""
    for line in Path("/proc/stat").read_text().splitlines():
        name, _, rest = line.partition(" ")
        if name == f"cpu{cpu}":
            # user nice system idle iowait irq softirq steal ...
            ticks = [int(n) for n in rest.split()]
            busy = ticks[0] + ticks[1] + ticks[2] + ticks[5] + ticks[6] + ticks[7]
            return busy / os.sysconf("SC_CLK_TCK")
    raise RuntimeError(f"no cpu{cpu} in /proc/stat")
