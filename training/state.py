"""What a checkpoint carries beyond the weights: the run's progress and every rank's RNG states."""
from __future__ import annotations

import random
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any, Dict, Iterator, Optional

import numpy as np
import torch

from utils.distributed import all_gather_object


@dataclass
class Progress:
    epoch: int = 0  # the epoch in progress (or the next one, at an epoch boundary)
    step: int = 0  # optimizer steps done since the start of training
    max_accuracy: Optional[float] = None  # best zero-shot Acc@1; None until a validation ran
    skipped_steps: int = 0  # steps dropped for a non-finite loss (TRAIN.NAN_POLICY skip)
    overflow_steps: int = 0  # fp16 steps the GradScaler skipped for overflowing gradients
    validated_epochs: int = 0  # epochs whose validation ran (< epoch: the last one's is still due)

    @classmethod
    def from_state(cls, saved: Dict[str, Any]) -> 'Progress':
        known = {f.name for f in fields(cls)}
        # Checkpoints written before `validated_epochs` existed validated every epoch they finished.
        return cls(**{'validated_epochs': saved['epoch'], **{k: v for k, v in saved.items() if k in known}})


def rng_state() -> Dict[str, Any]:
    np_state = np.random.get_state()
    state = {'python': random.getstate(), 'torch': torch.get_rng_state(),
             # numpy's array state as plain lists, so the file loads with weights_only
             'numpy': (np_state[0], np_state[1].tolist(), *np_state[2:])}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state['python'])
    torch.set_rng_state(state['torch'])
    name, keys, *rest = state['numpy']
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state['cuda'])


def all_rng_states() -> list:
    """Every rank's RNG state, in rank order (each rank draws its own drop-path masks)."""
    return all_gather_object(rng_state())


@contextmanager
def rng_untouched() -> Iterator[None]:
    """Whatever runs inside (validation: its DataLoader draws a seed) leaves the training's RNG streams as
    they were, so a run that validates at other moments (after a resume) draws the same numbers."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

