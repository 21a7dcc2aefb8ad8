"""Shop's process handling with the registry alone (fast): restarts from a short-lived
thread, kills, and a stop that leaves nothing behind."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from mesh_middleware.demo.shop import AppSpec, Shop, ShopError

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=1.0, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


def test_a_registry_restarted_from_a_thread_that_ends_keeps_running(tmp_path: Path) -> None:
    """Linux's die-with-parent signal follows the forking thread: the shop forks from its own
    thread, so a restart asked for by a thread that then ends is not killed with it."""
    with Shop.start(tmp_path, apps=()) as shop:
        url = shop.registry_url
        first = shop.pids()
        helper = threading.Thread(target=shop.restart_registry)
        helper.start()
        helper.join(60)
        assert not helper.is_alive()
        time.sleep(1.0)  # a SIGTERM from the ended thread would have landed by now
        assert shop.registry_url == url
        assert _healthy(url)
        assert len(shop.leftover()) == 1
        assert set(first) < set(shop.pids())
        assert (tmp_path / "registry" / "admin.token").exists()  # the same data dir
    assert shop.leftover() == []
    assert not _healthy(url)


def test_kill_waits_for_the_end_and_restart_brings_it_back(tmp_path: Path) -> None:
    """SIGKILL, then the same port again; stop() twice is fine."""
    shop = Shop.start(tmp_path, apps=())
    try:
        shop.kill("registry", signal.SIGKILL)
        assert shop.leftover() == []
        assert not _healthy(shop.registry_url)
        shop.restart("registry")
        assert _healthy(shop.url("registry"))
        assert shop.metrics_url("registry").endswith("/metrics")
        with pytest.raises(KeyError, match="known: registry"):
            shop.url("gateway")
    finally:
        shop.stop()
        shop.stop()
    assert shop.leftover() == []
    assert len(shop.pids()) == 2


def test_an_app_that_cannot_start_is_an_error_with_its_log(tmp_path: Path) -> None:
    """An app whose module does not exist exits: ShopError names it and shows its log; the
    shop has stopped everything it started (the registry too)."""
    broken = AppSpec("broken", "broken", "sample_apps.no_such_app")
    with pytest.raises(ShopError, match=r"broken \(uvicorn\) did not start: exited") as info:
        Shop.start(tmp_path, apps=(broken,), timeout=30)
    assert "no_such_app" in str(info.value)
    assert "last lines of" in str(info.value)
    assert _no_registry_left(tmp_path)


def _no_registry_left(workdir: Path) -> bool:
    """No process still runs with this workdir's registry data dir on its command line."""
    needle = str(workdir / "registry").encode()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if needle in cmdline.read_bytes():
                return False
        except OSError:
            continue
    return True
