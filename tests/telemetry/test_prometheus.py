"""The real tools: promtool lints the page, a real Prometheus scrapes a real server, and a
multi-worker gunicorn answers every scrape with the same totals.

Needs the Debian package ``prometheus`` (``prometheus`` and ``promtool``), which ``./dev test``
installs; without it these tests fail, never skip.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mesh_middleware.telemetry.exposition import render_metrics
from tests.support.metrics_app import populate
from tests.support.servers import REPO, free_port, running, stop, uvicorn_argv

pytestmark = pytest.mark.slow

PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
needs_promtool = pytest.mark.usefixtures("_promtool_installed")
needs_prometheus = pytest.mark.usefixtures("_prometheus_installed")


@pytest.fixture
def _promtool_installed() -> None:
    if PROMTOOL is None:
        pytest.fail("promtool is missing: apt-get install prometheus (./dev test installs it)")


@pytest.fixture
def _prometheus_installed() -> None:
    if PROMETHEUS is None:
        pytest.fail("prometheus is missing: apt-get install prometheus (./dev test installs it)")


T = TypeVar("T")


def wait_for(check: Callable[[], T | None], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {timeout}s")
        time.sleep(0.2)


def promtool_check(body: bytes) -> None:
    assert PROMTOOL is not None
    done = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=body, capture_output=True, timeout=30, check=False
    )
    problems = (done.stdout + done.stderr).decode()
    assert done.returncode == 0 and not problems.strip(), problems


@needs_promtool
def test_promtool_finds_nothing_in_the_single_process_page() -> None:
    populate()
    body, _ = render_metrics(None)
    names = {f.name for f in text_string_to_metric_families(body.decode())}
    assert {"mesh_requests", "mesh_outbound_ejected_endpoints", "mesh_request_bytes"} <= names
    promtool_check(body)


@needs_promtool
def test_promtool_finds_nothing_in_the_multiprocess_page(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from tests.support.metrics_app import populate\n"
        "from mesh_middleware.telemetry.exposition import render_metrics\n"
        "populate()\n"
        "sys.stdout.buffer.write(render_metrics(None)[0])\n"
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PYTHONPATH": str(REPO)}
    body = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, timeout=60, check=True
    ).stdout
    assert b"mesh_outbound_ejected_endpoints{" in body and b"mesh_requests_total{" in body
    assert b"process_cpu" not in body  # only what the worker files hold
    promtool_check(body)


@needs_promtool
def test_promtool_would_catch_a_bad_page() -> None:
    """The check above can fail: promtool does flag problems."""
    with pytest.raises(AssertionError, match="_total"):
        promtool_check(b"# HELP foo x\n# TYPE foo counter\nfoo 1\n")


# --- a real Prometheus scraping a real uvicorn server ----------------------------------------


@contextmanager
def prometheus(target_port: int, tmp_path: Path) -> Iterator[str]:
    """Prometheus on 127.0.0.1 only, scraping the target every second, data in a temp dir."""
    assert PROMETHEUS is not None
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, scrape_timeout: 900ms, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: mesh-test\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{target_port}']}}]\n"
    )
    log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=log,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _ready(url, proc), 30, "prometheus ready")
        yield url
    finally:
        stop(proc)  # type: ignore[arg-type]
        log.close()


def _ready(url: str, proc: subprocess.Popen[Any]) -> bool:
    if proc.poll() is not None:
        raise RuntimeError(f"prometheus exited with {proc.returncode}")
    try:
        return httpx.get(f"{url}/-/ready", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def query(url: str, promql: str) -> list[dict[str, Any]]:
    answer = httpx.get(f"{url}/api/v1/query", params={"query": promql}, timeout=5).json()
    assert answer["status"] == "success", answer
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


@needs_prometheus
def test_a_real_prometheus_scrapes_the_mesh_metrics(tmp_path: Path) -> None:
    port = free_port()
    app = uvicorn_argv("tests.support.metrics_app:app", port)
    with running(app, port=port, log_path=tmp_path / "app.log"):
        for i in range(5):
            httpx.get(f"http://127.0.0.1:{port}/items/{i % 2}", headers={"x-caller": "orders"})
        with prometheus(port, tmp_path) as url:
            up = wait_for(
                lambda: [r for r in query(url, 'up{job="mesh-test"}') if r["value"][1] == "1"],
                30,
                "up == 1",
            )
            assert up[0]["metric"]["instance"] == f"127.0.0.1:{port}"
            series = wait_for(
                lambda: query(url, 'mesh_requests_total{job="mesh-test",route="/items/1"}'),
                30,
                "mesh_requests_total series",
            )
            labels = series[0]["metric"]
            assert labels["reporter"] == "destination" and labels["source_service"] == "orders"
            assert float(series[0]["value"][1]) == 2
            buckets = query(url, 'count(mesh_request_duration_seconds_bucket{route="/items/1"})')
            assert buckets[0]["value"][1] == "15"  # 14 bounds and +Inf
            (target,) = httpx.get(f"{url}/api/v1/targets", timeout=5).json()["data"][
                "activeTargets"
            ]
            assert target["health"] == "up" and target["lastError"] == ""


# --- several gunicorn workers: every scrape sees every worker's counts ----------------------

GUNICORN_CONF = """
from mesh_middleware.telemetry.exposition import mark_process_dead, wipe_multiprocess_dir

def on_starting(server):
    wipe_multiprocess_dir()

def child_exit(server, worker):
    mark_process_dead(worker.pid)
"""


def _total(body: str, name: str) -> float:
    return sum(
        s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
        if s.name == name
    )


def test_gunicorn_workers_answer_every_scrape_with_the_same_totals(tmp_path: Path) -> None:
    multiproc = tmp_path / "prom"
    multiproc.mkdir()
    (multiproc / "counter_99999.db").write_bytes(b"stale")  # a last run's file: wiped at start
    conf = tmp_path / "gunicorn.conf.py"
    conf.write_text(GUNICORN_CONF)
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "gunicorn",
        "tests.support.metrics_app:wsgi_app",
        "-c",
        str(conf),
        "-b",
        f"127.0.0.1:{port}",
        "-w",
        "3",
        "--log-level",
        "warning",
        "--graceful-timeout",
        "3",
    ]
    env = {"PROMETHEUS_MULTIPROC_DIR": str(multiproc)}
    with running(argv, port=port, env=env, log_path=tmp_path / "gunicorn.log") as master:
        pids = set()
        for _ in range(60):  # a new connection each: the workers share them out
            answer = httpx.get(f"http://127.0.0.1:{port}/work", headers={"connection": "close"})
            pids.add(answer.text)
        # Each worker folds its tallies in within a second, whichever worker serves scrapes.
        wait_for(
            lambda: (
                _total(httpx.get(f"http://127.0.0.1:{port}/metrics").text, "mesh_requests_total")
                == 60
                or None
            ),
            5.0,
            "every worker's requests in the totals",
        )
        scrapes = [httpx.get(f"http://127.0.0.1:{port}/metrics").text for _ in range(12)]
        served_by = {int(p) for p in pids}
        assert [_total(s, "mesh_requests_total") for s in scrapes] == [60] * 12
        assert [_total(s, "mesh_request_duration_seconds_count") for s in scrapes] == [60] * 12

        victim = sorted(served_by)[0]
        os.kill(victim, signal.SIGKILL)  # the master replaces it and calls child_exit
        wait_for(
            lambda: re.search(rf"\b{victim}\b", _children(master.pid)) is None,
            20,
            "worker replaced",
        )
        httpx.get(f"http://127.0.0.1:{port}/work", headers={"connection": "close"})
        wait_for(  # the dead worker's counts stay, and the new request is folded in
            lambda: (
                _total(httpx.get(f"http://127.0.0.1:{port}/metrics").text, "mesh_requests_total")
                == 61
                or None
            ),
            5.0,
            "61 requests in the totals",
        )
    assert len(served_by) >= 2, f"one worker served everything: {served_by}"


def _children(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return ""


@needs_promtool
def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    """Each panel's PromQL, with Grafana's variables filled in, as a rule promtool checks."""
    model = json.loads((REPO / "sample_apps" / "grafana" / "mesh-dashboard.json").read_text())
    exprs = [t["expr"] for p in model["panels"] for t in p.get("targets", [])]
    assert exprs
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {
                        "record": f"dashboard:query{i}",
                        "expr": expr.replace("$__rate_interval", "5m")
                        .replace("$reporter", "destination")
                        .replace("$service", ".*"),
                    }
                    for i, expr in enumerate(exprs)
                ],
            }
        ]
    }
    path = tmp_path / "rules.yml"
    path.write_text(json.dumps(rules))  # JSON is YAML
    assert PROMTOOL is not None
    done = subprocess.run(
        [PROMTOOL, "check", "rules", str(path)], capture_output=True, timeout=30, check=False
    )
    assert done.returncode == 0, (done.stdout + done.stderr).decode()
