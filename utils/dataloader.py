"""A DataLoader whose workers survive a scheduler's stop signal.

SLURM's slurmstepd, `kill -TERM -- -PGID` and Ctrl-C signal every process of a job, loader workers
included. A worker killed by SIGTERM makes the main process raise "DataLoader worker (pid ...) is killed by
signal" before the training can save, so workers ignore SIGTERM and SIGINT; the main process, which
handles them (finish the step, save, exit), shuts its workers down as it exits.
"""
from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

from torch.utils.data import DataLoader

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


class _IgnoringStopSignals:
    """A worker_init_fn that ignores stop signals, then runs the caller's own (picklable for spawn)."""

    def __init__(self, then: Optional[Callable[[int], None]]):
        self.then = then

    def __call__(self, worker_id: int) -> None:
        ignore_stop_signals()
        if self.then is not None:
            self.then(worker_id)


class StopSafeDataLoader(DataLoader):
    """`DataLoader` whose worker processes ignore SIGTERM/SIGINT (see the module docstring)."""

    def __init__(self, *args, worker_init_fn: Optional[Callable[[int], None]] = None, **kwargs):
        super().__init__(*args, worker_init_fn=_IgnoringStopSignals(worker_init_fn), **kwargs)

    def __iter__(self):
        with stop_signals_blocked():
            return super().__iter__()  # starts the workers
