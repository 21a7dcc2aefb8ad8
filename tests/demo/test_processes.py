"""Process plumbing: the shop's command lines, process identity, and deferred interrupts."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mesh_middleware.demo import _processes
from mesh_middleware.demo._interrupts import Interrupts
from mesh_middleware.demo._processes import first_error, free_port, log_tail, process_ref
from mesh_middleware.demo.shop import SHOP_APPS


def test_the_shop_runs_the_contracts_processes() -> None:
    """gateway, orders under gunicorn with 2 workers, three inventory and two payments."""
    names = {spec.name: spec for spec in SHOP_APPS}
    assert list(names) == [
        "gateway",
        "orders",
        "inventory-v1-a",
        "inventory-v1-b",
        "inventory-v2",
        "payments-a",
        "payments-b",
    ]
    assert [names[n].version for n in ("inventory-v1-a", "inventory-v1-b", "inventory-v2")] == [
        "v1",
        "v1",
        "v2",
    ]
    orders = names["orders"].argv(8001)
    assert orders[1:] == [
        "-m",
        "gunicorn",
        "--workers",
        "2",
        "--bind",
        "127.0.0.1:8001",
        "--graceful-timeout",
        "5",
        "sample_apps.orders.app:app",
    ]
    gateway = names["gateway"].argv(8000)
    assert gateway[1:] == [
        "-m",
        "uvicorn",
        "sample_apps.gateway.app:app",
        "--host",
        "127.0.0.1",
        "--port",
        "8000",
        "--no-access-log",
    ]
    assert names["payments-b"].policy == "sample_apps/payments/policy.yaml"


def test_a_process_reference_knows_when_its_process_is_gone() -> None:
    """Alive while it runs; not once it has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    ref = process_ref(child.pid)
    try:
        assert ref.alive()
    finally:
        child.kill()
        child.wait(timeout=10)
    assert not ref.alive()
    assert process_ref(os.getpid()).alive()


def test_a_recycled_pid_is_not_the_same_process() -> None:
    """Same pid, another start time: not ours."""
    ref = process_ref(os.getpid())
    if ref.started is None:
        pytest.fail("this test needs /proc")
    assert not type(ref)(ref.pid, ref.started + 1).alive()


def test_log_helpers_find_the_cause_and_the_tail(tmp_path: Path) -> None:
    """The first exception line, and the last lines indented."""
    log = tmp_path / "app.log"
    log.write_text("starting\nImportError: no module named x\nlater\nRuntimeError: after\n")
    assert first_error(log) == "ImportError: no module named x"
    assert log_tail(log, lines=2) == "    | later\n    | RuntimeError: after"
    assert first_error(tmp_path / "none.log") is None


def test_signals_become_keyboard_interrupts_except_while_ignored() -> None:
    """SIGTERM is raised as KeyboardInterrupt (like Ctrl-C); inside ignored() it is dropped;
    restore() gives the handlers back."""
    interrupts = Interrupts()
    interrupts.install()
    try:
        with pytest.raises(KeyboardInterrupt):
            _signal_self(signal.SIGTERM)
        with interrupts.ignored():
            _signal_self(signal.SIGINT)
        assert interrupts.received == 2
    finally:
        interrupts.restore()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def _signal_self(signum: int) -> None:
    os.kill(os.getpid(), signum)
    time.sleep(0.05)  # the handler runs in the main thread between bytecodes


def test_free_ports_lie_below_the_ephemeral_range_and_are_never_handed_out_twice() -> None:
    """Outgoing connections draw source ports from the ephemeral range, so a server's port
    must come from below it, or a connection can take it before the server binds."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    assert all(10000 <= port < low for port in ports)
    for port in ports[:20]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_a_port_something_listens_on_is_passed_over(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            idle = probe.getsockname()[1]
        draws = iter([busy, busy, idle])
        monkeypatch.setattr(_processes._random, "randrange", lambda _a, _b: next(draws))
        monkeypatch.setattr(_processes, "_ephemeral_low", lambda: max(busy, idle) + 1000)
        monkeypatch.setattr(_processes, "_handed_out", set())
        assert free_port() == idle
