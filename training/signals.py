"""Signals: finish the step, save, exit."""
from __future__ import annotations

import signal

import torch

from utils.distributed import all_reduce_max, get_world_size
from utils.stop_signals import STOP_SIGNALS


class StopRequest:
    """Remembers SIGTERM/SIGINT instead of dying mid-step; the loop saves a checkpoint and exits. A context
    manager: the previous handlers come back afterwards."""

    SIGNALS = STOP_SIGNALS

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def __enter__(self) -> 'StopRequest':
        self._previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def agreed(self, device: torch.device) -> int:
        """The signal any rank received, the same number on every rank (ranks must stop at the same step to
        save together, and exit with one code). Two different signals: the larger number."""
        if get_world_size() == 1:
            return self.signum
        return int(all_reduce_max(torch.tensor([self.signum], device=device, dtype=torch.int64)).item())

