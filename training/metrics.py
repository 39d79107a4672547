"""What the training log reports: running means, peak memory, tensorboard scalars."""
from __future__ import annotations

import os
import resource
from typing import Dict

import torch


def peak_memory_mb(device: torch.device) -> float:
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS (Linux reports KiB)


class Meter:
    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.total, self.count = 0.0, 0

    def update(self, value: float, n: int = 1) -> None:
        self.total += value * n
        self.count += n

    @property
    def avg(self) -> float:
        return self.total / max(self.count, 1)

    def state_dict(self) -> Dict[str, float]:
        return {'total': self.total, 'count': self.count}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        self.total, self.count = float(state['total']), int(state['count'])


def open_tensorboard(config, rank: int):
    """A SummaryWriter under OUTPUT/tensorboard on rank 0; None on the other ranks."""
    if rank != 0:
        return None
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter(os.path.join(config.OUTPUT, 'tensorboard'))

