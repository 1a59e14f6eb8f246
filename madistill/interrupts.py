"""Where Ctrl-C and SIGTERM go. Both take the same path: a cluster's SIGTERM (time limit, scancel) is a Ctrl-C,
so the training stages save a checkpoint on either. Signal handlers belong to the main thread: elsewhere the
blocks below run as they are."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

INTERRUPTS = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C, and a cluster's time limit or scancel
_POLLS: list[Callable[[], bool]] = []  # asked by check(): whether the run is to stop as if interrupted


def raise_interrupt(signum: int, frame: object) -> None:
    """A signal handler: Ctrl-C's KeyboardInterrupt, for SIGTERM too."""
    raise KeyboardInterrupt


def ignore_interrupts() -> None:
    """Ctrl-C and SIGTERM ignored from here on (a pool's job process at its start, until a job takes them)."""
    for s in INTERRUPTS:
        signal.signal(s, signal.SIG_IGN)


@contextlib.contextmanager
def handled(handler: Callable[[int, Any], None] | int) -> Iterator[None]:
    """Ctrl-C and SIGTERM go to ``handler`` in the block; the handlers before it come back after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {s: signal.signal(s, handler) for s in INTERRUPTS}
    try:
        yield
    finally:
        for s, previous in before.items():
            signal.signal(s, previous)


def held(note: str) -> contextlib.AbstractContextManager[None]:
    """Ctrl-C and SIGTERM do not stop the block: a run interrupted once saves its checkpoint in it, and a second
    Ctrl-C there would lose the checkpoint. Such a signal prints ``note`` and is dropped, as the run is stopping
    already."""

    def hold(signum: int, frame: object) -> None:
        print(note, file=sys.stderr, flush=True)

    return handled(hold)


@contextlib.contextmanager
def polled(asks: Callable[[], bool]) -> Iterator[None]:
    """In the block, :func:`check` stops the run where ``asks()`` says so: how a sweep's job in a process of its
    own learns that its launcher alone got the signal (``kill <pid>``, a scheduler's SIGTERM)."""
    _POLLS.append(asks)
    try:
        yield
    finally:
        _POLLS.remove(asks)


def check() -> None:
    """KeyboardInterrupt, as a Ctrl-C would raise, where a :func:`polled` request says the run is to stop. Called
    between units of long work (a training iteration), where stopping saves a checkpoint."""
    if any(asks() for asks in _POLLS):
        raise KeyboardInterrupt
