"""The dashboard's server side: sign-in, the pages' headers, the snapshot and its event stream
(a real `mesh registry` process), and the stream's pacing (in process, on short timings).

The page itself is tested in a real browser: tests/e2e/test_dashboard_browser.py.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from mesh_middleware.registry.dashboard import COOKIE, CSP, Dashboard
from tests.registry.support import (
    Registry,
    bearer,
    body,
    create_join_token,
    instance_path,
    start_registry,
)
from tests.registry.test_telemetry import _acting

TIMEOUT = 10.0


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with start_registry(tmp_path_factory.mktemp("dashboard") / "data") as running:
        yield running


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=TIMEOUT, trust_env=False) as http:
        yield http


@contextmanager
def _signed_in(registry: Registry, token: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=registry.url, timeout=TIMEOUT, trust_env=False) as http:
        answer = http.get("/ui/login", params={"token": token})
        assert answer.status_code == 303 and answer.headers["location"] == "/ui/"
        yield http


def _events(http: httpx.Client, count: int, seconds: float) -> list[dict[str, Any]]:
    """The first ``count`` ``state`` events of the stream (read for at most ``seconds``)."""
    found: list[dict[str, Any]] = []
    deadline = time.monotonic() + seconds
    with http.stream("GET", "/ui/api/events") as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        event = None
        for line in stream.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event == "state":
                found.append(json.loads(line[6:]))
                if len(found) >= count:
                    break
            assert time.monotonic() < deadline, "the stream sent too little"
    return found


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_the_dashboard_needs_the_viewer_or_the_admin_token(
    shared: Registry, client: httpx.Client
) -> None:
    url = shared.url
    assert client.get(f"{url}/ui").headers["location"] == "/ui/"
    first = client.get(f"{url}/ui/")
    assert (first.status_code, first.headers["location"]) == (303, "/ui/login")
    login = client.get(f"{url}/ui/login")
    assert login.status_code == 200 and "<form" in login.text
    assert login.headers["content-security-policy"] == CSP
    wrong_login = client.get(f"{url}/ui/login", params={"token": "mvt_wrong"})
    assert wrong_login.status_code == 401 and "neither the admin nor the viewer" in wrong_login.text
    assert "neither" not in login.text
    for path in ("/ui/api/state", "/ui/api/events"):
        refused = client.get(f"{url}{path}")
        assert refused.status_code == 401
        assert refused.json()["error"] == "unauthenticated"
        wrong = client.get(f"{url}{path}", headers={"cookie": f"{COOKIE}=mvt_wrong"})
        assert wrong.status_code == 401
    # A join token is a service's credential, not an operator's.
    join = create_join_token(client, shared, "orders")
    assert client.get(f"{url}/ui/api/state", headers=bearer(join)).status_code == 401
    assert client.get(f"{url}/v1/telemetry/denials", headers=bearer(join)).status_code == 401
    for token in (shared.viewer_token, shared.admin_token):
        assert token.startswith(("mvt_", "mat_"))
        with _signed_in(shared, token) as http:
            cookie = http.get("/ui/login", params={"token": token}).headers["set-cookie"]
            assert f"{COOKIE}=" in cookie and "HttpOnly" in cookie and "Path=/ui" in cookie
            page = http.get("/ui/")
            assert page.status_code == 200 and "dashboard.js" in page.text
            assert page.headers["content-security-policy"] == CSP
            assert page.headers["referrer-policy"] == "no-referrer"
            assert http.get("/ui/api/state").status_code == 200
            assert http.post("/ui/logout").headers["location"] == "/ui/login"
            assert http.get("/ui/api/state").status_code == 401  # the cookie is gone
        assert client.get(f"{url}/ui/api/state", headers=bearer(token)).status_code == 200
    posted = client.post(f"{url}/ui/login", data={"token": shared.viewer_token})
    assert posted.status_code == 303 and COOKIE in posted.cookies
    assert client.post(f"{url}/ui/login", data={"token": "x" * 10_000}).status_code == 401
    for asset in ("dashboard.js", "dashboard.css"):
        assert client.get(f"{url}/ui/{asset}").status_code == 200  # the login page's too
    assert "viewer token" in shared.stderr()  # shown once, at first start


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_the_snapshot_shows_instances_edges_and_denials(
    shared: Registry, client: httpx.Client
) -> None:
    url = shared.url
    admin = shared.admin()
    registered = client.put(
        f"{url}{instance_path('inventory', 'inv-1')}",
        json=body(8101, version="v2", zone="zone-b", ttl=30),
        headers=admin,
    )
    assert registered.status_code == 200, registered.text
    report = client.post(f"{url}/v1/telemetry/reports", json=_acting("inventory"), headers=admin)
    assert report.status_code == 202, report.text
    with _signed_in(shared, shared.viewer_token) as http:
        state = http.get("/ui/api/state").json()
    assert abs(state["generated_at"] - time.time()) < 5
    assert state["window_seconds"] == 60.0
    inventory = next(s for s in state["services"] if s["service"] == "inventory")
    [member] = inventory["members"]
    assert (member["id"], member["version"], member["zone"]) == ("inv-1", "v2", "zone-b")
    assert member["healthy"] is True and 0 <= member["lease_age"] < 5
    assert "metadata" not in member
    edge = next(
        e for e in state["edges"] if (e["source"], e["destination"]) == ("orders", "inventory")
    )
    assert edge["faults"] == {"abort": 1, "delay": 0} and edge["success_rate"] == 0.0
    assert len(edge["series"]["rps"]) == 30
    [denial] = [d for d in state["denials"] if d["destination"] == "inventory"]
    assert (denial["rule"], denial["line"], denial["source"]) == (
        "only-orders-reserve",
        26,
        "gateway",
    )
    via_api = client.get(f"{url}/v1/telemetry/denials", headers=bearer(shared.viewer_token))
    assert (
        via_api.status_code == 200 and via_api.json()["denials"][0]["rule"] == "only-orders-reserve"
    )


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_the_event_stream_sends_a_snapshot_and_the_next_one_on_a_change(
    shared: Registry, client: httpx.Client
) -> None:
    with _signed_in(shared, shared.viewer_token) as http:
        with http.stream("GET", "/ui/api/events") as stream:
            assert stream.headers["cache-control"] == "no-store"
            lines = stream.iter_lines()
            assert next(lines) == "retry: 5000"
        first = _events(http, 1, 10)[0]
        assert {"services", "edges", "denials", "generated_at"} <= first.keys()

        def change() -> None:
            time.sleep(0.5)
            client.put(
                f"{shared.url}{instance_path('payments', 'pay-9')}",
                json=body(8109, ttl=30),
                headers=shared.admin(),
            )

        began = time.monotonic()
        changer = threading.Thread(target=change)
        changer.start()
        try:
            states = _events(http, 2, 15)
        finally:
            changer.join(TIMEOUT)
        assert any(s["service"] == "payments" for s in states[-1]["services"])
        assert time.monotonic() - began < 10


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_an_open_dashboard_does_not_hold_the_registry_up_at_shutdown(tmp_path: Path) -> None:
    """uvicorn waits up to 5 s for open responses at shutdown; an event stream never ends by
    itself, so the registry tells streams to end at their next push (every 2 s)."""
    with start_registry(tmp_path / "data") as registry:
        reading = threading.Event()

        def watch() -> None:
            with (
                _signed_in(registry, registry.viewer_token) as http,
                http.stream("GET", "/ui/api/events") as stream,
            ):
                for line in stream.iter_lines():
                    if line.startswith("event: state"):
                        reading.set()

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        assert reading.wait(TIMEOUT)
        began = time.monotonic()
        os.killpg(registry.proc.pid, signal.SIGTERM)
        registry.proc.wait(timeout=10)
        took = time.monotonic() - began
        watcher.join(TIMEOUT)
        # uvicorn re-raises the signal once it has shut down cleanly.
        assert registry.proc.returncode in (0, -signal.SIGTERM)
        assert "Traceback" not in registry.stderr()
        assert took < 4.0, f"the registry took {took:.1f} s to stop"
        assert not watcher.is_alive()  # the stream ended, it was not cut


# -- the stream's pacing, in process -------------------------------------------------------------


class _State:
    """Just enough of the registry's state for the dashboard's snapshot."""

    def __init__(self, tmp: Path) -> None:
        from mesh_middleware.registry.catalog import Catalog
        from mesh_middleware.registry.identity import AdminToken
        from mesh_middleware.registry.store import SQLiteStore
        from mesh_middleware.registry.telemetry import Telemetry

        self.catalog = Catalog(SQLiteStore(tmp / "r.db"))
        self.telemetry = Telemetry()
        self.admin = AdminToken(tmp / "admin.token")
        self.viewer = AdminToken(tmp / "viewer.token", prefix="mvt_")


def test_the_stream_skips_unchanged_snapshots_keeps_alive_and_ends(tmp_path: Path) -> None:
    """A snapshot goes out only when it changed; a quiet stream sends a comment every
    KEEPALIVE_SECONDS; it ends after its time (and the browser reconnects)."""
    from mesh_middleware.registry import dashboard

    ticks = itertools.count(0.0, 0.5)  # each look at the clock is half a second later
    dash = Dashboard(
        _State(tmp_path),  # type: ignore[arg-type]
        clock=lambda: next(ticks),
        push_seconds=0.0,
        stream_seconds=100.0,
    )

    async def read() -> list[bytes]:
        out = []
        async for chunk in dash._events():
            out.append(chunk)
            assert dash.streams == 1
        return out

    chunks = asyncio.run(read())
    assert dash.streams == 0
    assert chunks[0] == b"retry: 5000\n\n"
    states = [c for c in chunks if c.startswith(b"event: state")]
    keepalives = [c for c in chunks if c.startswith(b":")]
    assert len(states) == 1  # nothing changed
    low, high = (90 // dashboard.KEEPALIVE_SECONDS) - 1, 110 // dashboard.KEEPALIVE_SECONDS
    assert low <= len(keepalives) <= high
    assert len(chunks) == 2 + len(keepalives)
