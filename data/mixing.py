"""How a batch is split between sources: a closed form, so any step's share is known without replaying
the run, and every rank and every loader worker agrees on it without talking to the others."""
from __future__ import annotations

import math
from typing import List, Sequence

import numpy as np


class MixingPlan:
    """Samples drawn from each source per rank, in proportion to `weights`.

    After T = step * batch_size samples, source 1 has supplied round(T * w1); the rest is split the same
    way between source 2 and the sources after it, and so on; the last takes what remains. Each count is
    non-decreasing in T, so per step every source gets its weighted share of the batch rounded up or
    down (about +-1), the shares add up to the batch size exactly, and over many steps the proportions
    are exact.
    """

    def __init__(self, weights: Sequence[float], batch_size: int):
        w = np.asarray(weights, dtype=np.float64)
        if len(w) == 0 or (w <= 0).any():
            raise ValueError(f'mixing weights must be positive, got {list(weights)}')
        tails = np.cumsum(w[::-1])[::-1]  # weight of each source and all sources after it
        self._ratios = [float(r) for r in np.minimum(w / tails, 1.0)]
        self.batch_size = batch_size

    def cumulative(self, step: int) -> List[int]:
        """Samples of each source in steps [0, step)."""
        remaining = step * self.batch_size
        counts = []
        for ratio in self._ratios[:-1]:
            taken = min(remaining, math.floor(remaining * ratio + 0.5))
            counts.append(taken)
            remaining -= taken
        return counts + [remaining]

    def counts(self, step: int) -> List[int]:
        """Samples of each source in the batch of `step`."""
        return [b - a for a, b in zip(self.cumulative(step), self.cumulative(step + 1))]
