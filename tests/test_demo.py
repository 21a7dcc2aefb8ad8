"""``mesh demo`` end to end: the shop as real processes, real traffic, nothing left behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from mesh_middleware.demo._processes import process_ref

REPO = Path(__file__).resolve().parents[1]
SAMPLE_POLICIES = sorted(str(p) for p in (REPO / "sample_apps").glob("*/policy.yaml"))
DEMO = [sys.executable, "-m", "mesh_middleware", "demo"]


def _alive(pid: int) -> bool:
    return process_ref(pid).alive()


def _pids(output: str) -> set[int]:
    started = re.search(r"started pids: ([\d ]+)", output)
    stopped = re.search(r"stopped processes: ([\d ]+) \(none left running\)", output)
    assert started and stopped, output
    return {int(p) for p in started.group(1).split() + stopped.group(1).split()}


def _figure(output: str, pattern: str) -> float:
    found = re.search(pattern, output)
    assert found, f"no match for {pattern!r} in the demo's output:\n{output}"
    return float(found.group(1))


def _workdir(output: str) -> Path:
    found = re.search(r"workdir +(\S+)", output)
    assert found, output
    return Path(found.group(1))


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_demo_runs_the_shop_and_every_bar_holds() -> None:
    """`mesh demo --duration 20` exits 0 with denials, a 5-15% v2 share, >= 99% customer
    success under payments' faults, retries, audit and mirror figures, and stops everything."""
    began = time.monotonic()
    result = subprocess.run(
        [*DEMO, "--duration", "20"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=200,
        check=False,
    )
    took = time.monotonic() - began
    output = result.stdout
    assert result.returncode == 0, f"stdout:\n{output}\nstderr:\n{result.stderr}"
    assert "Warning" not in result.stderr, result.stderr
    assert "Traceback" not in output + result.stderr
    assert took < 120, took
    for where in ("registry ", "gateway ", "orders ", "inventory-v2 ", "payments-b "):
        assert re.search(rf"  {where}.*http://127\.0\.0\.1:\d+", output), where
    assert re.search(r"mesh stat --registry http://127\.0\.0\.1:\d+ --edges", output)
    assert re.search(r"  dashboard .* http://127\.0\.0\.1:\d+/ui/login\?token=mvt_\S+\n", output)
    assert _figure(output, r"ok +denials +(\d+) of \d+ reserve-direct calls denied") > 0
    assert "rule 'reserve-only-orders'" in output
    assert 5.0 <= _figure(output, r"ok +v2 share +([\d.]+)% of \d+ item reads") <= 15.0
    assert _figure(output, r"ok +success +([\d.]+)% of \d+ customer requests") >= 99.0
    assert _figure(output, r"payments injected (\d+) faults") > 0
    assert _figure(output, r"ok +retries +(\d+) retries orders -> payments") > 0
    assert _figure(output, r"ok +audit +(\d+) would-be denials") > 0
    assert _figure(output, r"ok +mirror +about (\d+) shadow reads") > 0
    for edge in ("client -> gateway", "gateway -> inventory", "orders -> payments"):
        assert re.search(rf"{edge} +\d+\.\d +\d+\.\d+% +\d", output), edge
    pids = _pids(output)
    assert len(pids) >= 10  # registry, 6 uvicorn, the gunicorn master and its two workers
    assert [pid for pid in pids if _alive(pid)] == []
    assert not _workdir(output).exists()
    assert output.rstrip().endswith("mesh demo: ok, all 7 checks hold")


def _marked(marker: str) -> list[int]:
    """The processes whose environment carries ``marker``: whatever the demo started, whether
    or not it printed their pids."""
    needle = marker.encode()
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if needle in environ.read_bytes():
                found.append(int(environ.parent.name))
        except (OSError, ValueError):
            continue
    return found


class _Running:
    """The demo in the background, its output collected line by line; every process it starts
    inherits a marker in its environment, so a leak shows even if its pid was never printed."""

    def __init__(self) -> None:
        self.marker = f"DEMO_TEST_MARKER={uuid.uuid4().hex}"
        name, _, value = self.marker.partition("=")
        self.process = subprocess.Popen(
            DEMO,
            cwd=REPO,
            env={**os.environ, name: value},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        assert self.process.stdout is not None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, marker: str, within: float) -> None:
        deadline = time.monotonic() + within
        while marker not in self.output:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{marker!r} never came:\n{self.output}")
            time.sleep(0.1)

    def finish(self, within: float) -> tuple[int, str, str]:
        code = self.process.wait(timeout=within)
        self._reader.join(10)
        assert self.process.stderr is not None
        return code, self.output, self.process.stderr.read()

    def close(self) -> None:
        """Kill the demo if it still runs; close the pipes."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._reader.join(10)
        for pipe in (self.process.stdout, self.process.stderr):
            if pipe is not None:
                pipe.close()


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_mid_traffic_stops_everything_and_still_sums_up(signum: int) -> None:
    """Ctrl-C (or SIGTERM) while traffic runs: every process stopped, the workdir removed,
    a summary of the traffic so far, no traceback."""
    demo = _Running()
    try:
        demo.wait_for("t=", within=120)  # the first live table: traffic is flowing
        # The marker reaches what the demo started (else the check after the stop shows nothing).
        assert len(_marked(demo.marker)) >= 11  # the demo, the registry and 9 app processes
        demo.process.send_signal(signum)
        code, output, errors = demo.finish(within=60)
    finally:
        demo.close()
    assert code in (0, 1), f"{code}\n{output}\n{errors}"
    assert "Traceback" not in output + errors, errors
    assert "summary:" in output
    assert "(interrupted: the figures cover the traffic until Ctrl-C)" in output
    pids = _pids(output)
    assert len(pids) >= 10
    assert [pid for pid in pids if _alive(pid)] == []
    assert _marked(demo.marker) == []
    assert not _workdir(output).exists()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_ctrl_c_while_the_shop_starts_stops_what_was_started() -> None:
    """Ctrl-C before the apps are up: exit 130, every process started so far stopped."""
    demo = _Running()
    try:
        demo.wait_for("starting", within=60)
        time.sleep(1.0)  # the registry and some apps are being started
        demo.process.send_signal(signal.SIGINT)
        code, output, errors = demo.finish(within=60)
    finally:
        demo.close()
    assert "Traceback" not in output + errors, errors
    stopped = re.search(r"stopped processes: ([\d ]+|none) \(none left running\)", output)
    assert stopped, output
    pids = {int(p) for p in stopped.group(1).split() if p != "none"}
    assert [pid for pid in pids if _alive(pid)] == []
    assert _marked(demo.marker) == []  # nothing it started was lost, printed or not
    assert not _workdir(output).exists()
    # The shop was either still starting (130) or already up and sending (a summary).
    assert code == 130 or "summary:" in output, output


def test_sample_policies_pass_mesh_policy_check() -> None:
    """`mesh policy check sample_apps/*/policy.yaml` accepts every sample app's policy."""
    assert len(SAMPLE_POLICIES) == 4
    result = subprocess.run(
        [sys.executable, "-m", "mesh_middleware", "policy", "check", *SAMPLE_POLICIES],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(": ok (") == len(SAMPLE_POLICIES)


def test_demo_refuses_a_negative_duration() -> None:
    """A duration below 0 is exit 2 with the reason, before anything starts."""
    result = subprocess.run(
        [*DEMO, "--duration", "-1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )
    assert result.returncode == 2
    assert "--duration must be 0 to 3600 seconds" in result.stderr
