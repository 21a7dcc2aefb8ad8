"""The wire contract of telemetry reports, shared by the reporter and the registry (pure).

docs/registry-api.md ("Telemetry") describes the report body these constants shape.
"""

from __future__ import annotations

import re

__all__ = [
    "ANONYMOUS",
    "EDGE_NAME",
    "EDGE_NAME_PATTERN",
    "LATENCY_BUCKETS",
    "MAX_DENIAL_PATH",
    "MAX_DENIAL_REASON",
    "MAX_REPORT_DENIALS",
    "MAX_REPORT_EDGES",
    "STATUS_CLASSES",
]

ANONYMOUS = "anonymous"
"""The source of a request whose caller presented no identity."""

LATENCY_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
)  # fmt: skip
"""Upper bounds (seconds) of the latency histogram (DESIGN section 6, OpenTelemetry HTTP
semconv). A report's ``counts`` has one more entry: the requests slower than the last bound."""

STATUS_CLASSES: tuple[str, ...] = ("1xx", "2xx", "3xx", "4xx", "5xx", "error")
"""Keys of an edge's ``counts``; ``error`` is a request that got no answer (status 0)."""

MAX_REPORT_EDGES = 1000
"""Edges one report may carry (the registry refuses more)."""

EDGE_NAME_PATTERN = r"^[A-Za-z0-9._:\[\]-]{1,253}$"
EDGE_NAME = re.compile(EDGE_NAME_PATTERN)
"""An edge's source or destination: a service name, or a host (``host``, ``host:port``,
``[v6]:port``) for a destination outside the mesh."""

MAX_REPORT_DENIALS = 50
"""Denials one report may carry (the reporter keeps the newest; the registry refuses more)."""

MAX_DENIAL_PATH = 512
MAX_DENIAL_REASON = 256
"""Lengths a denial's path and reason are cut to before they are reported."""
