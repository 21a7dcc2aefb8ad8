"""``mesh demo`` end to end: real app processes, real traffic, nothing left behind."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE_POLICIES = sorted(str(p) for p in (REPO / "sample_apps").glob("*/policy.yaml"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else (a reused pid)
        return True
    return True


def _total(output: str, status: int) -> int:
    found = re.search(rf"totals:.*\b{status}=(\d+)", output)
    assert found, f"no total for {status} in the demo's summary:\n{output}"
    return int(found.group(1))


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_demo_runs_denies_with_rules_and_leaves_no_process() -> None:
    """`mesh demo --duration 8` exits 0, shows 401s, 403s and a deciding rule, and stops all."""
    result = subprocess.run(
        [sys.executable, "-m", "mesh_middleware", "demo", "--duration", "8"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    output = result.stdout
    assert result.returncode == 0, f"stdout:\n{output}\nstderr:\n{result.stderr}"
    assert "Warning" not in result.stderr, result.stderr
    assert _total(output, 403) > 0
    assert _total(output, 401) > 0
    assert _total(output, 400) > 0
    assert _total(output, 503) > 0
    assert "rule no-admin: denied by rule 'no-admin' (sample_apps/inventory/policy.yaml:" in output
    assert "deny (403) rule 'no-admin'" in output  # mesh policy explain gives the same answer
    assert "request_would_be_denied events (rules: no-anonymous-orders" in output
    started = re.search(r"started pids: ([\d ]+)", output)
    stopped = re.search(r"stopped processes: ([\d ]+) \(none left running\)", output)
    assert started and stopped, output
    pids = {int(p) for p in started.group(1).split()} | {int(p) for p in stopped.group(1).split()}
    assert len(pids) >= 4  # uvicorn, the gunicorn master and its two workers
    assert [pid for pid in pids if _alive(pid)] == []


def test_sample_policies_pass_mesh_policy_check() -> None:
    """`mesh policy check sample_apps/*/policy.yaml` accepts every sample app's policy."""
    assert len(SAMPLE_POLICIES) >= 2
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
