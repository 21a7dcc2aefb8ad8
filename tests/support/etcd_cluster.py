"""A 3-node etcd cluster on loopback for the tests, started by `.ci/run` (or `./dev test`).

    python3 tests/support/etcd_cluster.py start DIR   # members' data under DIR, DIR/cluster.json
    python3 tests/support/etcd_cluster.py stop DIR    # kill every member, remove DIR

``cluster.json`` names each member's client URL, pid and command line, so that a test can
kill -9 a member (the leader, say) and start it again on the same data. Tests find the cluster
through ``MESH_TEST_ETCD_DIR``. Standard library only: CI runs it before any virtualenv exists.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Cluster", "Member", "cluster_from_env", "start_cluster", "stop_cluster"]

ENV = "MESH_TEST_ETCD_DIR"
MEMBERS = 3
# Runs "$@" in the background with its output appended to $1, and prints its pid.
_DETACHED = 'log=$1; shift; "$@" </dev/null >>"$log" 2>&1 & echo $!'


@dataclass
class Member:
    """One etcd member: its name, client URL, command line, and the pid running it."""

    name: str
    client_url: str
    argv: list[str]
    log: str
    pid: int

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        # A zombie (killed, not yet reaped by whoever started it) is not alive.
        try:
            state = Path(f"/proc/{self.pid}/stat").read_text().split(")")[-1].split()[0]
        except OSError:
            return False
        return state != "Z"

    def kill(self) -> None:
        """kill -9, no shutdown of any kind."""
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.02)

    def start(self) -> None:
        """Start the member (again, with the same command line and data), detached: it is no
        child of whoever starts it, so only its pid matters."""
        shell = subprocess.run(
            ["sh", "-c", _DETACHED, "sh", self.log, *self.argv],
            stdout=subprocess.PIPE,
            check=True,
            start_new_session=True,
        )  # fmt: skip
        self.pid = int(shell.stdout.decode().strip())

    def status(self) -> dict[str, object] | None:
        """``/v3/maintenance/status`` of this member, or ``None`` if it does not answer."""
        request = urllib.request.Request(
            f"{self.client_url}/v3/maintenance/status", data=b"{}", method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=1.0) as answer:
                return dict(json.loads(answer.read()))
        except (OSError, ValueError):
            return None


@dataclass
class Cluster:
    """The members and where their data is."""

    directory: Path
    members: list[Member]

    @property
    def endpoints(self) -> list[str]:
        return [m.client_url for m in self.members]

    @property
    def store_hosts(self) -> str:
        """``h1:p1,h2:p2,h3:p3``, as an ``etcd://`` store URL names them."""
        return ",".join(url.removeprefix("http://") for url in self.endpoints)

    def leader(self, timeout: float = 15.0) -> Member:
        """The member that leads now (waits until one does)."""
        deadline = time.monotonic() + timeout
        while True:
            for member in self.members:
                status = member.status()
                if status is not None:
                    header = status.get("header")
                    member_id = header.get("member_id") if isinstance(header, dict) else None
                    if member_id is not None and status.get("leader") == member_id:
                        return member
            if time.monotonic() > deadline:
                raise TimeoutError("the etcd cluster has no leader")
            time.sleep(0.1)

    def save(self) -> None:
        state = {"members": [m.__dict__ for m in self.members]}
        (self.directory / "cluster.json").write_text(json.dumps(state, indent=2))


def _port_picker() -> Callable[[], int]:
    # The demo's picker, which takes ports below the kernel's ephemeral range so that no
    # outgoing connection holds a member's port when it (re)starts. Loaded by its path:
    # this script runs before any virtualenv exists, and that module is standard library only.
    path = Path(__file__).resolve().parents[2] / "mesh_middleware" / "demo" / "_processes.py"
    spec = importlib.util.spec_from_file_location("mesh_test_processes", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    picker: Callable[[], int] = module.free_port
    return picker


free_port = _port_picker()


def start_cluster(directory: Path, *, timeout: float = 30.0) -> Cluster:
    """Start three members under ``directory`` and wait until they elected a leader."""
    directory.mkdir(parents=True, exist_ok=True)
    directory = directory.resolve()
    token = f"mesh-test-{os.getpid()}-{time.time_ns()}"
    peers = [(f"m{n}", free_port(), free_port()) for n in range(1, MEMBERS + 1)]
    initial = ",".join(f"{name}=http://127.0.0.1:{peer}" for name, _, peer in peers)
    members = []
    for name, client, peer in peers:
        argv = [
            shutil.which("etcd") or "etcd",
            "--name", name,
            "--data-dir", str(directory / name),
            "--listen-client-urls", f"http://127.0.0.1:{client}",
            "--advertise-client-urls", f"http://127.0.0.1:{client}",
            "--listen-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-cluster", initial,
            "--initial-cluster-token", token,
            "--initial-cluster-state", "new",
        ]  # fmt: skip
        member = Member(name, f"http://127.0.0.1:{client}", argv, str(directory / f"{name}.log"), 0)
        member.start()
        members.append(member)
    cluster = Cluster(directory, members)
    cluster.save()
    cluster.leader(timeout)
    return cluster


def load_cluster(directory: Path) -> Cluster:
    state = json.loads((directory / "cluster.json").read_text())
    return Cluster(directory, [Member(**m) for m in state["members"]])


def cluster_from_env() -> Cluster:
    """The cluster `.ci/run` or `./dev test` started (``MESH_TEST_ETCD_DIR``)."""
    directory = os.environ.get(ENV)
    if not directory:
        raise RuntimeError(
            f"{ENV} is not set: these tests need the 3-node etcd cluster that `./dev test` and "
            "`.ci/run` start (python -m tests.support.etcd_cluster start DIR)"
        )
    return load_cluster(Path(directory))


def _members_running(directory: Path) -> list[int]:
    """The pids of etcd processes whose data is under ``directory`` (members a test restarted
    included), found by their command lines, never by a saved pid another process may reuse."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if "--data-dir" in (arg.decode(errors="replace") for arg in argv):
            data = argv[argv.index(b"--data-dir") + 1].decode(errors="replace")
            if Path(data).parent == directory and os.path.basename(argv[0]) == b"etcd":
                pids.append(int(proc.name))
    return pids


def stop_cluster(directory: Path) -> None:
    """Kill every member and remove their data."""
    directory = directory.resolve()
    for pid in _members_running(directory):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _members_running(directory) and time.monotonic() < deadline:
        time.sleep(0.05)
    shutil.rmtree(directory, ignore_errors=True)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print(__doc__, file=sys.stderr)
        return 2
    directory = Path(argv[1])
    if argv[0] == "start":
        cluster = start_cluster(directory)
        print(",".join(cluster.endpoints))
    else:
        stop_cluster(directory)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
