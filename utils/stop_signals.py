"""The signals that ask a run to stop (a scheduler's SIGTERM, Ctrl-C's SIGINT), for the processes that must
not die of them: loader workers (utils/dataloader.py) and a rank tearing down after its save."""
from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """Hold stop signals while workers start: a worker inherits the mask, so a signal sent to the whole
    group in that instant waits in the worker until `ignore_stop_signals` discards it, and in the main
    process until the mask is lifted (then its handler runs as usual)."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def ignore_stop_signals() -> None:
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)  # also discards one already pending
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
