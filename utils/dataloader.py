"""A DataLoader whose workers survive a scheduler's stop signal.

SLURM's slurmstepd, `kill -TERM -- -PGID` and Ctrl-C signal every process of a job, loader workers
included. A worker killed by SIGTERM makes the main process raise "DataLoader worker (pid ...) is killed by
signal" before the training can save, so workers ignore SIGTERM and SIGINT; the main process, which
handles them (finish the step, save, exit), shuts its workers down as it exits.
"""
from __future__ import annotations

from typing import Callable, Optional

from torch.utils.data import DataLoader

from .stop_signals import ignore_stop_signals, stop_signals_blocked


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
