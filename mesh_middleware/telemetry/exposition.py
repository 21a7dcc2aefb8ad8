"""The body of the metrics endpoint: one process, or every worker of a multi-process server.

Single process: the default registry (the mesh's metrics, the app's own, and
prometheus_client's process and platform collectors).

Several workers (gunicorn, ``uvicorn --workers``): each worker is its own process with its own
counters, and a scrape reaches whichever worker accepts it. prometheus_client's multiprocess
mode makes every worker write its values to files in ``PROMETHEUS_MULTIPROC_DIR``, and
:func:`render_metrics` then answers with the aggregate of all of them, so every scrape sees
the same totals whichever worker serves it. The setup (docs/observability.md):

- ``PROMETHEUS_MULTIPROC_DIR`` is set in the environment *before the server starts* (before
  anything imports prometheus_client, which picks its storage once at import);
- the directory is wiped when the server starts (:func:`wipe_multiprocess_dir`), or the last
  run's counters come back;
- when a worker exits, the server's master calls :func:`mark_process_dead` with its pid, so
  its ``live*`` gauges stop counting (counters and histograms keep its totals, as they must).

gunicorn config::

    from mesh_middleware.telemetry.exposition import mark_process_dead, wipe_multiprocess_dir

    def on_starting(server):
        wipe_multiprocess_dir()

    def child_exit(server, worker):
        mark_process_dead(worker.pid)
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import structlog
from prometheus_client import REGISTRY, CollectorRegistry, values
from prometheus_client import multiprocess as _multiprocess
from prometheus_client.exposition import choose_encoder

from mesh_middleware.telemetry import metrics

__all__ = [
    "MULTIPROC_DIR_ENV",
    "mark_process_dead",
    "multiprocess_dir",
    "render_metrics",
    "wipe_multiprocess_dir",
]

log = structlog.get_logger("mesh.telemetry")

MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"

_lock = threading.Lock()
_aggregates: dict[str, CollectorRegistry] = {}
_warned = False


def multiprocess_dir() -> str | None:
    """The multiprocess directory when this process stores its metrics there, else ``None``.

    prometheus_client decides at import: when the variable was set afterwards, this process
    keeps its metrics in memory, and the directory (empty of them) would show nothing; that
    case is logged once and answered from memory."""
    global _warned
    path = os.environ.get(MULTIPROC_DIR_ENV)
    if not path:
        return None
    if not getattr(values.ValueClass, "_multiprocess", False):
        if not _warned:
            _warned = True
            log.warning(
                "prometheus_multiproc_dir_ignored",
                reason=f"{MULTIPROC_DIR_ENV} was set after prometheus_client was imported; "
                "serving this process's metrics only",
                path=path,
            )
        return None
    return path


def _aggregate(path: str) -> CollectorRegistry:
    with _lock:
        registry = _aggregates.get(path)
        if registry is None:
            registry = CollectorRegistry()
            _multiprocess.MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
            _aggregates[path] = registry
        return registry


def render_metrics(
    accept_header: str | None = None, registry: CollectorRegistry | None = None
) -> tuple[bytes, str]:
    """The metrics page and its content type, in the format the ``Accept`` header asks for.

    OpenMetrics (``application/openmetrics-text``) when asked for, else the Prometheus text
    format 0.0.4. ``registry`` overrides the choice (tests); by default it is the multiprocess
    aggregate under ``PROMETHEUS_MULTIPROC_DIR`` and the default registry otherwise."""
    metrics.flush_pending()  # this process's latest requests (other workers: within a second)
    if registry is None:
        path = multiprocess_dir()
        registry = REGISTRY if path is None else _aggregate(path)
    encoder, content_type = choose_encoder(accept_header or "")
    return encoder(registry), content_type


def wipe_multiprocess_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """Create the multiprocess directory, or empty it of a previous run's ``*.db`` files.

    Call it once when the server starts, before any worker records anything (gunicorn's
    ``on_starting`` hook, or the shell: ``rm -rf "$PROMETHEUS_MULTIPROC_DIR"/*.db``)."""
    if path is None:
        path = os.environ.get(MULTIPROC_DIR_ENV)
        if not path:
            raise ValueError(f"{MULTIPROC_DIR_ENV} is not set")
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    for file in directory.glob("*.db"):
        file.unlink(missing_ok=True)
    return directory


def mark_process_dead(pid: int, path: str | os.PathLike[str] | None = None) -> None:
    """Forget a dead worker's ``live*`` gauges (gunicorn's ``child_exit`` hook calls this).

    Its counters and histograms stay: they are totals the scrape must keep reporting, or
    ``rate()`` would see a counter reset."""
    if path is None:
        path = os.environ.get(MULTIPROC_DIR_ENV)
        if not path:
            return
    _multiprocess.mark_process_dead(pid, os.fspath(path))  # type: ignore[no-untyped-call]
