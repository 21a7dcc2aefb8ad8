"""Ctrl-C and SIGTERM become ``KeyboardInterrupt``, held back while a process is spawned."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

__all__ = ["Interrupts"]


class Interrupts:
    """Turns SIGINT and SIGTERM into ``KeyboardInterrupt`` in the main thread.

    ``deferred()`` holds an interrupt back until its block ends (between spawning a process
    and recording it, so no process goes unrecorded); ``ignored()`` drops interrupts (while
    stopping: the cleanup must run to its end).
    """

    def __init__(self) -> None:
        self._deferring = False
        self._pending = False
        self._installable = threading.current_thread() is threading.main_thread()
        self._previous: dict[int, Any] = {}
        self.received = 0

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.received += 1
        if self._deferring:
            self._pending = True
            return
        raise KeyboardInterrupt

    def install(self) -> None:
        """Take over SIGINT and SIGTERM (only from the main thread; elsewhere a no-op)."""
        if self._installable:
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handler)

    def restore(self) -> None:
        """Give the signals back their previous handlers."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """Hold interrupts back until the block ends, then raise one if it came."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
        if self._pending:
            self._pending = False
            raise KeyboardInterrupt

    @contextmanager
    def ignored(self) -> Iterator[None]:
        """Drop interrupts while the block runs."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
            self._pending = False
