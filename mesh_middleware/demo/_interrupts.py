"""Ctrl-C and SIGTERM become ``KeyboardInterrupt``, dropped while the demo cleans up."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

__all__ = ["Interrupts"]


class Interrupts:
    """Turns SIGINT and SIGTERM into ``KeyboardInterrupt`` in the main thread (a SIGTERM then
    stops the demo as cleanly as Ctrl-C); ``ignored()`` drops them while the cleanup runs, so
    it runs to its end."""

    def __init__(self) -> None:
        self._ignoring = False
        self._installable = threading.current_thread() is threading.main_thread()
        self._previous: dict[int, Any] = {}
        self.received = 0

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.received += 1
        if not self._ignoring:
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
    def ignored(self) -> Iterator[None]:
        """Drop interrupts while the block runs."""
        self._ignoring = True
        try:
            yield
        finally:
            self._ignoring = False
