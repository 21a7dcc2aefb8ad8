"""One daemon thread per Mesh for the work that must never run on a request."""

from __future__ import annotations

import os
import random
import threading
import weakref
from collections.abc import Callable

import structlog

__all__ = ["BackgroundLoop"]

log = structlog.get_logger("mesh.runtime")


class BackgroundLoop:
    """Runs ``tick`` every ``interval`` seconds (jittered ±10%) in a daemon thread.

    Restarted in a forked child (gunicorn workers), since threads do not survive ``fork``.
    """

    def __init__(self, name: str, interval: float, tick: Callable[[], None]) -> None:
        self.name = name
        self.interval = interval
        self._tick = tick
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start()
        ref = weakref.ref(self)

        def restart_in_child() -> None:
            loop = ref()
            if loop is not None and not loop._stop.is_set():
                loop._stop = threading.Event()
                loop._start()

        os.register_at_fork(after_in_child=restart_in_child)

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        stop = self._stop
        while not stop.wait(self.interval * random.uniform(0.9, 1.1)):
            try:
                self._tick()
            except Exception:  # a failing tick must not end the loop
                log.exception("background_tick_failed", loop=self.name)

    def stop(self) -> None:
        """Stop the thread and wait for it (bounded)."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)
