"""Operating-system plumbing for the demo's processes: ports, groups, liveness, logs."""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import sys
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ProcessRef",
    "descendants",
    "die_with_parent",
    "first_error",
    "free_port",
    "group_alive",
    "log_tail",
    "process_ref",
    "signal_group",
]


_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LINUX_DEFAULT_EPHEMERAL_LOW = 32768
_LOWEST_PORT = 10000
_PICKS = 200
_random = random.SystemRandom()
_handed_out: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return _LINUX_DEFAULT_EPHEMERAL_LOW


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on, below the kernel's ephemeral range.

    A port the kernel picks (bind to port 0) comes from the ephemeral range, which it also
    draws every outgoing connection's source port from: under load another connection can take
    the port before the server binds it ("address already in use"). Ports below that range are
    only ever taken by an explicit bind. Each port is handed out once per process.
    """
    low = _ephemeral_low()
    if low - _LOWEST_PORT >= 4 * _PICKS:
        if len(_handed_out) > (low - _LOWEST_PORT) // 2:
            _handed_out.clear()
        for _ in range(_PICKS):
            port = _random.randrange(_LOWEST_PORT, low)
            if port not in _handed_out and _bindable(port):
                _handed_out.add(port)
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        chosen: int = sock.getsockname()[1]
        return chosen


def _load_prctl() -> Callable[..., int] | None:
    # Looked up in the parent: loading a library in a child forked from a threaded process
    # can deadlock on the loader's lock.
    if sys.platform != "linux":
        return None
    try:
        import ctypes

        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return prctl


_PRCTL = _load_prctl()
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the parent dies (Linux only).

    The kernel ties this to the *thread* that forked the child, so processes must be spawned
    from a thread that lives as long as they should (the main thread).
    """
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGTERM))


@dataclass(frozen=True, slots=True)
class ProcessRef:
    """A process by pid and start time, so a recycled pid is never mistaken for ours."""

    pid: int
    started: int | None  # clock ticks since boot, from /proc; None where /proc is absent

    def alive(self) -> bool:
        """Whether this very process still runs (a zombie does not count)."""
        stat = _stat(self.pid)
        if stat is None:
            if Path("/proc/self/stat").exists():
                return False
            return _kill_zero(self.pid)
        state, started = stat
        if self.started is not None and started != self.started:
            return False
        return state not in ("Z", "X")


def process_ref(pid: int) -> ProcessRef:
    """The reference of a running process (its start time read now)."""
    stat = _stat(pid)
    return ProcessRef(pid, stat[1] if stat is not None else None)


def _stat(pid: int) -> tuple[str, int] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = text[text.rfind(")") + 2 :].split()
    try:
        return fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None


def _kill_zero(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def descendants(pid: int, limit: int = 256) -> set[int]:
    """The process and its descendants, from /proc (just ``pid`` elsewhere)."""
    if not Path("/proc/self/task").exists():
        return {pid}
    found: set[int] = set()
    stack = [pid]
    while stack and len(found) < limit:
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


def group_alive(pgid: int) -> bool:
    """Whether any process of the group is left (zombies included)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def signal_group(pgid: int, signum: int) -> None:
    """Send ``signum`` to a process group, if it still exists."""
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def log_tail(path: Path, lines: int = 30) -> str:
    """The last lines of a log file, indented for an error message."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 16384))
            text = handle.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"    | (no log: {exc})"
    return "\n".join("    | " + line for line in text.splitlines()[-lines:])


_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit)\b.*")


def first_error(path: Path, limit: int = 1 << 20) -> str | None:
    """The first ``SomeError: ...`` line of a log: usually the cause, not a consequence."""
    try:
        with path.open("rb") as handle:
            text = handle.read(limit).decode("utf-8", "replace")
    except OSError:
        return None
    for line in text.splitlines():
        if _EXCEPTION_LINE.match(line):
            return line.strip()
    return None
