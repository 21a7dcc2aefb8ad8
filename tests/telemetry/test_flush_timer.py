"""The one-shot flush timer the access log and the request metrics batch with."""

from __future__ import annotations

import threading
import time

from mesh_middleware.telemetry.flush_timer import FlushTimer


def test_arming_an_armed_timer_flushes_once_after_the_interval() -> None:
    flushed: list[float] = []
    timer = FlushTimer(0.2)
    started = time.monotonic()
    for _ in range(5):
        timer.arm(lambda: flushed.append(time.monotonic()))
    assert timer.armed
    time.sleep(0.6)
    assert len(flushed) == 1 and flushed[0] - started >= 0.2
    assert not timer.armed


def test_what_is_still_pending_after_a_flush_is_flushed_again() -> None:
    waiting = [3]
    done = threading.Event()

    def flush() -> None:
        waiting[0] -= 1
        if waiting[0] == 0:
            done.set()

    FlushTimer(0.05).arm(flush, lambda: waiting[0] > 0)
    assert done.wait(2)
    assert waiting == [0]


def test_a_forked_child_forgets_the_parents_timer() -> None:
    timer = FlushTimer(60)
    timer.arm(lambda: None)
    timer.forget()
    assert not timer.armed
