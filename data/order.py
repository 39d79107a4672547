"""Seeds and sample orders: everything random in loading is a function of SEED and the sample's place."""
from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from non-negative integer keys, e.g. (SEED, global step, rank)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(2, np.uint64)[0] >> np.uint64(1))


@contextmanager
def seeded_global_rngs(seed: int) -> Iterator[None]:
    """Seed `random`, numpy and torch's CPU generator (the ones timm's transforms draw from) and restore
    them afterwards: batches become reproducible, and loading in the main process (NUM_WORKERS 0) does
    not disturb the training's own random stream. CUDA generators are left alone."""
    states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.random.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])


class SampleOrder:
    """Endless order of a map-style source: pass p is an independent permutation seeded by (seed, p), so
    every pass visits each sample once and any position is computed without the ones before it."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed = size, seed
        self._pass, self._permutation = -1, np.empty(0, dtype=np.int64)

    def __getitem__(self, position: int) -> int:
        pass_, offset = divmod(position, self.size)
        if pass_ != self._pass:
            self._pass, self._permutation = pass_, np.random.default_rng([self.seed, pass_]).permutation(self.size)
        return int(self._permutation[offset])

    def __getstate__(self):
        # Workers recompute the permutation they need rather than receive a copy.
        return {**self.__dict__, '_pass': -1, '_permutation': np.empty(0, dtype=np.int64)}
