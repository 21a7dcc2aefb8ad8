"""End to end: two reporter processes post to a real registry; the topology API and
`mesh stat` (table, `--edges`, `--json`) show what they sent; a dead registry is exit 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from mesh_middleware.cli import main
from tests.registry.support import Registry, create_join_token, register, start_registry
from tests.support.servers import REPO, free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

# One process of a meshed service: what the lead's runtime does with the reporter, minus the app.
REPORTER = textwrap.dedent(
    """
    import json, sys
    from mesh_middleware.runtime.registry_client import RegistryClient
    from mesh_middleware.telemetry.reports import EdgeReporter

    url, token, service, spec = sys.argv[1:5]
    client = RegistryClient(url, token)
    reporter = EdgeReporter(client.report, service=service, instance=service + "-1")
    for source, destination, status, seconds, n in json.loads(spec):
        for _ in range(n):
            reporter.record(source, destination, status, seconds)
    reporter.tick(force=True)
    client.close()
    print(json.dumps({"pending": reporter.pending, "dropped": reporter.dropped_reports}))
    """
)


def _report_from_a_process(registry: Registry, token: str, service: str, spec: Any) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", REPORTER, registry.url, token, service, json.dumps(spec)],
        env=env,
        cwd=REPO,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    assert json.loads(done.stdout) == {"pending": 0, "dropped": 0}


@pytest.fixture(scope="module")
def traffic(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A registry (join tokens, not dev mode) that two reporter processes have reported to:
    e2e-orders called e2e-inventory 100 times (20 answered 503), and e2e-inventory served
    those and 10 anonymous requests. One instance of e2e-inventory is registered."""
    with start_registry(tmp_path_factory.mktemp("stat") / "data") as registry:
        with httpx.Client(timeout=15) as client:
            orders = create_join_token(client, registry, "e2e-orders")
            inventory = create_join_token(client, registry, "e2e-inventory")
            assert register(client, registry, "e2e-inventory", "inv-1", inventory).is_success
        calls = [
            ["e2e-orders", "e2e-inventory", 200, 0.02, 80],
            ["e2e-orders", "e2e-inventory", 503, 0.004, 20],
        ]
        _report_from_a_process(registry, orders, "e2e-orders", calls)
        served = [*calls, ["anonymous", "e2e-inventory", 200, 0.2, 10]]
        _report_from_a_process(registry, inventory, "e2e-inventory", served)
        yield registry


def _row(out: str, *cells: str) -> list[str]:
    """The table line that holds every one of ``cells``, split into its cells."""
    rows = [line.split() for line in out.splitlines()]
    [row] = [row for row in rows if all(cell in row for cell in cells)]
    return row


def test_topology_shows_the_edge_with_its_rate_and_success_rate(traffic: Registry) -> None:
    answer = httpx.get(f"{traffic.url}/v1/telemetry/topology?window=60s", timeout=10).json()
    [edge] = [e for e in answer["edges"] if e["source"] == "e2e-orders"]
    assert edge["destination"] == "e2e-inventory"
    assert (edge["requests"], edge["success_rate"], edge["reporter"]) == (100, 0.8, "source")
    assert edge["rps"] == pytest.approx(100 / answer["covered_seconds"], abs=0.001)
    nodes = {n["service"]: n for n in answer["nodes"]}
    assert nodes["e2e-inventory"]["requests"] == 110
    assert (nodes["e2e-inventory"]["registered"], nodes["e2e-inventory"]["healthy"]) == (
        True,
        True,
    )
    assert nodes["anonymous"]["registered"] is False


def test_stat_json_is_the_services_answer(
    traffic: Registry, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["stat", "--registry", traffic.url, "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["window_seconds"] == 60.0
    services = {s["service"]: s for s in answer["services"]}
    assert set(services) == {"e2e-orders", "e2e-inventory"}
    inventory = services["e2e-inventory"]
    assert (inventory["requests"], inventory["success_rate"]) == (110, round(90 / 110, 6))
    assert (inventory["instances"], inventory["healthy_instances"]) == (1, 1)


def test_stat_edges_json_is_the_topology_answer(
    traffic: Registry, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MESH_REGISTRY_URL", traffic.url)  # the default --registry
    assert main(["stat", "--edges", "--json", "--window", "5m"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["window_seconds"] == 300.0
    assert {(e["source"], e["destination"]) for e in answer["edges"]} == {
        ("e2e-orders", "e2e-inventory"),
        ("anonymous", "e2e-inventory"),
    }


def test_stat_tables(traffic: Registry, capsys: pytest.CaptureFixture[str]) -> None:
    """The services table: rps, success %, p50/p95/p99 in ms, healthy/total instances; with
    `--edges` also each edge and whose view it is."""
    assert main(["stat", "--registry", traffic.url]) == 0
    out = capsys.readouterr().out
    assert "SERVICE" in out
    assert "P99 ms" in out
    inventory = _row(out, "e2e-inventory")
    assert inventory[2] == "81.82%"
    assert inventory[-1] == "1/1"
    orders = _row(out, "e2e-orders")
    assert orders[1:] == ["0.00", "-", "-", "-", "-", "-"]  # nobody called it; not registered
    assert "DESTINATION" not in out
    assert main(["stat", "--registry", traffic.url, "--edges"]) == 0
    out = capsys.readouterr().out
    edge = _row(out, "e2e-orders", "e2e-inventory")
    assert edge[3] == "80.00%"
    assert edge[-1] == "source"
    p50 = float(edge[4])
    assert 10.0 < p50 <= 25.0  # 80 of the 100 calls took 20 ms: the (10, 25] ms bucket
    assert _row(out, "anonymous", "e2e-inventory")[-1] == "destination"


def test_stat_with_a_bad_window_says_why(
    traffic: Registry, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["stat", "--registry", traffic.url, "--window", "1h"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "window must be" in captured.err


def test_stat_against_a_dead_registry_exits_1(tmp_path: Path) -> None:
    """The real command: exit 1 and a message naming the registry, no traceback."""
    url = f"http://127.0.0.1:{free_port()}"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "mesh_middleware", "stat", "--registry", url],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 1
    err = done.stderr.decode()
    assert f"mesh stat: cannot reach the registry at {url}" in err
    assert "Traceback" not in err
    assert done.stdout == b""
