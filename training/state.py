"""What a checkpoint carries beyond the weights: the run's progress and every rank's RNG states."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.distributed as dist

from utils.distributed import get_world_size


@dataclass
class Progress:
    epoch: int = 0  # the epoch in progress (or the next one, at an epoch boundary)
    step: int = 0  # optimizer steps done since the start of training
    max_accuracy: Optional[float] = None  # best zero-shot Acc@1; None until a validation ran
    skipped_steps: int = 0  # steps dropped for a non-finite loss (TRAIN.NAN_POLICY skip)
    overflow_steps: int = 0  # fp16 steps the GradScaler skipped for overflowing gradients


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
    """Every rank's RNG state, in rank order (each rank draws its own augmentations)."""
    if get_world_size() == 1:
        return [rng_state()]
    states = [None] * get_world_size()
    dist.all_gather_object(states, rng_state())
    return states


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

