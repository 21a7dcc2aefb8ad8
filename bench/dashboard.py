"""What the registry's dashboard costs the registry: building one snapshot, and its size.

A snapshot is built at most once a second whatever the number of open pages (every stream shares
it), so its build time is the dashboard's whole CPU cost on the registry, and the longest it
holds the registry's event loop. This builds meshes of N services in process (two instances
each, two callees each, traffic on every edge in each of the 30 buckets kept, denials) and times
``Dashboard.snapshot`` (median of ``--repeat`` builds, as a page open for a while sees them:
the points of whole buckets are kept from one build to the next)::

    .venv/bin/python bench/dashboard.py                 # 5, 50 and 200 services
    .venv/bin/python bench/dashboard.py --services 50 --repeat 50
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from mesh_middleware.registry.catalog import Catalog
from mesh_middleware.registry.dashboard import Dashboard
from mesh_middleware.registry.identity import AdminToken
from mesh_middleware.registry.store import InstanceRecord, SQLiteStore
from mesh_middleware.registry.telemetry import Telemetry, TelemetryReport
from mesh_middleware.telemetry.reports import EdgeReporter


class _State:
    def __init__(self, where: Path) -> None:
        self.catalog = Catalog(SQLiteStore(where / "registry.db"))
        self.telemetry = Telemetry()
        self.admin = AdminToken(where / "admin.token")
        self.viewer = AdminToken(where / "viewer.token", prefix="mvt_")


def _mesh(state: _State, services: int) -> None:
    names = [f"svc-{i:03d}" for i in range(services)]
    for i, name in enumerate(names):
        for n in range(2):
            state.catalog.register(
                InstanceRecord(
                    service=name,
                    instance_id=f"{name}-{n}",
                    address="127.0.0.1",
                    port=10_000 + 2 * i + n,
                    version=f"v{n + 1}",
                    zone=f"zone-{i % 3}",
                    metadata={},
                    ttl=600.0,
                    check=None,
                    modify_index=0,
                )
            )
    # Every 10-second bucket of the 5 minutes kept has traffic on every edge: one report per
    # service and bucket, filed back in time with its age.
    for bucket in range(30):
        for i, name in enumerate(names):
            reporter = EdgeReporter(lambda body: None, service=name)
            for step in (1, 7):
                callee = names[(i + step) % len(names)]
                for n in range(100):
                    reporter.record(name, callee, 503 if n < 2 else 200, 0.001 * (n % 50 + 1))
                reporter.retried(name, callee)
            for n in range(50 // len(names) + 1):
                reporter.denied("anonymous", "GET", f"/admin/{n}", 403, "no-admin", 12, "denied")
            report = reporter.flush()
            assert report is not None
            report["age"] = 10.0 * bucket
            state.telemetry.merge(TelemetryReport.model_validate(report))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, action="append", help="(repeatable; 5, 50, 200)")
    parser.add_argument("--repeat", type=int, default=20, help="builds timed per size (20)")
    args = parser.parse_args()
    for services in args.services or [5, 50, 200]:
        with tempfile.TemporaryDirectory() as where:
            state = _State(Path(where))
            _mesh(state, services)
            dashboard = Dashboard(state)  # type: ignore[arg-type]
            times = []
            for _ in range(args.repeat):
                began = time.perf_counter()
                _, body = dashboard.snapshot(max_age=0.0)
                times.append(time.perf_counter() - began)
            print(
                f"{services:>4} services, {2 * services:>4} edges: snapshot built in "
                f"{statistics.median(times) * 1000:6.1f} ms (median of {args.repeat}), "
                f"{len(body) / 1024:6.1f} KiB"
            )


if __name__ == "__main__":
    main()
