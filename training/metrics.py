"""What the training log reports: running means, peak memory, tensorboard scalars."""
from __future__ import annotations

import os
import resource

import torch


def peak_memory_mb(device: torch.device) -> float:
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS (Linux reports KiB)


class Meter:
    def __init__(self):
        self.total, self.count = 0.0, 0

    def update(self, value: float, n: int = 1) -> None:
        self.total += value * n
        self.count += n

    @property
    def avg(self) -> float:
        return self.total / max(self.count, 1)


def open_tensorboard(config, rank: int):
    """A SummaryWriter under OUTPUT/tensorboard on rank 0; None on the other ranks."""
    if rank != 0:
        return None
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter(os.path.join(config.OUTPUT, 'tensorboard'))

