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

_FORK_WAIT_SECONDS = 5.0


class BackgroundLoop:
    """Runs ``tick`` every ``interval`` seconds (jittered ±10%) in a daemon thread.

    :meth:`wake` runs the next tick at once. A stopped loop can be started again. The
    thread is restarted in a forked child (gunicorn workers), since threads do not survive
    ``fork``; and a fork waits for a tick under way to finish (bounded), so the child never
    inherits a lock the tick held at that moment.
    """

    def __init__(
        self, name: str, interval: float, tick: Callable[[], None], *, start: bool = True
    ) -> None:
        self.name = name
        self.interval = interval
        self._tick = tick
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._guard = threading.Lock()
        self._ticking = threading.Lock()
        self._held_for_fork = False
        if start:
            self._start()
        else:
            self._stop.set()
        ref = weakref.ref(self)

        def before_fork() -> None:
            loop = ref()
            if loop is not None and loop._thread is not threading.current_thread():
                loop._held_for_fork = loop._ticking.acquire(timeout=_FORK_WAIT_SECONDS)

        def after_fork_in_parent() -> None:
            loop = ref()
            if loop is not None and loop._held_for_fork:
                loop._held_for_fork = False
                loop._ticking.release()

        def restart_in_child() -> None:
            loop = ref()
            if loop is not None:
                loop._guard = threading.Lock()
                loop._ticking = threading.Lock()
                loop._held_for_fork = False
                if not loop._stop.is_set():
                    loop._start()

        os.register_at_fork(
            before=before_fork,
            after_in_parent=after_fork_in_parent,
            after_in_child=restart_in_child,
        )

    @property
    def running(self) -> bool:
        """Whether the thread runs (or is about to)."""
        return not self._stop.is_set()

    def start(self) -> None:
        """Start the thread if it is not running."""
        with self._guard:
            if self._stop.is_set():
                self._start()

    def _start(self) -> None:
        # Fresh events per thread: an old thread still winding down keeps its own stop flag.
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(self._stop, self._wake), name=self.name, daemon=True
        )
        self._thread.start()

    def wake(self) -> None:
        """Run the next tick now rather than at the end of the interval."""
        self._wake.set()

    def _run(self, stop: threading.Event, wake: threading.Event) -> None:
        while True:
            wake.wait(self.interval * random.uniform(0.9, 1.1))
            if stop.is_set():
                return
            wake.clear()
            with self._ticking:
                try:
                    self._tick()
                except Exception:  # a failing tick must not end the loop
                    log.exception("background_tick_failed", loop=self.name)

    def stop(self) -> None:
        """Stop the thread and wait for it (bounded)."""
        with self._guard:
            self._stop.set()
            self._wake.set()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)
