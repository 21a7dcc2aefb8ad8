"""The metrics page: formats, and the multiprocess aggregate across real worker processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import structlog
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from mesh_middleware.telemetry import exposition, metrics
from mesh_middleware.telemetry.exposition import (
    mark_process_dead,
    render_metrics,
    wipe_multiprocess_dir,
)

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)


def test_the_default_is_the_prometheus_text_format_of_the_default_registry() -> None:
    metrics.count_mirror_dropped()
    body, content_type = render_metrics(None)
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    assert b"\nmesh_outbound_mirror_dropped_total " in body
    assert b"process_cpu_seconds_total" in body  # the process collector, single-process only


def test_openmetrics_when_the_scraper_asks_for_it() -> None:
    """Prometheus's own Accept header gets OpenMetrics, which ends with # EOF."""
    body, content_type = render_metrics(PROMETHEUS_ACCEPT)
    assert content_type.startswith("application/openmetrics-text; version=1.0.0")
    assert body.endswith(b"# EOF\n")
    body, content_type = render_metrics("text/plain")
    assert content_type.startswith("text/plain")
    assert not body.endswith(b"# EOF\n")


def test_a_given_registry_is_rendered_instead() -> None:
    registry = CollectorRegistry()
    Counter("only_this", "x", registry=registry).inc()
    body, _ = render_metrics(None, registry=registry)
    assert b"only_this_total 1.0" in body
    assert b"mesh_" not in body


def test_a_dir_set_after_import_is_reported_and_memory_served(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """prometheus_client chose in-memory storage at import: the files would be empty."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.setattr(exposition, "_warned", False)
    with structlog.testing.capture_logs() as logs:
        assert exposition.multiprocess_dir() is None
        body, _ = render_metrics(None)
        exposition.multiprocess_dir()
    assert [e["event"] for e in logs] == ["prometheus_multiproc_dir_ignored"]
    assert b"mesh_requests" in body


def test_wipe_empties_the_directory_of_db_files_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "counter_1.db").write_bytes(b"x")
    (tmp_path / "gauge_livemax_2.db").write_bytes(b"x")
    (tmp_path / "keep.txt").write_text("x")
    assert wipe_multiprocess_dir(tmp_path) == tmp_path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
    fresh = tmp_path / "new" / "dir"
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(fresh))
    assert wipe_multiprocess_dir() == fresh and fresh.is_dir()
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")
    with pytest.raises(ValueError, match="PROMETHEUS_MULTIPROC_DIR"):
        wipe_multiprocess_dir()
    mark_process_dead(12345)  # without a directory: nothing to do, no error


# --- multiprocess: real processes sharing PROMETHEUS_MULTIPROC_DIR ------------------------------

_WORKER = textwrap.dedent(
    """
    import os, sys
    from mesh_middleware.telemetry import metrics
    requests, ejected = int(sys.argv[1]), int(sys.argv[2])
    rm = metrics.RequestMetrics("destination")
    for i in range(requests):
        rm.record("orders", "shop", "v1", "/items", "GET", 200, "-", 0.02 * (i % 3), 10, 100)
    metrics.count_retry("shop", "inventory", "reset")
    metrics.set_ejected_endpoints("inventory", ejected)
    print(os.getpid())
    """
)

_RENDER = textwrap.dedent(
    """
    import sys
    from mesh_middleware.telemetry.exposition import render_metrics
    body, content_type = render_metrics(sys.argv[1] if len(sys.argv) > 1 else None)
    sys.stdout.write(content_type + "\\n" + body.decode())
    """
)


def run_python(code: str, *args: str, multiproc_dir: Path) -> str:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(multiproc_dir), "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout


def scrape(multiproc_dir: Path, accept: str | None = None) -> dict[tuple[str, tuple], float]:
    out = run_python(_RENDER, *([accept] if accept else []), multiproc_dir=multiproc_dir)
    content_type, _, body = out.partition("\n")
    assert content_type.startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


REQ = (
    ("destination_service", "shop"),
    ("destination_version", "v1"),
    ("method", "GET"),
    ("reporter", "destination"),
    ("response_code", "200"),
    ("response_flags", "-"),
    ("route", "/items"),
    ("source_service", "orders"),
)


def test_workers_report_one_aggregate_and_live_gauges_forget_dead_workers(
    tmp_path: Path,
) -> None:
    """Three worker processes: counters and histograms add up, the gauge is the highest of
    the live workers, a dead worker's counts stay while its gauge goes."""
    wipe_multiprocess_dir(tmp_path)
    pids = [
        int(run_python(_WORKER, str(n), str(e), multiproc_dir=tmp_path))
        for n, e in ((10, 1), (20, 3), (30, 2))
    ]
    seen = scrape(tmp_path)
    assert seen[("mesh_requests_total", REQ)] == 60
    assert seen[("mesh_request_duration_seconds_count", REQ)] == 60
    assert seen[("mesh_request_duration_seconds_bucket", (*REQ[:2], ("le", "0.005"), *REQ[2:]))]
    assert seen[("mesh_request_bytes_sum", REQ)] == 600
    retries = (
        ("destination_service", "inventory"),
        ("reason", "reset"),
        ("source_service", "shop"),
    )
    assert seen[("mesh_outbound_retries_total", retries)] == 3
    ejected = ("mesh_outbound_ejected_endpoints", (("destination_service", "inventory"),))
    assert seen[ejected] == 3
    assert not any(dict(labels).get("pid") for _, labels in seen)  # one series, not per pid

    mark_process_dead(pids[1], tmp_path)  # the worker that had ejected 3 exits
    seen = scrape(tmp_path)
    assert seen[ejected] == 2
    assert seen[("mesh_requests_total", REQ)] == 60  # its requests still happened

    wipe_multiprocess_dir(tmp_path)
    assert ("mesh_requests_total", REQ) not in scrape(tmp_path)


def test_the_aggregate_speaks_openmetrics_too(tmp_path: Path) -> None:
    run_python(_WORKER, "5", "1", multiproc_dir=tmp_path)
    out = run_python(_RENDER, PROMETHEUS_ACCEPT, multiproc_dir=tmp_path)
    content_type, _, body = out.partition("\n")
    assert content_type.startswith("application/openmetrics-text")
    assert body.endswith("# EOF\n")
    assert 'mesh_requests_total{destination_service="shop"' in body
