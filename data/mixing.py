"""How a batch is split between sources: a closed form, so any step's share is known without replaying
the run, and every rank and every loader worker agrees on it without talking to the others."""
from __future__ import annotations

import math
from typing import List, Sequence

import numpy as np


class MixingPlan:
    """Samples drawn from each source per rank, in proportion to `weights`.

    After T = step * batch_size samples, source 1 has supplied floor(T * w1 + phase1); the rest is split
    the same way between source 2 and the sources after it, and so on; the last takes what remains.
    Each count is non-decreasing in T, so per step every source gets its weighted share of the batch
    rounded up or down (about +-1), the shares add up to the batch size exactly, and over many steps the
    proportions are exact. The random phases only decide which steps round up.
    """

    def __init__(self, weights: Sequence[float], batch_size: int, seed: int):
        w = np.asarray(weights, dtype=np.float64)
        if len(w) == 0 or (w <= 0).any():
            raise ValueError(f'mixing weights must be positive, got {list(weights)}')
        tails = np.cumsum(w[::-1])[::-1]  # weight of each source and all sources after it
        self._ratios = [float(r) for r in np.minimum(w / tails, 1.0)]
        self._phases = [float(p) for p in np.random.default_rng([seed, 0x6d6978]).random(len(w))]
        self.batch_size = batch_size

    def cumulative(self, step: int) -> List[int]:
        """Samples of each source in steps [0, step)."""
        remaining = step * self.batch_size
        counts = []
        for ratio, phase in zip(self._ratios[:-1], self._phases):
            taken = min(remaining, math.floor(remaining * ratio + phase))
            counts.append(taken)
            remaining -= taken
        return counts + [remaining]

    def counts(self, step: int) -> List[int]:
        """Samples of each source in the batch of `step`."""
        return [b - a for a, b in zip(self.cumulative(step), self.cumulative(step + 1))]
